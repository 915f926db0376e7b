"""Any input geometry (int or (H, W) img_size, any in_chans) and `features`.

References run with random weights: timm's VisionTransformer (non-square,
one channel) and Hugging Face's ViTMAEForPreTraining (one channel).
"""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import traverse_util
from timm.models.vision_transformer import VisionTransformer as TimmViT

from mae_jax import checkpoint, torch_layout
from mae_jax.models import (MaskedAutoencoder, VisionTransformer,
                            model_input_shape, stack_blocks, token_map)
from mae_jax.models.pos_embed import sincos_2d
from tests import torch_mae

TINY = dict(patch_size=8, embed_dim=64, depth=3, num_heads=2)
TINY_MAE = dict(TINY, decoder_embed_dim=32, decoder_depth=1,
                decoder_num_heads=2)
RNGS = {'params': jax.random.key(0), 'mask': jax.random.key(1)}


def _imgs(shape, seed=3):
  return jax.random.normal(jax.random.key(seed), shape)


def _state_to_params(state):
  """Official-layout torch state dict -> unrolled Flax params, through the
  converter's key and tensor mapping."""
  flat = {torch_layout.to_flax_path(k, v.ndim):
          torch_layout.tensor_to_flax(v)
          for k, v in state.items()}
  return traverse_util.unflatten_dict(flat)


def _layer_norm(x, params, eps=1e-6):
  x = np.asarray(x, np.float64)
  mean = x.mean(-1, keepdims=True)
  var = x.var(-1, keepdims=True)
  return ((x - mean) / np.sqrt(var + eps) * np.asarray(params['scale'])
          + np.asarray(params['bias']))


# ------------------------------------------------------------ geometry
def test_img_size_int_pair_or_list_gives_grid_and_input_shape():
  square = MaskedAutoencoder(img_size=64, **TINY_MAE)
  assert square.img_size == 64 and square.grid_size == (8, 8)
  assert square.num_patches == 64
  assert model_input_shape(square) == (64, 64, 3)
  wide = VisionTransformer(img_size=[32, 48], in_chans=1, **TINY)
  assert wide.img_size == (32, 48) and wide.grid_size == (4, 6)
  assert wide.num_patches == 24 and model_input_shape(wide) == (32, 48, 1)
  with pytest.raises(ValueError, match=r'img_size=\(32, 50\) is not '
                     'divisible by patch_size=8'):
    _ = VisionTransformer(img_size=(32, 50), **TINY).grid_size
  with pytest.raises(ValueError, match=r'img_size=\[32\] must be an int or '
                     r'an \(H, W\) pair'):
    MaskedAutoencoder(img_size=[32], **TINY_MAE)


def test_pair_img_size_survives_a_json_round_trip_of_the_description():
  model = MaskedAutoencoder(img_size=(64, 48), in_chans=1, **TINY_MAE)
  text = json.dumps(checkpoint.model_description(model))
  rebuilt = checkpoint.build_model(json.loads(text))
  assert json.loads(text)['fields']['img_size'] == [64, 48]
  assert rebuilt.img_size == (64, 48) and rebuilt == model
  assert hash(rebuilt) == hash(model)


