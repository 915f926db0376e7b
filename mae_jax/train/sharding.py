"""Device mesh from the config and a rule table mapping arrays to shardings.

Mesh axes are ('data', 'fsdp'). Batches are split over both axes; parameters
and optimizer state are replicated or sharded over 'fsdp' by a rule table of
(regex on the '/'-joined path, rule) pairs, first match wins:
  'fsdp'       shard the largest dimension divisible by the fsdp axis size;
  'fsdp_rows'  shard the first (input) dimension if it divides, else as
               'fsdp';
  'replicate'  keep a full copy on every device.
The attention's qkv kernels (D, 3D) are sharded by rows: their q, k and v
column blocks (mae_jax.models.layers.QKV) then stay whole on every device,
and so do the blocks of their float32 gradient; sharded by columns, the
blocks straddled the shards and XLA gathered the gradient blocks across
devices (in float32 since the gradients are; measured on MAE-base with
FSDP over 4 v5e chips: 869 MiB of collectives per step by columns, 733 by
rows; docs/TPU.md, benchmarks/tpu_table.py).
The layer axis (axis 0) of stacked block params (scan_blocks, see
mae_jax.models.scan_layout) is never sharded: nn.scan slices it one block
per iteration, and a dynamic slice along a sharded axis makes XLA gather the
whole operand, undoing what FSDP saves. The rule picks the largest other
dimension instead (in every registry model a block dimension is larger than
the depth anyway).
"""
import re

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from mae_jax.models.scan_layout import is_stacked
from mae_jax.errors import ConfigError
from mae_jax.tree import map_with_name

AXES = ('data', 'fsdp')
BATCH_SPEC = P(AXES)
DEFAULT_RULES = (('qkv/kernel$', 'fsdp_rows'), ('.*', 'fsdp'))


def make_mesh(mesh_shape, devices=None):
  """(data, fsdp) mesh; one entry may be -1 (all remaining devices)."""
  devices = jax.devices() if devices is None else devices
  shape = list(mesh_shape)
  if len(shape) != 2:
    raise ConfigError(f'mesh={tuple(mesh_shape)} must have two entries '
                      '(data, fsdp)')
  if shape.count(-1) > 1:
    raise ConfigError(f'mesh={tuple(mesh_shape)} may hold at most one -1')
  if -1 in shape:
    known = int(np.prod([s for s in shape if s != -1]))
    if len(devices) % known:
      raise ConfigError(f'mesh={tuple(mesh_shape)} does not divide the '
                        f'{len(devices)} devices')
    shape[shape.index(-1)] = len(devices) // known
  if int(np.prod(shape)) != len(devices):
    raise ConfigError(f'mesh={tuple(mesh_shape)} needs {int(np.prod(shape))} '
                      f'devices but {len(devices)} are present; use -1 for '
                      'one axis to take the rest')
  return jax.make_mesh(tuple(shape), AXES, devices=devices,
                       axis_types=(AxisType.Auto,) * len(AXES))


def _spec_for(name, shape, fsdp_size, rules):
  for pattern, rule in rules:
    if re.search(pattern, name):
      break
  else:
    rule = 'replicate'
  if rule == 'replicate' or fsdp_size == 1:
    return P()
  if rule not in ('fsdp', 'fsdp_rows'):
    raise ValueError(f'unknown sharding rule {rule!r} for {name}; '
                     "use 'fsdp', 'fsdp_rows' or 'replicate'")
  first = 1 if is_stacked(name) else 0  # never the stacked layer axis
  candidates = [i for i, d in enumerate(shape)
                if i >= first and d % fsdp_size == 0]
  if not candidates:
    return P()
  axis = max(candidates, key=lambda i: shape[i])
  if rule == 'fsdp_rows' and first in candidates:
    axis = first
  return P(*[('fsdp' if i == axis else None) for i in range(len(shape))])


def tree_shardings(mesh, tree, rules=DEFAULT_RULES):
  """NamedSharding for every leaf of `tree` (arrays or ShapeDtypeStructs)."""
  fsdp_size = mesh.shape['fsdp']
  return map_with_name(
      lambda name, x: NamedSharding(
          mesh, _spec_for(name, np.shape(x), fsdp_size, rules)), tree)


def with_shardings(mesh, abstract, rules=DEFAULT_RULES):
  """(shardings, ShapeDtypeStructs carrying them) for an abstract tree."""
  shardings = tree_shardings(mesh, abstract, rules)
  return shardings, jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      abstract, shardings)


def replicated(mesh):
  """A full copy on every device of the mesh."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh, stacked=False):
  """Leading (batch) dimension split over all devices of the mesh; with
  `stacked`, the second one (arrays of (accum_iter, batch, ...))."""
  return NamedSharding(mesh, P(None, AXES) if stacked else BATCH_SPEC)


def global_batch(mesh, local_batch, stacked=False):
  """Process-local NumPy batch (dict of arrays) -> global jax.Arrays;
  `stacked`: arrays of (accum_iter, local batch, ...)."""
  sharding = batch_sharding(mesh, stacked)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x),
      local_batch)
