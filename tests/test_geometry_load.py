"""Loading and converting at another input geometry: non-square and
one-channel torch files, img_size= / in_chans= at load time, and
reconstruction panels of one-channel images. Random weights, tiny sizes."""
import functools
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer as TimmViT

import mae_jax
from mae_jax import checkpoint, convert, figures
from mae_jax.models import MAE_CONFIGS, MaskedAutoencoder, create_model
from mae_jax.models.pos_embed import sincos_2d
from mae_jax.torch_io import CheckpointError
from tests import torch_mae

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    'convert_torch_weights', ROOT / 'convert_torch_weights.py')
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)

TINY = MAE_CONFIGS['mae_vit_tiny_patch8']  # patch 8, width 192, depth 4


def _timm_vit(img_size, in_chans, seed=0):
  """timm ViT with vit_tiny_patch8's dims (the official fine-tuning
  settings, global pooling), random weights."""
  factory = functools.partial(
      TimmViT, img_size=img_size, in_chans=in_chans, num_classes=5,
      patch_size=TINY['patch_size'], embed_dim=TINY['embed_dim'],
      depth=TINY['depth'], num_heads=TINY['num_heads'], mlp_ratio=4.0,
      qkv_bias=True, class_token=True, global_pool='avg', fc_norm=True,
      norm_layer=torch_mae.LayerNorm)
  return torch_mae.randomize(factory().eval(), seed=seed)


def _run_timm(ref, imgs_nchw):
  with torch.no_grad():
    tokens = ref.forward_features(imgs_nchw)
    return tokens.numpy(), ref.forward_head(tokens).numpy()


def _nhwc(imgs_nchw):
  return jnp.asarray(imgs_nchw.permute(0, 2, 3, 1).numpy())


@pytest.fixture(scope='module')
def rgb_vit_dir(tmp_path_factory):
  """A 64-px RGB vit_tiny_patch8 classifier converted from timm."""
  tmp = tmp_path_factory.mktemp('rgb')
  ref = _timm_vit(64, 3, seed=1)
  src = torch_mae.save_pth(tmp / 'vit.pth', ref.state_dict())
  assert cli.main([str(src), str(tmp / 'vit')]) == 0
  return ref, tmp / 'vit'


def test_non_square_one_channel_timm_file_converts_and_matches(tmp_path,
                                                               capsys):
  """A 64x48 px, 1-channel timm ViT: --img-size 64,48 converts it; logits and
  `features` match timm within 1e-4."""
  ref = _timm_vit((64, 48), 1)
  src = torch_mae.save_pth(tmp_path / 'x.pth', ref.state_dict())
  assert cli.main([str(src), str(tmp_path / 'out'), '--model',
                   'vit_tiny_patch8', '--img-size', '64,48']) == 0
  assert 'model: vit_tiny_patch8' in capsys.readouterr().out
  model, variables = mae_jax.load(tmp_path / 'out')
  assert model.img_size == (64, 48) and model.in_chans == 1
  imgs = torch.randn(2, 1, 64, 48, generator=torch.Generator().manual_seed(2))
  ref_tokens, ref_logits = _run_timm(ref, imgs)
  x = _nhwc(imgs)
  np.testing.assert_allclose(model.apply(variables, x), ref_logits, rtol=0,
                             atol=1e-4)
  np.testing.assert_allclose(model.apply(variables, x, method='features'),
                             ref_tokens, rtol=0, atol=1e-4)


def test_non_square_file_without_img_size_is_refused_naming_the_flag(
    tmp_path, capsys):
  src = torch_mae.save_pth(tmp_path / 'x.pth',
                           _timm_vit((64, 48), 1).state_dict())
  assert cli.main([str(src), str(tmp_path / 'out')]) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1, err
  assert 'pos_embed holds L=48 patch positions, not a square grid' in err
  assert '--img-size H,W' in err
  assert cli.main([str(src), str(tmp_path / 'out'), '--img-size',
                   '64,50']) == 2
  assert ('--img-size: img_size=(64, 50) is not divisible by patch_size=8'
          in capsys.readouterr().err)
  assert not (tmp_path / 'out').exists()


