"""Stacks of transformer blocks, unrolled or scanned: the MAE's encoder and
decoder and the ViT classifier build and run their blocks here.

Unrolled, a stack `name` of depth D is the Blocks `{name}_0` ... `{name}_{D-1}`.
With scan_blocks it is one nn.scan module `name` whose parameters are those
of a Block stacked on a leading layer axis (mae_jax.models.scan_layout
converts between the two layouts): one traced block per stack, so deep
models compile much faster. Stochastic-depth rates rise linearly over the
blocks from 0 to the stack's `drop_path_rate` in both layouts.
"""
import numbers

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mae_jax.models.layers import Block, ScanBlock


def block_class(remat):
  """Block, or Block rematerialised (activations recomputed in backward)."""
  return nn.remat(Block, static_argnums=(2,)) if remat else Block


def scan_block_class(remat, length):
  """ScanBlock lifted by nn.scan over `length` blocks (optionally
  rematerialised per block inside the loop).

  Parameters are stacked on a leading layer axis ('params': 0) and every
  block draws its own 'params' and 'dropout' keys. Instances are called as
  (x, rates) -> (x, None) with rates a (length,) float array of per-block
  stochastic-depth rates.
  """
  body = nn.remat(ScanBlock, prevent_cse=False) if remat else ScanBlock
  return nn.scan(body, variable_axes={'params': 0},
                 split_rngs={'params': True, 'dropout': True},
                 in_axes=0, length=length)


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
  unless deterministic (a scanned stack: as fixed when it was built)."""
  if isinstance(blocks, (list, tuple)):
    for blk in blocks:  # deterministic positional: static under remat
      x = blk(x, deterministic)
    return x
  rates = drop_path_rates(blocks.drop_path_rate, depth)
  x, _ = blocks(x, jnp.asarray(rates, jnp.float32))
  return x


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
    stack(x, jnp.zeros((depth,), jnp.float32))

  def body(h, params):
    h = block.apply({'params': params}, h)
    return h, h
  return jax.lax.scan(body, x, stack.variables['params'])
