"""Safe reading and writing of PyTorch weight files (.pth/.pt, .safetensors).

Pickled .pth files are read with torch's weights_only unpickler; only the few
plain globals that official MAE training checkpoints hold are allowed, so a
file that would run code is refused. Tensors come back as torch tensors,
each in its own storage so converting them one by one frees memory as it
goes (a memory-mapped load would keep every touched page resident).
"""
import argparse
import os
import pickle
import zipfile

import numpy as np

MODEL_KEY = 'model'
TRAINING_KEYS = ('optimizer', 'epoch', 'scaler', 'args')


class CheckpointError(ValueError):
  """A user-facing problem with a checkpoint file or directory."""


def _safe_globals():
  """Globals allowed in pickles: argparse.Namespace ('args') and NumPy scalars
  (epoch / scaler values saved as NumPy numbers)."""
  core = np._core.multiarray  # pylint: disable=protected-access
  allowed = [argparse.Namespace, core.scalar, np.dtype,
             (core.scalar, 'numpy.core.multiarray.scalar')]
  for name in ('Float64DType', 'Float32DType', 'Float16DType', 'Int64DType',
               'Int32DType', 'BoolDType'):
    allowed.append(getattr(np.dtypes, name))
  return allowed


def _load_pickle(path):
  import torch  # pylint: disable=import-outside-toplevel
  if not zipfile.is_zipfile(path):
    raise CheckpointError(
        f'{path}: not a PyTorch zip checkpoint (truncated or corrupt file, or '
        'a legacy pre-1.6 format; re-save it with a current torch.save)')
  try:
    with torch.serialization.safe_globals(_safe_globals()):
      return torch.load(path, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as e:
    first = str(e).strip().splitlines()
    detail = next((l for l in first if 'GLOBAL' in l or 'Unsupported' in l),
                  first[0] if first else '')
    raise CheckpointError(
        f'{path}: refused to load: the pickle needs objects outside the '
        f'allowed plain types and could run code ({detail.strip()})') from None
  except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as e:
    raise CheckpointError(
        f'{path}: cannot read PyTorch checkpoint (truncated or corrupt?): '
        f'{str(e).splitlines()[0]}') from None


def _load_safetensors(path):
  from safetensors import SafetensorError  # pylint: disable=import-outside-toplevel
  from safetensors.torch import load_file  # pylint: disable=import-outside-toplevel
  try:
    return load_file(path, device='cpu')
  except (SafetensorError, OSError, ValueError) as e:
    raise CheckpointError(
        f'{path}: cannot read safetensors file (truncated or corrupt?): '
        f'{e}') from None


def read_state_dict(path):
  """Reads a weight file.

  Returns (state_dict, extras): state_dict maps official key names to torch
  tensors; extras names the top-level entries that were not model weights
  (e.g. 'optimizer', 'epoch', 'scaler', 'args'), mapped to their values.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise CheckpointError(f'{path}: no such file')
  if path.endswith('.safetensors'):
    return _load_safetensors(path), {}
  obj = _load_pickle(path)
  if not isinstance(obj, dict):
    raise CheckpointError(
        f'{path}: expected a dict of tensors, got {type(obj).__name__}')
  if MODEL_KEY in obj and isinstance(obj[MODEL_KEY], dict):
    extras = {k: v for k, v in obj.items() if k != MODEL_KEY}
    obj = obj[MODEL_KEY]
  else:
    extras = {}
  import torch  # pylint: disable=import-outside-toplevel
  bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
  if bad:
    raise CheckpointError(f'{path}: entries that are not tensors: '
                          f'{", ".join(map(str, bad[:10]))}')
  return obj, extras


def write_pth(path, state_dict):
  """Atomically writes {'model': state_dict} (torch tensors) to `path`."""
  import torch  # pylint: disable=import-outside-toplevel
  path = os.fspath(path)
  tmp = os.path.join(os.path.dirname(os.path.abspath(path)),
                     f'.{os.path.basename(path)}.tmp-{os.getpid()}')
  try:
    torch.save({MODEL_KEY: state_dict}, tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