def test_classifier_loaded_at_larger_non_square_size_matches_timm_resampling(
    rgb_vit_dir):
  """mae_jax.load(img_size=(96, 80)) resamples the 8x8 pos_embed to 12x10
  as timm's resample_abs_pos_embed does without antialiasing (plain
  bicubic, as the official MAE fine-tuning code resamples; timm's default
  antialias=True switches PyTorch to another cubic kernel, measured 0.03
  apart); logits equal those of timm built at 96x80 with that table."""
  ref, path = rgb_vit_dir
  model, variables = mae_jax.load(path, img_size=(96, 80))
  assert model.img_size == (96, 80) and model.grid_size == (12, 10)
  want = resample_abs_pos_embed(ref.pos_embed.detach(), new_size=(12, 10),
                                old_size=(8, 8), num_prefix_tokens=1,
                                antialias=False)
  np.testing.assert_allclose(variables['params']['pos_embed'], want.numpy(),
                             rtol=0, atol=1e-5)
  big = _timm_vit((96, 80), 3)
  state = dict(ref.state_dict(), pos_embed=want)
  big.load_state_dict(state)
  imgs = torch.randn(2, 3, 96, 80, generator=torch.Generator().manual_seed(3))
  _, ref_logits = _run_timm(big, imgs)
  np.testing.assert_allclose(model.apply(variables, _nhwc(imgs)), ref_logits,
                             rtol=0, atol=1e-4)


def test_converter_img_size_resamples_like_load(rgb_vit_dir, tmp_path,
                                                capsys):
  """--img-size 96,80 on a 64-px file gives the table load(img_size=) gives,
  and the summary says so."""
  ref, path = rgb_vit_dir
  src = torch_mae.save_pth(tmp_path / 'vit.pth', ref.state_dict())
  assert cli.main([str(src), str(tmp_path / 'big'), '--img-size',
                   '96,80']) == 0
  assert ('grid: 8x8 patches in the file -> 12x10 (pos_embed resampled '
          'bicubically)') in capsys.readouterr().out
  _, converted = mae_jax.load(tmp_path / 'big')
  _, loaded = mae_jax.load(path, img_size=(96, 80))
  np.testing.assert_array_equal(converted['params']['pos_embed'],
                                loaded['params']['pos_embed'])


def test_other_in_chans_is_refused_unless_adaptation_is_asked(rgb_vit_dir):
  ref, path = rgb_vit_dir
  with pytest.raises(CheckpointError, match=r'takes 3 channels, not '
                     r'in_chans=1; ask for adapt_in_chans=True'):
    mae_jax.load(path, in_chans=1)
  model, variables = mae_jax.load(path, in_chans=1, adapt_in_chans=True)
  assert model.in_chans == 1
  _, rgb = mae_jax.load(path)
  kernel = variables['params']['patch_embed']['kernel']  # (p, p, C, D)
  np.testing.assert_allclose(
      kernel, rgb['params']['patch_embed']['kernel'].sum(2, keepdims=True),
      rtol=0, atol=1e-6)
  # a gray image embeds as the RGB model embeds it repeated to three channels
  gray = jax.random.normal(jax.random.key(0), (1, 64, 64, 1))
  rgb_model, _ = mae_jax.load(path)
  np.testing.assert_allclose(
      model.apply(variables, gray),
      rgb_model.apply(rgb, jnp.repeat(gray, 3, axis=-1)), rtol=0, atol=1e-4)


def test_adapting_to_more_channels_repeats_cyclically_and_scales():
  kernel = np.random.default_rng(0).normal(size=(2, 2, 3, 4))
  out = checkpoint.adapt_patch_kernel(kernel, 5)
  np.testing.assert_allclose(out, kernel[:, :, [0, 1, 2, 0, 1]] * 3 / 5)


