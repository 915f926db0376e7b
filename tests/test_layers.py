import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from mae_jax.models import layers


def _x(shape, seed=0):
  return jax.random.normal(jax.random.key(seed), shape)


def test_attention_matches_manual_softmax():
  x = _x((2, 7, 24))
  attn = layers.Attention(num_heads=4)
  params = attn.init(jax.random.key(1), x)['params']
  out = np.asarray(attn.apply({'params': params}, x))
  wq, bq = np.asarray(params['qkv']['kernel']), np.asarray(params['qkv']['bias'])
  qkv = (np.asarray(x) @ wq + bq).reshape(2, 7, 3, 4, 6)
  q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
  s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(6)
  s = np.exp(s - s.max(-1, keepdims=True))
  s /= s.sum(-1, keepdims=True)
  o = (s @ v).transpose(0, 2, 1, 3).reshape(2, 7, 24)
  ref = o @ np.asarray(params['proj']['kernel']) + np.asarray(
      params['proj']['bias'])
  np.testing.assert_allclose(out, ref, atol=1e-5)


def test_mlp_uses_exact_gelu():
  x = _x((3, 5, 8))
  mlp = layers.Mlp(hidden_dim=32)
  params = mlp.init(jax.random.key(1), x)['params']
  h = np.asarray(x) @ np.asarray(params['fc1']['kernel']) + np.asarray(
      params['fc1']['bias'])
  h = 0.5 * h * (1 + erf(h / math.sqrt(2)))
  ref = h @ np.asarray(params['fc2']['kernel']) + np.asarray(
      params['fc2']['bias'])
  np.testing.assert_allclose(np.asarray(mlp.apply({'params': params}, x)), ref,
                             atol=1e-5)


def test_layernorm_eps_and_init_distributions():
  x = _x((2, 5, 64))
  blk = layers.Block(num_heads=4)
  params = blk.init(jax.random.key(0), x)['params']
  assert blk.apply({'params': params}, x).shape == x.shape
  np.testing.assert_array_equal(params['norm1']['scale'], 1.0)
  np.testing.assert_array_equal(params['attn']['qkv']['bias'], 0.0)
  # Xavier-uniform over the fused (D, 3D) qkv matrix: bound sqrt(6 / (D + 3D)).
  bound = math.sqrt(6 / (64 + 192))
  qkv = np.asarray(params['attn']['qkv']['kernel'])
  assert np.abs(qkv).max() <= bound and np.abs(qkv).max() > 0.9 * bound
  assert layers.LN_EPS == 1e-6


def test_patch_embed_is_strided_conv_with_linear_xavier_init():
  imgs = _x((2, 16, 16, 3))
  pe = layers.PatchEmbed(patch_size=8, embed_dim=32)
  params = pe.init(jax.random.key(0), imgs)['params']
  assert params['kernel'].shape == (8, 8, 3, 32)
  bound = math.sqrt(6 / (8 * 8 * 3 + 32))
  k = np.asarray(params['kernel'])
  assert np.abs(k).max() <= bound and np.abs(k).max() > 0.9 * bound
  conv = jax.lax.conv_general_dilated(
      imgs, params['kernel'], (8, 8), 'VALID',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + params['bias']
  np.testing.assert_allclose(np.asarray(pe.apply({'params': params}, imgs)),
                             np.asarray(conv).reshape(2, 4, 32), atol=1e-5)


def test_drop_path_only_in_training():
  x = _x((16, 3, 8))
  blk = layers.Block(num_heads=2, drop_path_rate=0.5)
  params = blk.init(jax.random.key(0), x)
  det = blk.apply(params, x, deterministic=True)
  np.testing.assert_array_equal(det, blk.apply(params, x))
  a = blk.apply(params, x, deterministic=False,
                rngs={'dropout': jax.random.key(1)})
  b = blk.apply(params, x, deterministic=False,
                rngs={'dropout': jax.random.key(2)})
  assert not np.allclose(a, det) and not np.allclose(a, b)
  with pytest.raises(Exception, match='dropout'):
    blk.apply(params, x, deterministic=False)


@pytest.mark.parametrize('t', [7, 8])
def test_attend_odd_length_padding_is_exact(t):
  # cuDNN needs an even token count when training; the padded path must give
  # the unpadded values and gradients (fp32 rounding only).
  q, k, v = (_x((2, t, 3, 8), seed) for seed in (1, 2, 3))

  def loss(q, pad):
    return jnp.sum(layers.attend(q, k, v, 0.3, 'xla', pad_odd=pad) ** 2)

  plain, padded = layers.attend(q, k, v, 0.3, 'xla', pad_odd=False), \
      layers.attend(q, k, v, 0.3, 'xla', pad_odd=True)
  assert padded.shape == (2, t, 3, 8)
  np.testing.assert_allclose(padded, plain, atol=1e-6)
  np.testing.assert_allclose(jax.grad(loss)(q, True), jax.grad(loss)(q, False),
                             atol=1e-5)
