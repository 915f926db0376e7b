"""Two layouts of the transformer blocks' parameters, and moves between them.

Unrolled (canonical): one subtree per block, 'blocks_0' ... 'blocks_{n-1}'
and 'decoder_blocks_0' ...: the layout of a model with scan_blocks=False, of
the official PyTorch key names and of converted files.

Stacked: one subtree 'blocks' (and 'decoder_blocks') whose leaves carry a
leading layer axis of length n, block i at index i: the layout of a model
with scan_blocks=True (nn.scan over the blocks).

Both hold the same numbers. The functions work on a params tree (the value
of variables['params']) of NumPy arrays, jax.Arrays or ShapeDtypeStructs,
return new dicts and never modify their argument.
"""
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

GROUPS = ('blocks', 'decoder_blocks')
_UNROLLED = re.compile(r'^(blocks|decoder_blocks)_(\d+)$')


def is_stacked(name):
  """True when the '/'-joined leaf name lies in a stacked block group (a
  path component is exactly 'blocks' or 'decoder_blocks'): its axis 0 is the
  layer axis. Works on param names and on optimizer-state names alike."""
  return any(part in GROUPS for part in name.split('/'))


def _stack(leaves):
  first = leaves[0]
  if isinstance(first, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct((len(leaves),) + tuple(first.shape),
                                first.dtype)
  if any(isinstance(x, jax.Array) for x in leaves):
    return jnp.stack(leaves)
  return np.stack([np.asarray(x) for x in leaves])


def _take(x, i):
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(tuple(x.shape[1:]), x.dtype)
  return x[i]


def stack_blocks(params):
  """Unrolled -> stacked. A tree already stacked is returned as it is (a
  shallow copy); keys other than the block groups are kept."""
  groups, out = {}, {}
  for key, value in params.items():
    m = _UNROLLED.match(key)
    if m is None:
      out[key] = value
      continue
    group = m.group(1)
    if group in params:
      raise ValueError(f'params hold both {group!r} (stacked) and {key!r} '
                       '(unrolled)')
    if group not in groups:
      groups[group] = {}
      out[group] = None  # keeps the group at its first block's position
    groups[group][int(m.group(2))] = value
  for group, blocks in groups.items():
    indices = sorted(blocks)
    if indices != list(range(len(indices))):
      raise ValueError(f'{group}: block indices {indices} are not 0..'
                       f'{len(indices) - 1}')
    trees = [blocks[i] for i in indices]
    out[group] = jax.tree.map(lambda *xs: _stack(xs), *trees)
  return out


def unstack_blocks(params):
  """Stacked -> unrolled. A tree already unrolled is returned as it is (a
  shallow copy)."""
  out = {}
  for key, value in params.items():
    if key not in GROUPS or not isinstance(value, Mapping):
      out[key] = value
      continue
    sizes = {int(np.shape(x)[0]) if np.ndim(x) else None
             for x in jax.tree.leaves(value)}
    if len(sizes) != 1 or None in sizes:
      raise ValueError(f'{key}: stacked leaves disagree on the layer axis '
                       f'(leading sizes {sorted(map(str, sizes))})')
    for i in range(sizes.pop()):
      out[f'{key}_{i}'] = jax.tree.map(lambda x, i=i: _take(x, i), value)
  return out


def to_layout(params, scan_blocks):
  """Stacked when scan_blocks, else unrolled, whatever the input layout."""
  return stack_blocks(params) if scan_blocks else unstack_blocks(params)