def test_converter_in_chans_adapts_the_kernel(tmp_path, capsys):
  ref = _timm_vit(64, 3, seed=2)
  src = torch_mae.save_pth(tmp_path / 'vit.pth', ref.state_dict())
  assert cli.main([str(src), str(tmp_path / 'gray'), '--in-chans', '1']) == 0
  assert ('in_chans: 3 in the file -> 1 (patch-embedding kernel adapted)'
          in capsys.readouterr().out)
  model, variables = mae_jax.load(tmp_path / 'gray')
  assert model.in_chans == 1
  weight = ref.patch_embed.proj.weight.detach().numpy()  # (D, C, p, p)
  np.testing.assert_allclose(
      variables['params']['patch_embed']['kernel'],
      weight.sum(1, keepdims=True).transpose(2, 3, 1, 0), rtol=0, atol=1e-6)


def _layer_norm(x, params):
  x = np.asarray(x, np.float64)
  mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return ((x - mean) / np.sqrt(var + 1e-6) * np.asarray(params['scale'])
          + np.asarray(params['bias']))


def _dense(x, params):
  return np.asarray(x) @ np.asarray(params['kernel']) + np.asarray(
      params['bias'])


@pytest.fixture(scope='module')
def mae_dir(tmp_path_factory):
  """A 64-px RGB mae_vit_tiny_patch8 checkpoint (random init, unrolled)."""
  model = create_model('mae_vit_tiny_patch8')
  variables = jax.jit(model.init)(
      {'params': jax.random.key(0), 'mask': jax.random.key(1)},
      jnp.zeros((1, 64, 64, 3)))
  path = tmp_path_factory.mktemp('mae') / 'mae'
  checkpoint.save(path, model, variables)
  return path


@pytest.mark.parametrize('scan_blocks', [False, True])
def test_mae_loaded_at_another_img_size_uses_tables_of_the_new_grid(
    mae_dir, scan_blocks):
  """The MAE's sin-cos tables are not parameters: loaded at 96x64 px from a
  64-px checkpoint its forward runs on the 12x8 grid, and with the blocks
  left out, encode and decode equal a hand computation that adds
  sincos_2d(D, (12, 8)) and sincos_2d(D_dec, (12, 8))."""
  wide, loaded = mae_jax.load(mae_dir, img_size=(96, 64),
                              scan_blocks=scan_blocks)
  assert isinstance(wide, MaskedAutoencoder) and wide.grid_size == (12, 8)
  assert wide.scan_blocks == scan_blocks
  imgs = jax.random.normal(jax.random.key(2), (2, 96, 64, 3))
  noise = jax.random.uniform(jax.random.key(3), (2, 96))
  loss, pred, mask = wide.apply(loaded, imgs, noise=noise)
  assert pred.shape == (2, 96, 8 * 8 * 3) and mask.shape == (2, 96)
  assert np.isfinite(float(loss))
  # no blocks: encode = norm(visible embeddings + table), decode likewise
  params = {k: v for k, v in loaded['params'].items()
            if k not in ('blocks', 'decoder_blocks')
            and not k.startswith(('blocks_', 'decoder_blocks_'))}
  bare = wide.clone(depth=0, decoder_depth=0, scan_blocks=False)
  latent, _, ids_restore = bare.apply({'params': params}, imgs, 0.75, noise,
                                      method='encode')
  got = bare.apply({'params': params}, latent, ids_restore, method='decode')
  table = sincos_2d(wide.embed_dim, (12, 8))
  patches = np.asarray(imgs).reshape(2, 12, 8, 8, 8, 3).transpose(
      0, 1, 3, 2, 4, 5).reshape(2, 96, -1)
  kernel = np.asarray(params['patch_embed']['kernel']).reshape(-1, 192)
  tokens = patches @ kernel + np.asarray(params['patch_embed']['bias'])
  keep = np.argsort(np.asarray(noise), axis=1)[:, :24]
  visible = np.take_along_axis(tokens + table[1:], keep[:, :, None], axis=1)
  cls = np.broadcast_to(np.asarray(params['cls_token'])[0] + table[:1],
                        (2, 1, 192))
  want = _layer_norm(np.concatenate([cls, visible], 1), params['norm'])
  np.testing.assert_allclose(latent, want, rtol=0, atol=1e-4)
  x = _dense(latent, params['decoder_embed'])
  full = np.broadcast_to(np.asarray(params['mask_token']),
                         (2, 96, x.shape[-1])).copy()
  np.put_along_axis(full, keep[:, :, None], x[:, 1:], axis=1)
  x = np.concatenate([x[:, :1], full], 1) + sincos_2d(x.shape[-1], (12, 8))
  want = _dense(_layer_norm(x, params['decoder_norm']),
                params['decoder_pred'])[:, 1:]
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_mae_in_chans_change_is_refused_naming_decoder_pred(mae_dir):
  with pytest.raises(CheckpointError, match='decoder_pred cannot be adapted '
                     'to in_chans=1'):
    mae_jax.load(mae_dir, in_chans=1, adapt_in_chans=True)


