"""The pre-norm transformer block, and stacks of them, unrolled or scanned:
the MAE's encoder and decoder, the ViT classifier and ViTPose build and run
their blocks here.

Unrolled, a stack `name` of depth D is the Blocks `{name}_0` ... `{name}_{D-1}`.
With scan_blocks it is one nn.scan module `name` whose parameters are those
of a Block stacked on a leading layer axis (mae_jax.models.scan_layout
converts between the two layouts): one traced block per stack, so deep
models compile much faster. Stochastic-depth rates rise linearly over the
blocks from 0 to the stack's `drop_path_rate` in both layouts.
"""
import functools
import numbers
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mae_jax.models.layers import LN_EPS, Attention, Mlp, pads_odd_tokens


def drop_path(x, rate, rng):
  """Stochastic depth: zeroes whole samples with probability `rate`, rescales
  the rest by 1 / (1 - rate). x: (N, ...)."""
  keep = 1.0 - rate
  shape = (x.shape[0],) + (1,) * (x.ndim - 1)
  mask = jax.random.bernoulli(rng, keep, shape)
  # keep may be a traced float32 rate (scanned blocks): stay in x's dtype.
  return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))


def batch_sharded(x):
  """`x` with its leading (batch) axis split over every axis of the mesh in
  context (`jax.sharding.use_abstract_mesh`), as the training step splits
  its batches; `x` itself outside a mesh context. Pinning the activations
  there makes XLA gather FSDP-sharded weights for each matrix product
  instead of gathering the whole batch's activations (docs/TPU.md,
  "FSDP")."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or x.shape[0] % mesh.size:
    return x
  return jax.lax.with_sharding_constraint(
      x, jax.sharding.PartitionSpec(mesh.axis_names))


def _block_body(blk, x, deterministic, rate, stochastic_depth, lengths):
  """The computation of Block / ScanBlock; submodules belong to `blk`."""
  x = batch_sharded(x)
  kw = dict(dtype=blk.dtype, param_dtype=blk.param_dtype)
  norm = functools.partial(nn.LayerNorm, epsilon=blk.norm_eps, **kw)

  def residual(branch):
    if stochastic_depth and not deterministic:
      branch = drop_path(branch, rate, blk.make_rng('dropout'))
    return x + branch

  x = residual(Attention(blk.num_heads, attention_impl=blk.attention_impl,
                         split_qkv=blk.split_qkv, weight_init=blk.weight_init,
                         fold_qkv_bias=blk.fold_qkv_bias,
                         pad_odd=blk.pad_odd, name='attn',
                         **kw)(norm(name='norm1')(x), lengths))
  hidden = int(x.shape[-1] * blk.mlp_ratio)
  x = residual(Mlp(hidden, weight_init=blk.weight_init, name='mlp',
                   **kw)(norm(name='norm2')(x)))
  return batch_sharded(x)


class Block(nn.Module):
  """Pre-norm transformer block: x + attn(norm1(x)); x + mlp(norm2(x)).

  `drop_path_rate` > 0 applies stochastic depth to both branches when
  `deterministic` is False, drawing from the 'dropout' RNG stream.
  `lengths` (N,) int32: x carries padding rows beyond them (see Attention).
  """
  num_heads: int
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_impl: Any = None
  norm_eps: float = LN_EPS
  split_qkv: bool = True
  weight_init: str = 'mae'  # see layers.WEIGHT_INITS
  fold_qkv_bias: bool = False  # see Attention
  pad_odd: Optional[bool] = None  # see Attention and pads_odd_tokens

  @nn.compact
  def __call__(self, x, deterministic=True, lengths=None):
    return _block_body(self, x, deterministic, self.drop_path_rate,
                       self.drop_path_rate > 0, lengths)


class ScanBlock(Block):
  """Block as the body of nn.scan: (x, rate, lengths) -> (x, None).

  `rate` is this block's stochastic-depth rate, a scanned input, so every
  block of a stack gets its own; the field `drop_path_rate` only switches
  stochastic depth on (> 0). `deterministic` is a field, not an argument,
  because nn.scan passes only arrays through the loop. Parameters and
  submodule names are those of Block.
  """
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, rate,  # pylint: disable=arguments-renamed
               lengths=None):
    return _block_body(self, x, self.deterministic, rate,
                       self.drop_path_rate > 0, lengths), None


def block_class(remat):
  """Block, or Block rematerialised (activations recomputed in backward)."""
  return nn.remat(Block, static_argnums=(2,)) if remat else Block


def scan_block_class(remat, length):
  """ScanBlock lifted by nn.scan over `length` blocks (optionally
  rematerialised per block inside the loop).

  Parameters are stacked on a leading layer axis ('params': 0) and every
  block draws its own 'params' and 'dropout' keys. Instances are called as
  (x, rates, lengths) -> (x, None) with rates a (length,) float array of
  per-block stochastic-depth rates and lengths None or the (N,) real token
  counts of a padded x, the same for every block.
  """
  body = nn.remat(ScanBlock, prevent_cse=False) if remat else ScanBlock
  return nn.scan(body, variable_axes={'params': 0},
                 split_rngs={'params': True, 'dropout': True},
                 in_axes=(0, nn.broadcast), length=length)


def drop_path_rates(drop_path_rate, depth):
  """Per-block stochastic-depth rates: linear from 0 to drop_path_rate."""
  return np.linspace(0, drop_path_rate, depth)


def block_fields(owner):
  """The Block fields a model `owner` sets for all its blocks: mlp_ratio,
  attention_impl, split_qkv, fold_qkv_bias, dtype, param_dtype, norm_eps,
  weight_init."""
  return dict(mlp_ratio=owner.mlp_ratio, attention_impl=owner.attention_impl,
              split_qkv=owner.split_qkv, fold_qkv_bias=owner.fold_qkv_bias,
              dtype=owner.dtype, param_dtype=owner.param_dtype,
              norm_eps=owner.norm_eps, weight_init=owner.weight_init)


def block_stack(owner, name, depth, num_heads, drop_path_rate=0.0,
                deterministic=True):
  """The blocks of a stack with the settings of the module `owner`
  (`block_fields`, remat, scan_blocks),
  created in its setup or compact method: a list of Blocks named
  `{name}_{i}`, or with scan_blocks one scanned module named `name`
  (`deterministic` fixes its stochastic depth off or on; unrolled blocks
  take it per call)."""
  kw = block_fields(owner)
  if owner.scan_blocks:
    return scan_block_class(owner.remat, depth)(
        num_heads, drop_path_rate=drop_path_rate, deterministic=deterministic,
        name=name, **kw)
  rates = drop_path_rates(drop_path_rate, depth)
  return [block_class(owner.remat)(num_heads, drop_path_rate=float(rate),
                                   name=f'{name}_{i}', **kw)
          for i, rate in enumerate(rates)]


def run_stack(blocks, x, depth, deterministic=True):
  """x through a `block_stack` of `depth` blocks, with stochastic depth
  unless deterministic (a scanned stack: as fixed when it was built).

  Where attention needs an even token count (`pads_odd_tokens`: cuDNN's
  kernel and an odd T, e.g. the 197 tokens of the decoder at 224 px), x is
  padded by one token here, once for the stack, and every block masks it
  as a key; it is dropped after the last block. The blocks' values and
  gradients are those of the unpadded tokens (the pad row's gradient is
  zero), without a pad and a slice around each block's attention."""
  unrolled = isinstance(blocks, (list, tuple))
  if unrolled and not blocks:  # depth 0
    return x
  first = blocks[0] if unrolled else blocks
  n, t = x.shape[:2]
  lengths = None
  if pads_odd_tokens(first.attention_impl, t, first.pad_odd):
    lengths = jnp.full((n,), t, jnp.int32)
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 0)))
  if unrolled:
    for blk in blocks:  # deterministic positional: static under remat
      x = blk(x, deterministic, lengths)
  else:
    rates = drop_path_rates(blocks.drop_path_rate, depth)
    x, _ = blocks(x, jnp.asarray(rates, jnp.float32), lengths)
  return x if lengths is None else x[:, :t]


