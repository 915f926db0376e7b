"""Transformer building blocks shared by the MAE, the ViT classifier and
ViTPose.

Linear layers: zero bias, weights Xavier-uniform or, in the blocks, as
`weight_init` chooses (WEIGHT_INITS); LayerNorm eps 1e-6
(a model's `norm_eps` field can set another); exact (erf) GELU. `dtype` is
the compute dtype, `param_dtype` the storage one; the linear layers'
parameter gradients are summed in param_dtype (mae_jax.models.products).
"""
import functools
from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from mae_jax.models.chunked_attention import chunked_attention
from mae_jax.models.geometry import (grid_hw, model_input_shape,
                                     normalize_img_size)
from mae_jax.models.masking import gather_tokens
from mae_jax.models.patches import patchify
from mae_jax.models.products import Dense, linear

LN_EPS = 1e-6
# Initialisation of the blocks' linear kernels and the patch embedding, by
# `weight_init`: 'mae' as the official MAE (Xavier uniform, the patch kernel
# as a linear layer, zero biases); 'vitpose' as the official ViTPose backbone
# trained from scratch (linear kernels timm's trunc_normal_(std=0.02), cut at
# +-2 absolute, so a plain N(0, 0.02); the patch convolution PyTorch's
# default, weights and bias U(+-1/sqrt(fan_in))).
WEIGHT_INITS = ('mae', 'vitpose')
_LINEAR_INIT = {'mae': nn.initializers.xavier_uniform(),
                'vitpose': nn.initializers.normal(0.02)}


def linear_init(weight_init):
  """Kernel initialiser of the blocks' linear layers for `weight_init`."""
  if weight_init not in _LINEAR_INIT:
    raise ValueError(f'weight_init={weight_init!r} is not one of '
                     f'{", ".join(WEIGHT_INITS)}')
  return _LINEAR_INIT[weight_init]


def gelu(x):
  """Exact GELU, x * Phi(x), written with erf as PyTorch's nn.GELU() is
  (jax.nn.gelu uses erfc, which XLA:CPU evaluates more slowly)."""
  return x * 0.5 * (1.0 + jax.lax.erf(x * jnp.asarray(2 ** -0.5, x.dtype)))


def dense_2d(layer, x):
  """layer(x) for x (..., D) with the leading axes flattened first.

  Same values as layer(x); the weight gradient then is a plain 2-D dot,
  where a 3-D input makes XLA:CPU transpose both of its operands first.
  """
  y = layer(x.reshape(-1, x.shape[-1]))
  return y.reshape(*x.shape[:-1], y.shape[-1])


class PatchEmbed(nn.Module):
  """p x p convolution with stride p, computed as a matmul on patch vectors.

  The kernel is stored as a conv kernel (p, p, C, D); with weight_init 'mae'
  it is initialised Xavier-uniform as a linear layer of fan_in p*p*C and
  fan_out D (zero bias), with 'vitpose' as PyTorch's Conv2d default.
  (N, H, W, C) images -> (N, L, D) tokens; with `keep` (N, K) patch indices
  only those patches are embedded: (N, K, D), as the masking gather of the
  embedded tokens would give, for K/L of the matmul.
  """
  patch_size: int
  embed_dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  weight_init: str = 'mae'

  @nn.compact
  def __call__(self, imgs, keep=None):
    p, c = self.patch_size, imgs.shape[-1]
    linear_init(self.weight_init)  # checks the name
    if self.weight_init == 'mae':
      init = nn.initializers.variance_scaling(
          1.0, 'fan_avg', 'uniform', in_axis=(0, 1, 2), out_axis=3)
      bias_init = nn.initializers.zeros
    else:  # PyTorch's Conv2d default: U(+-1/sqrt(fan_in)) for both
      init = nn.initializers.variance_scaling(
          1 / 3, 'fan_in', 'uniform', in_axis=(0, 1, 2), out_axis=3)
      bound = (p * p * c) ** -0.5

      def bias_init(key, shape, dtype):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    kernel = self.param('kernel', init, (p, p, c, self.embed_dim),
                        self.param_dtype)
    bias = self.param('bias', bias_init, (self.embed_dim,), self.param_dtype)
    x = patchify(imgs.astype(self.dtype), p)  # (N, L, p*p*C)
    if keep is not None:
      x = gather_tokens(x, keep)  # (N, K, p*p*C)
    return linear(x, kernel.reshape(p * p * c, self.embed_dim), bias,
                  self.dtype)


