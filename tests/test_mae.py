import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mae_jax
from mae_jax.models.mae import (denormalize_patches, masked_patch_loss,
                                normalize_patches)
from mae_jax.models.patches import patchify

RNGS = {'params': jax.random.key(0), 'mask': jax.random.key(1)}


def _imgs(n=2, size=64, seed=3):
  return jax.random.normal(jax.random.key(seed), (n, size, size, 3))


@pytest.fixture(scope='module')
def tiny():
  model = mae_jax.mae_vit_tiny_patch8()
  return model, model.init(RNGS, _imgs())


@pytest.mark.parametrize('name,expected', [
    ('mae_vit_base_patch16', 111_655_680),
    ('mae_vit_large_patch16', 329_239_296),
    ('mae_vit_huge_patch14', 656_613_964),
])
def test_trainable_parameter_counts_match_official(name, expected):
  model = mae_jax.create_model(name)
  shapes = jax.eval_shape(model.init, RNGS, jnp.zeros((1, 224, 224, 3)))
  assert set(shapes) == {'params'}  # no fixed tables among the variables
  count = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes['params']))
  assert count == expected


def test_forward_shapes_and_visible_only_encoder(tiny):
  model, variables = tiny
  imgs = _imgs()
  loss, pred, mask = model.apply(variables, imgs, rngs={'mask': jax.random.key(5)})
  assert pred.shape == (2, 64, 8 * 8 * 3) and mask.shape == (2, 64)
  assert loss.shape == () and np.isfinite(loss)
  latent, _, _ = model.apply(variables, imgs, 0.75,
                             rngs={'mask': jax.random.key(5)},
                             method=model.encode)
  assert latent.shape == (2, 1 + 16, 192)  # cls + int(64 * 0.25) visible


def test_given_noise_fixes_mask_and_output(tiny):
  model, variables = tiny
  noise = jax.random.uniform(jax.random.key(9), (2, 64))
  a = model.apply(variables, _imgs(), noise=noise)
  b = model.apply(variables, _imgs(), noise=noise)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  np.testing.assert_array_equal(
      a[2], (np.argsort(np.argsort(noise, 1), 1) >= 16).astype(np.float32))
  c = model.apply(variables, _imgs(), rngs={'mask': jax.random.key(1)})
  d = model.apply(variables, _imgs(), rngs={'mask': jax.random.key(2)})
  assert not np.array_equal(c[2], d[2])


def test_fused_patch_gather_equals_embedding_then_gathering(tiny):
  """fuse_patch_gather (default) embeds only the visible patches; values and
  gradients equal those of embedding all patches then gathering tokens, up
  to fp32 rounding (the matmuls have other shapes, so other blockings)."""
  model, variables = tiny
  assert model.fuse_patch_gather
  unfused = mae_jax.mae_vit_tiny_patch8(fuse_patch_gather=False)
  noise = jax.random.uniform(jax.random.key(6), (2, 64))
  imgs = _imgs()
  for a, b in zip(model.apply(variables, imgs, noise=noise),
                  unfused.apply(variables, imgs, noise=noise)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
  grads = [jax.grad(lambda v, m=m: m.apply(v, imgs, noise=noise)[0])(
      variables) for m in (model, unfused)]
  for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError, match=r'noise has shape \(2, 63\)'):
    model.apply(variables, imgs, noise=noise[:, :63])


def test_folded_qkv_biases_give_the_mae_the_same_loss_and_gradients(tiny):
  # config.fold_qkv_bias through the encoder and decoder stacks: the same
  # parameters, loss and gradients up to fp32 rounding (biases made nonzero).
  model, variables = tiny
  variables = jax.tree.map(
      lambda p: p + 0.1 * jax.random.normal(jax.random.key(4), p.shape),
      variables)
  folded = mae_jax.mae_vit_tiny_patch8(fold_qkv_bias=True)
  noise = jax.random.uniform(jax.random.key(6), (2, 64))
  imgs = _imgs()
  losses, grads = [], []
  for m in (model, folded):
    loss = lambda v, m=m: m.apply(v, imgs, noise=noise)[0]
    losses.append(loss(variables))
    grads.append(jax.grad(loss)(variables))
  np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads[1]), jax.tree.leaves(grads[0])):
    np.testing.assert_allclose(a, b, rtol=1e-3,
                               atol=1e-4 * float(jnp.abs(b).max()))


