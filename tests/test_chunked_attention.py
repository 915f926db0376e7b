"""The CPU speed paths compute what the plain layers compute: chunked
attention, 2-D dense and the erf form of GELU. fp32 tolerances: 1e-5
absolute on values of order 1 (a few ulps of accumulated rounding)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mae_jax.train.task import attention_impl
from mae_jax.models import create_model, layers
from mae_jax.models.chunked_attention import chunk_size, chunked_attention


def _qkv(b, t, d, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  return tuple(jax.random.normal(k, (b, t, d)) for k in keys)


def _reference(q, k, v, scale):
  s = jnp.einsum('btd,bsd->bts', q, k) * scale
  return jnp.einsum('bts,bsd->btd', jax.nn.softmax(s, axis=-1), v)


@pytest.mark.parametrize('budget', [4 * 17 * 17, 3 * 4 * 17 * 17, 2 ** 21])
def test_chunked_attention_values_and_gradients(budget):
  # 12 heads of 17 tokens: chunks of 1, 3 and all 12 heads.
  q, k, v = _qkv(12, 17, 8)
  cot = jax.random.normal(jax.random.key(9), q.shape)
  out, vjp = jax.vjp(lambda *a: chunked_attention(*a, 0.3, budget), q, k, v)
  ref, ref_vjp = jax.vjp(lambda *a: _reference(*a, 0.3), q, k, v)
  np.testing.assert_allclose(out, ref, atol=1e-5)
  for got, want in zip(vjp(cot), ref_vjp(cot)):
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_chunked_attention_is_stable_for_large_logits():
  q, k, v = _qkv(2, 9, 4)
  out = chunked_attention(q * 100, k * 100, v, 1.0)
  assert np.isfinite(np.asarray(out)).all()
  np.testing.assert_allclose(out, _reference(q * 100, k * 100, v, 1.0),
                             atol=1e-4)


def test_chunked_attention_in_bfloat16_follows_float32():
  q, k, v = _qkv(4, 33, 16)
  out = chunked_attention(*(a.astype(jnp.bfloat16) for a in (q, k, v)), 0.25)
  assert out.dtype == jnp.bfloat16
  # bf16 inputs and output: 8 mantissa bits, errors of order 1e-2.
  np.testing.assert_allclose(np.asarray(out, np.float32),
                             _reference(q, k, v, 0.25), atol=3e-2)


def test_chunk_size_divides_and_fits_the_budget():
  assert chunk_size(256, 197) == 8  # base decoder at batch 16: 8 heads
  assert chunk_size(192, 50) == 192  # base encoder: one chunk
  assert chunk_size(7, 300) == 1  # prime count, scores over budget
  for count, length in [(256, 197), (30, 64), (12, 17)]:
    g = chunk_size(count, length)
    assert count % g == 0 and (g == 1 or g * 4 * length ** 2 <= 2 ** 21)


def test_chunked_model_matches_xla_attention_model():
  imgs = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
  noise = jax.random.uniform(jax.random.key(1), (2, 64))
  plain = create_model('mae_vit_tiny_patch8', attention_impl='xla')
  chunked = create_model('mae_vit_tiny_patch8', attention_impl='chunked')
  params = plain.init(jax.random.key(2), imgs, noise=noise)['params']

  def loss(model, p):
    return model.apply({'params': p}, imgs, noise=noise)[0]

  l0, g0 = jax.jit(jax.value_and_grad(lambda p: loss(plain, p)))(params)
  l1, g1 = jax.jit(jax.value_and_grad(lambda p: loss(chunked, p)))(params)
  np.testing.assert_allclose(l1, l0, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_classifier_accepts_chunked_attention():
  x = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
  plain = create_model('vit_tiny_patch8', num_classes=5, attention_impl='xla')
  chunked = create_model('vit_tiny_patch8', num_classes=5,
                         attention_impl='chunked')
  params = plain.init(jax.random.key(1), x)['params']
  np.testing.assert_allclose(chunked.apply({'params': params}, x),
                             plain.apply({'params': params}, x), atol=1e-5)


def test_dense_2d_equals_the_layer_on_3d_input():
  x = jax.random.normal(jax.random.key(0), (3, 5, 8))
  layer = layers.Dense(6)
  params = layer.init(jax.random.key(1), x)['params']

  def f(p, x, flat):
    call = lambda y: layer.apply({'params': p}, y)
    return layers.dense_2d(call, x) if flat else call(x)

  np.testing.assert_allclose(f(params, x, True), f(params, x, False),
                             atol=1e-6)
  g = [jax.grad(lambda p, fl=fl: jnp.sum(jnp.sin(f(p, x, fl))))(params)
       for fl in (True, False)]
  for a, b in zip(jax.tree.leaves(g[0]), jax.tree.leaves(g[1])):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_gelu_erf_form_equals_jax_exact_gelu():
  x = jnp.linspace(-12.0, 12.0, 4001)
  np.testing.assert_allclose(layers.gelu(x), jax.nn.gelu(x, approximate=False),
                             atol=2e-6)
  np.testing.assert_allclose(
      jax.vmap(jax.grad(layers.gelu))(x),
      jax.vmap(jax.grad(lambda y: jax.nn.gelu(y, approximate=False)))(x),
      atol=2e-6)


def test_default_attention_is_chunked_on_cpu_only():
  assert attention_impl('default', 'cpu') == 'chunked'
  assert attention_impl('default', 'gpu') is None
  assert attention_impl('default', 'tpu') is None
  assert attention_impl('cudnn', 'cpu') == 'cudnn'
  assert attention_impl('xla', 'cpu') == 'xla'