class QKV(nn.Module):
  """The fused qkv projection (kernel (D, 3D) initialised by `weight_init`,
  see WEIGHT_INITS; bias (3D), zero), computed as three matmuls on the
  kernel's column blocks: (N, T, D) -> q, k, v (N, T, H, hd) each, every one
  a whole array, so an attention kernel takes them with no copies (one
  matmul and slices of its (N, T, 3, H, hd) output copy q, k and v out, and
  the backward pass concatenates their gradients).

  With fold_bias, k and v come without their biases, and the call returns
  (q, k, v, v's bias (D,), in param_dtype) for Attention to fold (see
  Attention)."""
  num_heads: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  weight_init: str = 'mae'
  fold_bias: bool = False

  @nn.compact
  def __call__(self, x):
    n, t, d = x.shape
    kernel = self.param('kernel', linear_init(self.weight_init), (d, 3 * d),
                        self.param_dtype)
    stored_bias = self.param('bias', nn.initializers.zeros, (3 * d,),
                             self.param_dtype)
    x = x.reshape(n * t, d)
    out = []
    for i in range(3):
      part = slice(i * d, (i + 1) * d)
      bias = stored_bias[part] if i == 0 or not self.fold_bias else None
      y = linear(x, kernel[:, part], bias, self.dtype)
      out.append(y.reshape(n, t, self.num_heads, d // self.num_heads))
    return (*out, stored_bias[2 * d:]) if self.fold_bias else tuple(out)


class OutProj(nn.Module):
  """The attention's output projection, nn.Dense's parameters ('kernel'
  (D, D), 'bias' (D)), with `extra_bias` (D,) added to the input's side of
  the product: (x + extra_bias) @ kernel + bias, computed as x @ kernel +
  (extra_bias @ kernel + bias), one (D,) x (D, D) product in param_dtype
  instead of an add over every token. (N, T, D) -> same."""
  weight_init: str = 'mae'
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, extra_bias):
    d = x.shape[-1]
    kernel = self.param('kernel', linear_init(self.weight_init), (d, d),
                        self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, (d,), self.param_dtype)
    y = linear(x.reshape(-1, d), kernel, extra_bias @ kernel + bias,
               self.dtype)
    return y.reshape(x.shape)


def pads_odd_tokens(attention_impl, t, pad_odd=None):
  """Whether attention over t tokens runs on t + 1, the last a key that
  every query ignores: for an odd t where cuDNN's fused kernel runs (it
  refuses odd lengths when training), or as `pad_odd` says; never for
  'chunked'."""
  if attention_impl == 'chunked' or not t % 2:
    return False
  if pad_odd is not None:
    return pad_odd
  return implementation_for(attention_impl, t) == 'cudnn'


def implementation_for(attention_impl, t):
  """The jax.nn.dot_product_attention implementation for a sequence of t
  tokens: 'cudnn_long' is cuDNN's fused kernel from 128 tokens on and XLA's
  below (where the fused kernel's tiles are mostly empty); 'chunked' is
  handled by Attention; others as given (None: XLA's default)."""
  if attention_impl == 'cudnn_long':
    return 'cudnn' if t >= 128 else 'xla'
  return attention_impl


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv projection. (N, T, D) -> same.

  attention_impl: None (XLA's default), 'xla' or 'cudnn' select
  jax.nn.dot_product_attention's implementation, 'cudnn_long' cuDNN for
  sequences of 128 tokens or more and XLA below; 'chunked' computes the
  same attention a few heads at a time (mae_jax.models.chunked_attention,
  faster on CPUs). split_qkv: q, k and v from three matmuls (QKV) rather
  than slices of one (same parameters). cuDNN's fused kernel refuses an odd
  T when training (197 tokens for 224 px / 16, 65 for the huge encoder), so
  there (or with pad_odd=True, see `pads_odd_tokens`) the tokens are padded
  by one, a key the seq-length mask hides from every query, and the padded
  row is dropped after the output projection. The padded row is itself a
  query over the real keys, so its output is defined (a fused kernel may
  leave a masked query's row unwritten), and its gradient is zero.

  `lengths` (N,) int32, given by a stack that padded its input once
  (mae_jax.models.blocks.run_stack): x carries padding rows beyond
  `lengths`, which are masked as keys and kept in the output.

  fold_qkv_bias (needs split_qkv; the 'chunked' path computes the plain
  form): the same function with two of the three bias adds over every
  token gone. k's bias adds q . b_k to every score of a query, which
  softmax cancels, so k is computed without it (its gradient is then
  exactly zero, where autodiff of the plain form gives rounding noise);
  each attention output row is a convex combination of v's rows, so v's
  bias passes through attention unchanged and is folded into the output
  projection's bias (b_v @ W_proj + b_proj). Same parameters and
  checkpoints; outputs differ by float rounding.
  """
  num_heads: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_impl: Any = None
  split_qkv: bool = True
  pad_odd: Optional[bool] = None
  weight_init: str = 'mae'
  fold_qkv_bias: bool = False

  @nn.compact
  def __call__(self, x, lengths=None):
    n, t, d = x.shape
    if d % self.num_heads:
      raise ValueError(f'width {d} is not divisible by '
                       f'num_heads={self.num_heads}')
    head_dim = d // self.num_heads
    dense = functools.partial(Dense, dtype=self.dtype,
                              param_dtype=self.param_dtype,
                              kernel_init=linear_init(self.weight_init))
    if self.fold_qkv_bias and not self.split_qkv:
      raise ValueError('fold_qkv_bias needs split_qkv=True')
    if self.attention_impl == 'chunked':
      if lengths is not None:
        raise ValueError("attention_impl='chunked' takes no lengths")
      qkv = dense_2d(dense(3 * d, name='qkv'), x)
      q, k, v = qkv.reshape(n, t, 3, self.num_heads, head_dim).transpose(
          2, 0, 3, 1, 4).reshape(3, n * self.num_heads, t, head_dim)
      out = chunked_attention(q, k, v, head_dim ** -0.5)
      out = out.reshape(n, self.num_heads, t, head_dim).transpose(0, 2, 1, 3)
      return dense_2d(dense(d, name='proj'), out.reshape(n, t, d))
    implementation = implementation_for(self.attention_impl, t)
    pad = lengths is None and pads_odd_tokens(self.attention_impl, t,
                                              self.pad_odd)
    if pad:
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 0)))
      lengths = jnp.full((n,), t, jnp.int32)
    rows = x.shape[1]
    if self.split_qkv:
      q, k, v, *v_bias = QKV(self.num_heads, dtype=self.dtype,
                             param_dtype=self.param_dtype,
                             weight_init=self.weight_init,
                             fold_bias=self.fold_qkv_bias, name='qkv')(x)
    else:
      qkv = dense_2d(dense(3 * d, name='qkv'), x).reshape(
          n, rows, 3, self.num_heads, head_dim)
      q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (N, T, H, hd)
    out = jax.nn.dot_product_attention(
        q, k, v, scale=head_dim ** -0.5, key_value_seq_lengths=lengths,
        implementation=implementation)
    out = out.reshape(n, rows, d)
    if self.fold_qkv_bias:
      out = OutProj(self.weight_init, dtype=self.dtype,
                    param_dtype=self.param_dtype, name='proj')(out, *v_bias)
    else:
      out = dense_2d(dense(d, name='proj'), out)
    return out[:, :t] if pad else out


class Mlp(nn.Module):
  """fc1 (D -> hidden) -> exact GELU -> fc2 (hidden -> D). (N, T, D) -> same."""
  hidden_dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  weight_init: str = 'mae'

  @nn.compact
  def __call__(self, x):
    dense = functools.partial(Dense, dtype=self.dtype,
                              param_dtype=self.param_dtype,
                              kernel_init=linear_init(self.weight_init))
    width = x.shape[-1]
    x = dense_2d(dense(self.hidden_dim, name='fc1'), x)
    x = gelu(x)
    return dense_2d(dense(width, name='fc2'), x)


class ImageInput(nn.Module):
  """Base of the image models (the MAE and the ViT classifier): the fields
  they share, img_size normalised at construction (an int, or an (H, W)
  tuple), the patch grid, and the check of the NHWC images given."""
  img_size: Union[int, Sequence[int]] = 224
  patch_size: int = 16
  in_chans: int = 3
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  # None/'xla', 'cudnn' or 'cudnn_long' (GPU), 'chunked' (see Attention)
  attention_impl: Optional[str] = None
  split_qkv: bool = True  # q, k, v from three matmuls (see Attention)
  fold_qkv_bias: bool = False  # k's and v's bias adds folded (see Attention)
  weight_init: str = 'mae'  # initialisation of the blocks (WEIGHT_INITS)
  remat: bool = False  # recompute block activations in the backward pass
  # nn.scan over the blocks: one traced block per stack (much faster
  # compiles of deep models); the params of a stack ('blocks',
  # 'decoder_blocks') are stacked on a leading layer axis (see
  # mae_jax.models.scan_layout); per-block drop-path rates are scanned.
  scan_blocks: bool = False
  norm_eps: float = LN_EPS  # of every LayerNorm (1e-6 as the official code)

  def __post_init__(self):
    self.img_size = normalize_img_size(self.img_size)
    linear_init(self.weight_init)  # an unknown name fails at construction
    super().__post_init__()

  @property
  def grid_size(self):
    """(gh, gw): patch rows and columns."""
    return grid_hw(self.img_size, self.patch_size)

  @property
  def num_patches(self):
    gh, gw = self.grid_size
    return gh * gw

  def _check_images(self, imgs):
    expected = model_input_shape(self)
    if imgs.ndim != 4 or tuple(imgs.shape[1:]) != expected:
      raise ValueError(f'images of shape {tuple(imgs.shape)} do not match '
                       f'img_size={self.img_size} with in_chans='
                       f'{self.in_chans} (expected (N, {expected[0]}, '
                       f'{expected[1]}, {expected[2]}), NHWC)')