def test_loss_ignores_visible_patches():
  imgs = _imgs()
  pred = jax.random.normal(jax.random.key(1), (2, 64, 192))
  mask = (jax.random.uniform(jax.random.key(2), (2, 64)) > 0.5).astype(
      jnp.float32)
  for norm_pix in (False, True):
    base = masked_patch_loss(imgs, pred, mask, 8, norm_pix)
    changed = jnp.where(mask[..., None] == 0, pred + 100.0, pred)
    assert masked_patch_loss(imgs, changed, mask, 8, norm_pix) == base
    moved = jnp.where(mask[..., None] == 1, pred + 1.0, pred)
    assert masked_patch_loss(imgs, moved, mask, 8, norm_pix) != base


def test_norm_pix_uses_unbiased_variance():
  target = np.asarray(patchify(_imgs(), 8))
  mean = target.mean(-1, keepdims=True)
  var1 = target.var(-1, ddof=1, keepdims=True)
  ref = (target - mean) / np.sqrt(var1 + 1e-6)
  out = np.asarray(normalize_patches(jnp.asarray(target)))
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  biased = (target - mean) / np.sqrt(target.var(-1, keepdims=True) + 1e-6)
  assert np.abs(out - biased).max() > 1e-3


def test_denormalize_patches_inverts_normalize_patches():
  target = patchify(_imgs(), 8)
  back = denormalize_patches(normalize_patches(target), target)
  np.testing.assert_allclose(back, target, rtol=0, atol=1e-5)


def test_per_example_loss_is_each_images_masked_mse():
  imgs = _imgs(n=3)
  pred = jax.random.normal(jax.random.key(1), (3, 64, 192))
  mask = (jax.random.uniform(jax.random.key(2), (3, 64)) > 0.4).astype(
      jnp.float32)
  for norm_pix in (False, True):
    each = masked_patch_loss(imgs, pred, mask, 8, norm_pix, per_example=True)
    assert each.shape == (3,)
    for i in range(3):  # an image alone: its loss is its per-example value
      alone = masked_patch_loss(imgs[i:i + 1], pred[i:i + 1], mask[i:i + 1],
                                8, norm_pix)
      np.testing.assert_allclose(each[i], alone, rtol=1e-6)
    batch = masked_patch_loss(imgs, pred, mask, 8, norm_pix)
    np.testing.assert_allclose(  # the batch loss weighs images by mask count
        batch, np.sum(each * mask.sum(-1)) / mask.sum(), rtol=1e-6)


def test_token_init(tiny):
  _, variables = tiny
  params = variables['params']
  for name in ('cls_token', 'mask_token'):
    std = float(np.std(params[name]))
    assert 0.01 < std < 0.03, (name, std)


def test_bf16_compute_close_to_fp32_with_fp32_params(tiny):
  model, variables = tiny
  noise = jax.random.uniform(jax.random.key(4), (4, 64))
  imgs = _imgs(4)
  loss32 = model.apply(variables, imgs, noise=noise)[0]
  bf16 = mae_jax.mae_vit_tiny_patch8(dtype=jnp.bfloat16)
  bf_vars = bf16.init(RNGS, imgs)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(bf_vars))
  loss16, pred16, _ = bf16.apply(variables, imgs, noise=noise)
  assert pred16.dtype == jnp.bfloat16 and loss16.dtype == jnp.float32
  assert abs(float(loss16) / float(loss32) - 1) < 2e-2


def test_bad_input_shape_and_unknown_name(tiny):
  model, variables = tiny
  with pytest.raises(ValueError, match=r'\(3, 32, 32, 3\) do not match'):
    model.apply(variables, jnp.zeros((3, 32, 32, 3)),
                rngs={'mask': jax.random.key(0)})
  with pytest.raises(ValueError, match="unknown model name 'mae_vit_small'"):
    mae_jax.create_model('mae_vit_small')


def test_classifier_shapes_and_head_init():
  model = mae_jax.vit_tiny_patch8(num_classes=10)
  imgs = _imgs()
  variables = model.init(jax.random.key(0), imgs)
  assert model.apply(variables, imgs).shape == (2, 10)
  head = np.asarray(variables['params']['head']['kernel'])
  assert np.abs(head).max() < 2 * 2e-5 * 1.2 and head.std() > 0
  assert 'fc_norm' in variables['params']
  cls_model = mae_jax.vit_tiny_patch8(num_classes=10, global_pool=False)
  assert 'norm' in cls_model.init(jax.random.key(0), imgs)['params']