def test_square_table_unchanged_and_non_square_follows_hf_mae_layout():
  """A (g, g) grid gives the int-g table bit for bit. For gh != gw the
  first half of the channels encodes the column (width) index and the
  second half the row index: Hugging Face's ViTMAE table (its canonical
  [row | column] table with the halves swapped, as it builds it for
  checkpoint compatibility with the official code)."""
  from transformers.models.vit_mae.modeling_vit_mae import (  # pylint: disable=import-outside-toplevel
      build_2d_sinusoidal_position_embedding)
  for dim, g in ((64, 4), (768, 14)):
    np.testing.assert_array_equal(sincos_2d(dim, (g, g)), sincos_2d(dim, g))
  dim, gh, gw = 64, 3, 5
  ref = build_2d_sinusoidal_position_embedding(
      height=gh, width=gw, embed_dim=dim, cls_token=True).numpy()
  ref = np.concatenate([ref[:, dim // 2:], ref[:, :dim // 2]], axis=1)
  table = sincos_2d(dim, (gh, gw))
  assert table.shape == (1 + gh * gw, dim)
  np.testing.assert_allclose(table, ref, rtol=0, atol=1e-6)
  grid = table[1:].reshape(gh, gw, dim)
  # first half: constant down a column; second half: constant along a row
  np.testing.assert_array_equal(grid[:, :, :dim // 2],
                                np.broadcast_to(grid[:1, :, :dim // 2],
                                                (gh, gw, dim // 2)))
  np.testing.assert_array_equal(grid[:, :, dim // 2:],
                                np.broadcast_to(grid[:, :1, dim // 2:],
                                                (gh, gw, dim // 2)))


def test_token_map_puts_raster_token_k_at_row_k_div_gw():
  tokens = jnp.arange(2 * 13 * 4, dtype=jnp.float32).reshape(2, 13, 4)
  grid = token_map(tokens, (3, 4))
  assert grid.shape == (2, 3, 4, 4)
  np.testing.assert_array_equal(grid[:, 2, 1], tokens[:, 1 + 2 * 4 + 1])
  with pytest.raises(ValueError, match='13 tokens are not a cls token plus '
                     'a 4x4 grid'):
    token_map(tokens, (4, 4))


# ------------------------------------------------------- timm classifier
def _timm_vit(global_pool, img_size=(48, 32)):
  factory = functools.partial(
      TimmViT, img_size=img_size, in_chans=1, num_classes=5, mlp_ratio=4.0,
      qkv_bias=True, class_token=True,
      global_pool='avg' if global_pool else 'token', fc_norm=global_pool,
      norm_layer=torch_mae.LayerNorm, **TINY)
  return torch_mae.randomize(factory().eval(), seed=4)


@pytest.mark.parametrize('global_pool', [True, False])
def test_non_square_one_channel_vit_matches_timm(global_pool):
  """timm ViT, 48x32 px, 1 channel, random weights: same logits, `features`
  equals forward_features, and layers=[...] equal the blocks' outputs."""
  ref_model = _timm_vit(global_pool)
  imgs = torch.randn(2, 1, 48, 32, generator=torch.Generator().manual_seed(5))
  outputs = {}
  for i, blk in enumerate(ref_model.blocks):
    blk.register_forward_hook(
        lambda mod, inp, out, i=i: outputs.__setitem__(i, out.numpy()))
  with torch.no_grad():
    ref_tokens = ref_model.forward_features(imgs).numpy()
    ref_logits = ref_model.forward_head(torch.from_numpy(ref_tokens)).numpy()
  params = _state_to_params(ref_model.state_dict())
  model = VisionTransformer(img_size=(48, 32), in_chans=1, num_classes=5,
                            global_pool=global_pool, **TINY)
  assert params['pos_embed'].shape == (1, 1 + 6 * 4, 64)
  x = jnp.asarray(imgs.permute(0, 2, 3, 1).numpy())
  logits = model.apply({'params': params}, x)
  np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=1e-4)
  tokens, kept = model.apply({'params': params}, x, layers=[0, -1],
                             method='features')
  assert tokens.shape == (2, 1 + 24, 64)
  np.testing.assert_allclose(tokens, ref_tokens, rtol=0, atol=1e-4)
  np.testing.assert_allclose(kept[0], outputs[0], rtol=0, atol=1e-4)
  np.testing.assert_allclose(kept[1], outputs[2], rtol=0, atol=1e-4)
  scanned = model.clone(scan_blocks=True)
  tokens_s, kept_s = scanned.apply({'params': stack_blocks(params)}, x,
                                   layers=[0, -1], method='features')
  np.testing.assert_allclose(tokens_s, tokens, rtol=0, atol=1e-5)
  for a, b in zip(kept_s, kept):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_vit_rejects_wrong_channels_and_bad_layer_index():
  model = VisionTransformer(img_size=(48, 32), in_chans=1, num_classes=5,
                            **TINY)
  with pytest.raises(ValueError, match=r'images of shape \(1, 48, 32, 3\) do '
                     r'not match img_size=\(48, 32\) with in_chans=1'):
    model.init(jax.random.key(0), jnp.zeros((1, 48, 32, 3)))
  with pytest.raises(ValueError, match=r'layer index 3 is not a block '
                     r'index: a Python int in \[-3, 3\)'):
    model.init(jax.random.key(0), jnp.zeros((1, 48, 32, 1)), layers=[3],
               method='features')
  with pytest.raises(ValueError, match='layers=2 must be a list or tuple'):
    model.init(jax.random.key(0), jnp.zeros((1, 48, 32, 1)), layers=2,
               method='features')


@pytest.mark.parametrize('scan_blocks', [False, True])
def test_features_alone_initialises_the_encoder(scan_blocks):
  imgs = jnp.zeros((1, 48, 32, 1))
  vit = VisionTransformer(img_size=(48, 32), in_chans=1,
                          scan_blocks=scan_blocks, **TINY)
  mae = MaskedAutoencoder(img_size=(48, 32), in_chans=1,
                          scan_blocks=scan_blocks, **TINY_MAE)
  blocks = ['blocks'] if scan_blocks else ['blocks_0', 'blocks_1', 'blocks_2']
  for model, extra in ((vit, ['pos_embed']), (mae, ['mask_token', 'norm'])):
    init = functools.partial(model.init, layers=[1], method='features')
    shapes = jax.eval_shape(init, jax.random.key(0), imgs)['params']
    assert sorted(shapes) == sorted(blocks + ['cls_token', 'patch_embed']
                                    + extra)


# --------------------------------------------------- Hugging Face MAE
def _hf_to_official(state):
  """Hugging Face ViTMAEForPreTraining keys -> official MAE keys (q, k, v
  projections stacked into qkv, as the official file holds them)."""
  out = {}
  renames = (('vit.embeddings.patch_embeddings.projection', 'patch_embed.proj'),
             ('vit.embeddings.', ''), ('vit.layernorm', 'norm'),
             ('vit.layers.', 'blocks.'), ('decoder.decoder_layers.',
                                          'decoder_blocks.'),
             ('decoder.', ''), ('layernorm_before', 'norm1'),
             ('layernorm_after', 'norm2'), ('attention.o_proj', 'attn.proj'),
             ('position_embeddings', 'pos_embed'))
  for key, value in state.items():
    for old, new in renames:
      key = key.replace(old, new)
    out[key] = value
  for key in [k for k in out if '.attention.q_proj.' in k]:
    parts = [out.pop(key.replace('q_proj', n)) for n in ('q_proj', 'k_proj',
                                                         'v_proj')]
    out[key.replace('attention.q_proj', 'attn.qkv')] = torch.cat(parts)
  return out


@pytest.mark.parametrize('norm_pix_loss', [False, True])
def test_one_channel_mae_matches_hf_vitmae(norm_pix_loss):
  """Same noise -> same mask, pred within 1e-4, loss within 1e-5 relative
  (the tolerances of the official-code parity tests); `features` equals
  HF's encoder output with nothing masked."""
  from transformers import ViTMAEConfig, ViTMAEForPreTraining  # pylint: disable=import-outside-toplevel
  cfg = ViTMAEConfig(
      image_size=32, patch_size=8, num_channels=1, hidden_size=64,
      num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
      decoder_hidden_size=32, decoder_num_hidden_layers=1,
      decoder_num_attention_heads=2, decoder_intermediate_size=128,
      layer_norm_eps=1e-6, hidden_act='gelu', qkv_bias=True,
      mask_ratio=0.75, norm_pix_loss=norm_pix_loss)
  torch.manual_seed(0)
  ref_model = ViTMAEForPreTraining(cfg).eval()
  # Built from a config, transformers 5 leaves both sin-cos tables at zero;
  # its own table builders fill them (the encoder's skips a flagged layer).
  embeddings = ref_model.vit.embeddings
  embeddings.patch_embeddings.projection._is_hf_initialized = False  # pylint: disable=protected-access
  embeddings.initialize_weights()
  ref_model.decoder.initialize_weights(16)
  with torch.no_grad():  # biases, LayerNorm scales off their init too
    for name, p in ref_model.named_parameters():
      if not p.requires_grad:  # the fixed sin-cos tables
        continue
      if name.endswith('bias'):
        p.normal_(0.0, 0.05)
      elif p.ndim == 1:
        p.normal_(1.0, 0.2)
      elif name.endswith('weight'):
        p.normal_(0.0, float(np.prod(p.shape[1:])) ** -0.5)
      else:  # cls and mask tokens
        p.normal_(0.0, 0.1)
  gen = torch.Generator().manual_seed(1)
  imgs = torch.randn(2, 1, 32, 32, generator=gen)
  noise = torch.rand(2, 16, generator=gen)
  with torch.no_grad():
    out = ref_model(pixel_values=imgs, noise=noise)
    # nothing masked, increasing noise: HF keeps every token in raster order
    ref_model.vit.embeddings.config.mask_ratio = 0.0
    ref_tokens = ref_model.vit(pixel_values=imgs, noise=torch.arange(
        16.0).expand(2, 16)).last_hidden_state.numpy()
  state = _hf_to_official(ref_model.state_dict())
  # HF's fixed tables are the official sin-cos tables
  for name, dim in (('pos_embed', 64), ('decoder_pos_embed', 32)):
    np.testing.assert_allclose(state.pop(name)[0].numpy(),
                               sincos_2d(dim, 4), rtol=0, atol=1e-6)
  model = MaskedAutoencoder(img_size=32, in_chans=1, depth=2,
                            norm_pix_loss=norm_pix_loss,
                            **{k: v for k, v in TINY_MAE.items()
                               if k != 'depth'})
  variables = {'params': _state_to_params(state)}
  x = jnp.asarray(imgs.permute(0, 2, 3, 1).numpy())
  loss, pred, mask = model.apply(variables, x,
                                 noise=jnp.asarray(noise.numpy()))
  assert pred.shape == (2, 16, 8 * 8 * 1)
  np.testing.assert_allclose(model.apply(variables, x, method='features'),
                             ref_tokens, rtol=0, atol=1e-4)
  np.testing.assert_array_equal(mask, out.mask.numpy())
  np.testing.assert_allclose(pred, out.logits.numpy(), rtol=0, atol=1e-4)
  assert abs(float(loss) / out.loss.item() - 1) <= 1e-5


# --------------------------------------------------- non-square MAE
@pytest.fixture(scope='module')
def wide_mae():
  model = MaskedAutoencoder(img_size=(64, 48), in_chans=1, **TINY_MAE)
  imgs = _imgs((2, 64, 48, 1))
  return model, jax.jit(model.init)(RNGS, imgs), imgs


def test_mae_features_are_the_unmasked_encoder_in_raster_order(wide_mae):
  """features == encode at mask ratio 0 with the shuffle undone; the last
  kept block output is the tokens before `norm`; scan_blocks agrees."""
  model, variables, imgs = wide_mae
  noise = jax.random.uniform(jax.random.key(7), (2, 48))
  latent, mask, ids_restore = model.apply(variables, imgs, 0.0, noise,
                                          method='encode')
  assert not np.asarray(mask).any()
  unshuffled = jnp.take_along_axis(latent[:, 1:], ids_restore[:, :, None], 1)
  tokens, kept = model.apply(variables, imgs, layers=[1, -1],
                             method='features')
  assert tokens.shape == (2, 1 + 8 * 6, 64)
  assert [k.shape for k in kept] == [(2, 49, 64)] * 2
  np.testing.assert_allclose(tokens[:, 0], latent[:, 0], rtol=0, atol=1e-5)
  np.testing.assert_allclose(tokens[:, 1:], unshuffled, rtol=0, atol=1e-5)
  np.testing.assert_allclose(
      tokens, _layer_norm(kept[1], variables['params']['norm']), rtol=0,
      atol=1e-5)
  np.testing.assert_array_equal(
      model.apply(variables, imgs, method='features'), tokens)
  scanned = model.clone(scan_blocks=True)
  stacked = {'params': stack_blocks(variables['params'])}
  tokens_s, kept_s = scanned.apply(stacked, imgs, layers=[1, -1],
                                   method='features')
  np.testing.assert_allclose(tokens_s, tokens, rtol=0, atol=1e-5)
  for a, b in zip(kept_s, kept):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_non_square_one_channel_mae_trains(wide_mae):
  """64x48 px, 1 channel: shapes right, finite gradients everywhere, and
  a few Adam steps on smooth images lower the masked loss."""
  model, variables, _ = wide_mae
  ys, xs = np.meshgrid(np.arange(64), np.arange(48), indexing='ij')
  rng = np.random.default_rng(0)
  imgs = np.stack([np.sin(xs * a + ys * b + c)
                   for a, b, c in rng.uniform(0.05, 0.3, (8, 3))])
  imgs = jnp.asarray(imgs[..., None], jnp.float32)
  opt = optax.adam(1e-3)

  @jax.jit
  def step(params, opt_state, key):
    def loss_fn(p):
      loss, pred, mask = model.apply({'params': p}, imgs,
                                     rngs={'mask': key})
      return loss, (pred, mask)
    (loss, (pred, mask)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, grads, (
        pred.shape, mask)

  params = variables['params']
  opt_state = opt.init(params)
  losses = []
  for i in range(30):
    params, opt_state, loss, grads, (pred_shape, mask) = step(
        params, opt_state, jax.random.key(i))
    losses.append(float(loss))
  assert pred_shape == (8, 48, 8 * 8 * 1) and mask.shape == (8, 48)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  # measured: 1.26 -> 0.52 (mean of the last 5)
  assert np.mean(losses[-5:]) < 0.6 * losses[0], losses
