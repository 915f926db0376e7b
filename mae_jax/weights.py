"""Pretrained weights on their way into mae_jax: finiteness checks, torch
tensors to Flax arrays one by one, an encoder read from any source, and the
checks every converter shares (mae_jax.convert, mae_jax.pose.convert).
"""
import os

import jax
import numpy as np
from flax import traverse_util

from mae_jax import checkpoint, paths
from mae_jax.errors import CheckpointError
from mae_jax.models import MaskedAutoencoder, unstack_blocks
from mae_jax.models.pos_embed import sincos_2d
from mae_jax.torch_io import read_state_dict
from mae_jax.torch_layout import tensor_to_flax, to_flax_path


def describe_nonfinite(key, path, arr):
  """'' for an all-finite array, else a description naming both names."""
  if np.isfinite(arr).all():
    return ''
  nan, inf = int(np.isnan(arr).sum()), int(np.isinf(arr).sum())
  return (f'{key} (mae_jax {"/".join(path)}: {nan} NaN, {inf} Inf of '
          f'{arr.size} values)')


def refuse_nonfinite(source, bad, allow, warn):
  """Raises CheckpointError naming the tensors in `bad`, unless `allow`, in
  which case `warn(message)` is called (when given)."""
  if not bad:
    return
  names = '; '.join(bad)
  if not allow:
    raise CheckpointError(f'{source}: non-finite weights in {names}; refusing '
                          'to convert (convert_torch_weights.py '
                          '--allow-nonfinite keeps them)')
  if warn is not None:
    warn(f'{source}: kept non-finite weights (--allow-nonfinite): {names}')


def pop_to_flax(state_dict, keys, source, allow_nonfinite=False, warn=None):
  """Converts and removes `keys` one by one, so memory is freed as we go;
  non-finite values are refused unless `allow_nonfinite`."""
  flat, bad = {}, []
  for key in keys:
    tensor = state_dict.pop(key)
    path = to_flax_path(key, tensor.ndim)
    flat[path] = tensor_to_flax(tensor)
    del tensor
    bad.append(describe_nonfinite(key, path, flat[path]))
  refuse_nonfinite(source, [b for b in bad if b], allow_nonfinite, warn)
  return flat


def flat_encoder(path_or_state, source):
  """(encoder weights as a flat Flax dict (unrolled blocks) with pos_embed
  (1, 1+L, D), their (gh, gw) grid or None when only L is known)."""
  if isinstance(path_or_state, (str, os.PathLike)):
    if paths.resolve(path_or_state).is_dir():
      model, variables = checkpoint.load(path_or_state, scan_blocks=False)
      flat = traverse_util.flatten_dict(variables['params'])
      if isinstance(model, MaskedAutoencoder):
        flat[('pos_embed',)] = sincos_2d(model.embed_dim, model.grid_size)[None]
      return flat, model.grid_size
    state, _ = read_state_dict(path_or_state)
  else:
    state = dict(path_or_state.get('params', path_or_state))
    if not any('.' in k for k in state):  # a Flax params tree
      return traverse_util.flatten_dict(unstack_blocks(state)), None
  return pop_to_flax(dict(state), list(state), source), None


def param_count(params):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def refuse_existing(dst):
  if paths.resolve(dst).exists():
    raise CheckpointError(f'{os.fspath(dst)}: already exists; remove it or '
                          'choose another destination')