def run_stack_keeping(blocks, x, depth, wanted, plain):
  """`run_stack`, deterministic, that also returns the outputs of the blocks
  `wanted` (indices in [0, depth)): (x, [outputs]). `plain` is an unbound
  Block with the stack's fields (`plain_block`), run over the stacked
  params of a scanned stack."""
  if isinstance(blocks, (list, tuple)):
    every = []
    for blk in blocks:
      x = blk(x, True)
      every.append(x)
  else:
    x, every = scanned_block_outputs(blocks, x, plain, depth)
  return x, [every[i] for i in wanted]


def layer_indices(indices, depth):
  """A sequence of block indices, negative ones counting from the end ->
  ints in [0, depth), in the order given. Indices are static Python ints."""
  if not isinstance(indices, (list, tuple)):
    raise ValueError(f'layers={indices!r} must be a list or tuple of block '
                     'indices')
  out = []
  for i in indices:
    if (not isinstance(i, numbers.Integral) or isinstance(i, bool)
        or not -depth <= i < depth):
      raise ValueError(f'layer index {i!r} is not a block index: a Python '
                       f'int in [-{depth}, {depth})')
    out.append(int(i) % depth)
  return out


def plain_block(owner, num_heads):
  """An unbound, deterministic Block with the settings of the module
  `owner` (`block_fields`)."""
  return Block(num_heads, parent=None, **block_fields(owner))


def scanned_block_outputs(stack, x, block, depth):
  """Runs the bound stack of `depth` blocks `stack` (built by
  `scan_block_class`) deterministically, keeping every block's output.

  `block` is an unbound Block with the stack's fields (`plain_block`); it is
  applied to each layer's slice of the stacked params in a lax.scan, so the
  depth is not unrolled. Returns (x, outputs) with outputs (depth, N, T, D),
  outputs[i] the output of block i.
  """
  if stack.is_initializing():  # creates the stacked params
    stack(x, jnp.zeros((depth,), jnp.float32), None)

  def body(h, params):
    h = block.apply({'params': params}, h)
    return h, h
  return jax.lax.scan(body, x, stack.variables['params'])
