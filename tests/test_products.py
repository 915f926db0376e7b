"""Dense and convolution products whose parameter gradients are summed in
the parameters' dtype (mae_jax.models.products)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mae_jax.models import products
from mae_jax.train import cost

F32, BF16 = jnp.float32, jnp.bfloat16


def _operands(kernel_shape, x_shape, seed=0):
  kx, kk, kb = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, x_shape, F32)
  kernel = jax.random.normal(kk, kernel_shape, F32) * 0.3
  bias = jax.random.normal(kb, kernel_shape[-1:], F32)
  return x, kernel, bias


def _plain_linear(x, kernel, bias, dtype):
  return x.astype(dtype) @ kernel.astype(dtype) + bias.astype(dtype)


def _plain_conv(x, kernel, bias, dtype):
  y = jax.lax.conv_general_dilated(
      x.astype(dtype), kernel.astype(dtype), (1, 1), 'VALID',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return y + bias.astype(dtype)


CASES = {
    'linear': (products.linear, _plain_linear, (12, 5), (3, 7, 12)),
    'conv3x3': (products.conv, _plain_conv, (3, 3, 4, 6), (2, 9, 8, 4)),
    'conv2x2': (products.conv, _plain_conv, (2, 2, 4, 6), (2, 5, 7, 4)),
}


def _grads(fn, x, kernel, bias, dtype, cotangent):
  y, vjp = jax.vjp(lambda *a: fn(*a, dtype), x, kernel, bias)
  return y, vjp(cotangent.astype(y.dtype))


@pytest.mark.parametrize('case', sorted(CASES))
def test_products_give_autodiffs_values_and_gradients_in_float32(case):
  fn, plain, kernel_shape, x_shape = CASES[case]
  x, kernel, bias = _operands(kernel_shape, x_shape)
  y_ref = plain(x, kernel, bias, F32)
  g = jax.random.normal(jax.random.key(1), y_ref.shape, F32)
  y, grads = _grads(fn, x, kernel, bias, F32, g)
  y_ref, grads_ref = _grads(plain, x, kernel, bias, F32, g)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  for got, want in zip(grads, grads_ref):
    assert got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('case', sorted(CASES))
def test_bf16_products_sum_parameter_gradients_in_float32(case):
  """With bfloat16 compute, the kernel's and bias's gradients are the
  float32 sums of the bfloat16 operands' products (autodiff rounds them to
  bfloat16); the forward values and the input's gradient are autodiff's."""
  fn, plain, kernel_shape, x_shape = CASES[case]
  x, kernel, bias = _operands(kernel_shape, x_shape)
  g = jax.random.normal(jax.random.key(1),
                        plain(x, kernel, bias, F32).shape, F32)
  y, (dx, dk, db) = _grads(fn, x, kernel, bias, BF16, g)
  y_ref, (dx_ref, dk_ref, db_ref) = _grads(plain, x, kernel, bias, BF16, g)
  assert y.dtype == BF16 and dk.dtype == F32 and db.dtype == F32
  np.testing.assert_array_equal(y, y_ref)
  np.testing.assert_array_equal(dx, dx_ref)
  # the float32 gradients of the same (bf16-rounded) operands
  xr = x.astype(BF16).astype(F32)
  gr = g.astype(BF16).astype(F32)
  _, (_, dk_exact, db_exact) = _grads(plain, xr, kernel.astype(BF16).astype(
      F32), bias, F32, gr)
  ours = float(jnp.max(jnp.abs(dk - dk_exact)))
  autodiff = float(jnp.max(jnp.abs(dk_ref - dk_exact)))
  scale = float(jnp.max(jnp.abs(dk_exact)))
  assert ours <= 1e-5 * scale, (ours, scale)
  assert autodiff > 5e-4 * scale, (autodiff, scale)  # rounded to 8 bits
  np.testing.assert_allclose(db, db_exact, rtol=1e-5, atol=1e-5)
  assert float(jnp.max(jnp.abs(db_ref - db_exact))) > 1e-4


def test_products_without_bias_give_no_bias_gradient():
  x, kernel, _ = _operands((12, 5), (3, 12))
  y, vjp = jax.vjp(lambda x_, k_: products.linear(x_, k_, None, BF16),
                   x, kernel)
  np.testing.assert_array_equal(y, _plain_linear(x, kernel, jnp.zeros(5), BF16))
  dx, dk = vjp(jnp.ones_like(y))
  assert dx.dtype == F32 and dk.dtype == F32


@pytest.mark.parametrize('case', sorted(CASES))
def test_an_operand_not_differentiated_costs_no_product(case):
  """The gradient for the kernel alone, or the input's alone, costs the
  products autodiff's does (the images entering the patch embedding need
  no gradient): the kernel's is one product the size of the forward one.
  (A transposed convolution is counted over its padded input.)"""
  fn, plain, kernel_shape, x_shape = CASES[case]
  x, kernel, bias = _operands(kernel_shape, x_shape)
  forward = cost.matmul_flops(lambda k: fn(x, k, bias, BF16), kernel)
  for wrt in (0, 1):
    ours = cost.matmul_flops(jax.grad(
        lambda *a: fn(*a, bias, BF16).astype(F32).sum(), wrt), x, kernel)
    autodiff = cost.matmul_flops(jax.grad(
        lambda *a: plain(*a, bias, BF16).astype(F32).sum(), wrt), x, kernel)
    assert ours == autodiff, (wrt, ours, autodiff)
    if wrt == 1:
      assert ours == 2 * forward, (ours, forward)


def test_broadcast_cast_sums_its_gradient_in_the_parameters_dtype():
  token = jnp.full((1, 1, 4), 0.5, F32)
  # 4095 * (1 + 2^-7) = 4126.99..., exact in float32; bfloat16 keeps 8
  # significant bits
  g = jnp.full((4095, 1, 4), 1.0 + 2 ** -7, BF16)
  _, vjp = jax.vjp(lambda t: products.broadcast_cast(t, g.shape, BF16),
                   token)
  (dt,) = vjp(g)
  assert dt.dtype == F32
  np.testing.assert_array_equal(dt, np.full((1, 1, 4), 4095 * (1 + 2 ** -7)))
  _, vjp_cast_first = jax.vjp(
      lambda t: jnp.broadcast_to(t.astype(BF16), g.shape), token)
  assert float(vjp_cast_first(g)[0][0, 0, 0]) != 4095 * (1 + 2 ** -7)


def test_dense_and_conv_keep_flax_parameter_names_and_shapes():
  x = jnp.ones((2, 6, 5, 3))
  dense = products.Dense(4).init(jax.random.key(0), x)['params']
  assert {k: v.shape for k, v in dense.items()} == {'kernel': (3, 4),
                                                     'bias': (4,)}
  conv = products.Conv(4, kernel_size=3, padding=1)
  params = conv.init(jax.random.key(0), x)['params']
  assert {k: v.shape for k, v in params.items()} == {'kernel': (3, 3, 3, 4),
                                                      'bias': (4,)}
  assert conv.apply({'params': params}, x).shape == (2, 6, 5, 4)
