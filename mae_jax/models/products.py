"""Dense and convolution layers whose parameter gradients are summed in the
parameters' dtype.

With bfloat16 compute and float32 parameters, autodiff of
`x @ kernel.astype(bf16)` computes the kernel's gradient as a bfloat16
product and converts it to float32 afterwards. Where the batch is split
over devices, XLA then sums the per-device gradients in bfloat16 (the
all-reduce sits between the product and the convert), and the
data-parallel gradient is rounded to bfloat16's 8 significant bits. The
official PyTorch code all-reduces float32 gradients. Here the kernels' and
biases' gradients come from products and sums that accumulate and return
the parameters' dtype (float32), so a cross-device sum is float32 too. The
forward pass and the input's gradient are autodiff's, in the compute
dtype.
"""
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

_CONV_DIMS = ('NHWC', 'HWIO', 'NHWC')


def _dtype(a):
  return None if a is None else a.dtype


def _with_vjp(forward, backward, dtype):
  """jax.custom_vjp of forward(x, kernel, bias). backward(xc, kc, g, wants)
  gets the operands and the output's cotangent cast to `dtype` and computes
  only the gradients `wants` (flags for x, kernel, bias) asks for: an
  operand that is not differentiated (the images entering the patch
  embedding, a frozen kernel) gets none, as under autodiff, so no dead
  products are traced (and counted by mae_jax.train.cost)."""

  def fwd(x, kernel, bias):
    wants = (x.perturbed, kernel.perturbed,
             bias is not None and bias.perturbed)
    x, kernel = x.value, kernel.value
    bias = None if bias is None else bias.value
    # residuals: an operand's cast is kept only where a product needs it
    res = (x.astype(dtype) if wants[1] else None,
           kernel.astype(dtype) if wants[0] else None,
           tuple(() if w else None for w in wants))
    return forward(x, kernel, bias), res

  def bwd(res, g):
    xc, kc, flags = res
    wants = tuple(f is not None for f in flags)
    return backward(xc, kc, g.astype(dtype), wants)

  core = jax.custom_vjp(forward)
  core.defvjp(fwd, bwd, symbolic_zeros=True)
  return core


def linear(x, kernel, bias, dtype):
  """x (..., K) @ kernel (K, F) + bias (F,), computed in `dtype`; bias may be
  None. Gradients: x's in x's dtype; kernel's and bias's accumulated and
  returned in their own dtypes."""
  return _linear_in(jnp.dtype(dtype), x.dtype, kernel.dtype,
                    _dtype(bias))(x, kernel, bias)


@functools.lru_cache(maxsize=None)
def _linear_in(dtype, x_dtype, kernel_dtype, bias_dtype):
  """`linear` for one compute dtype and the operands' dtypes, with its VJP."""

  def forward(x, kernel, bias):
    y = jax.lax.dot_general(x.astype(dtype), kernel.astype(dtype),
                            (((x.ndim - 1,), (0,)), ((), ())))
    return y if bias is None else y + bias.astype(dtype)

  def backward(xc, kc, g, wants):
    rows = tuple(range(g.ndim - 1))
    dx = dk = db = None
    if wants[0]:
      dx = jax.lax.dot_general(g, kc, (((g.ndim - 1,), (1,)), ((), ())))
      dx = dx.astype(x_dtype)
    if wants[1]:
      dk = jax.lax.dot_general(xc, g, ((rows, rows), ((), ())),
                               preferred_element_type=kernel_dtype)
    if wants[2]:
      db = jnp.sum(g, rows, dtype=bias_dtype)
    return dx, dk, db

  return _with_vjp(forward, backward, dtype)


def conv(x, kernel, bias, dtype):
  """Stride-1 'VALID' convolution, NHWC: x (N, H, W, C) * kernel
  (kh, kw, C, F) + bias (F,) -> (N, H - kh + 1, W - kw + 1, F), computed in
  `dtype`; bias may be None. Gradients as for `linear`: the kernel's is kh
  x kw products over (N, h, w), each accumulated in the kernel's dtype."""
  return _conv_in(jnp.dtype(dtype), x.dtype, kernel.dtype,
                  _dtype(bias))(x, kernel, bias)


def _plain_conv(x, kernel):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), 'VALID',
                                      dimension_numbers=_CONV_DIMS)


@functools.lru_cache(maxsize=None)
def _conv_in(dtype, x_dtype, kernel_dtype, bias_dtype):
  """`conv` for one compute dtype and the operands' dtypes, with its VJP."""

  def forward(x, kernel, bias):
    y = _plain_conv(x.astype(dtype), kernel.astype(dtype))
    return y if bias is None else y + bias.astype(dtype)

  def backward(xc, kc, g, wants):
    dx = dk = db = None
    if wants[0]:
      shape = g.shape[:1] + tuple(
          n + k - 1 for n, k in zip(g.shape[1:3], kc.shape[:2])) + (
              kc.shape[2],)
      dx = jax.linear_transpose(lambda x_: _plain_conv(x_, kc),
                                jax.ShapeDtypeStruct(shape, dtype))(g)[0]
      dx = dx.astype(x_dtype)
    if wants[1]:
      _, h, w, _ = g.shape
      over_nhw = (((0, 1, 2), (0, 1, 2)), ((), ()))
      dk = jnp.stack([jnp.stack([
          jax.lax.dot_general(xc[:, a:a + h, b:b + w], g, over_nhw,
                              preferred_element_type=kernel_dtype)
          for b in range(xc.shape[2] - w + 1)])
                      for a in range(xc.shape[1] - h + 1)])
    if wants[2]:
      db = jnp.sum(g, (0, 1, 2), dtype=bias_dtype)
    return dx, dk, db

  return _with_vjp(forward, backward, dtype)


def broadcast_cast(param, shape, dtype):
  """`param` broadcast to `shape`, then cast to `dtype`: its gradient is
  summed over the broadcast axes in the parameter's dtype (casting first
  would sum it in `dtype`). For tokens and position tables added to every
  example."""
  return jnp.broadcast_to(param, shape).astype(dtype)


class _Layer(nn.Module):
  """Fields and parameters ('kernel', 'bias' (F,)) shared by Dense and Conv."""
  features: int
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _params(self, kernel_shape):
    return (self.param('kernel', self.kernel_init, kernel_shape,
                       self.param_dtype),
            self.param('bias', self.bias_init, (self.features,),
                       self.param_dtype))


class Dense(_Layer):
  """nn.Dense's parameters ('kernel' (K, F), 'bias' (F,)) and function,
  computed by `linear`: (..., K) -> (..., F). Kernel init Xavier-uniform."""
  kernel_init: Callable = nn.initializers.xavier_uniform()

  @nn.compact
  def __call__(self, x):
    kernel, bias = self._params((x.shape[-1], self.features))
    return linear(x, kernel, bias, self.dtype)


class Conv(_Layer):
  """nn.Conv's parameters ('kernel' (k, k, C, F), 'bias' (F,)) for a k x k,
  stride-1 convolution with `padding` zeros on each side, computed by
  `conv`: (N, H, W, C) -> (N, H + 2 * padding - k + 1, ..., F)."""
  kernel_size: int = 1
  padding: int = 0

  @nn.compact
  def __call__(self, x):
    k, p = self.kernel_size, self.padding
    kernel, bias = self._params((k, k, x.shape[-1], self.features))
    x = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    return conv(x, kernel, bias, self.dtype)