def test_non_square_one_channel_mae_file_converts_with_its_tables_checked():
  """An official-layout MAE state dict at 64x48 px, 1 channel: the sin-cos
  check uses the 8x6 grid, so the 6x8 table (same length, rows and columns
  swapped) is refused."""
  model = create_model('mae_vit_tiny_patch8', img_size=(64, 48), in_chans=1)
  variables = jax.jit(model.init)(
      {'params': jax.random.key(0), 'mask': jax.random.key(1)},
      jnp.zeros((1, 64, 48, 1)))
  state = convert.to_torch(model, variables['params'])
  got, params, _ = convert.from_torch(dict(state), img_size=(64, 48))
  assert got.img_size == (64, 48) and got.in_chans == 1
  np.testing.assert_array_equal(params['decoder_pred']['kernel'],
                                variables['params']['decoder_pred']['kernel'])
  bad = dict(state, pos_embed=torch.from_numpy(
      sincos_2d(TINY['embed_dim'], (6, 8))[None]))
  with pytest.raises(CheckpointError, match='pos_embed is not the fixed 2D '
                     'sin-cos table'):
    convert.from_torch(bad, img_size=(64, 48))


def test_one_channel_reconstruction_panels_are_gray_rgb_images():
  """1-channel batch: four (N, H, W, 3) panels in [0, 1], gray (equal RGB),
  de-normalised with the given mean/std; removed patches are mid-gray in the
  masked panel and the prediction in the pasted one."""
  rng = np.random.default_rng(0)
  imgs = rng.normal(size=(2, 32, 24, 1)).astype(np.float32)
  pred = rng.normal(size=(2, 12, 8 * 8 * 1)).astype(np.float32)
  mask = np.zeros((2, 12), np.float32)
  mask[:, 0] = 1
  panels = figures.reconstruction_panels(imgs, pred, mask, 8, False,
                                           mean=[0.5], std=[0.25])
  for panel in panels:
    assert panel.shape == (2, 32, 24, 3)
    assert panel.min() >= 0 and panel.max() <= 1
    np.testing.assert_array_equal(panel[..., 0], panel[..., 2])
  original, masked, recon, pasted = panels
  np.testing.assert_allclose(original[..., 0],
                             np.clip(imgs[..., 0] * 0.25 + 0.5, 0, 1))
  np.testing.assert_array_equal(masked[:, :8, :8], 0.5)
  np.testing.assert_array_equal(masked[:, 8:], original[:, 8:])
  np.testing.assert_array_equal(pasted[:, :8, :8], recon[:, :8, :8])
  np.testing.assert_array_equal(pasted[:, 8:], original[:, 8:])
  # defaults for C != 3: mean 0, std 1
  default = figures.reconstruction_panels(imgs, pred, mask, 8, False)[0]
  np.testing.assert_allclose(default[..., 0], np.clip(imgs[..., 0], 0, 1))
