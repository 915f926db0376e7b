"""Safe reading and writing of PyTorch weight files (.pth/.pt, .safetensors).

Pickled .pth files are read with torch's weights_only unpickler; only the few
plain globals that official MAE training checkpoints hold are allowed, so a
file that would run code is refused. Their tensors come back as torch
tensors, each in its own storage so converting them one by one frees memory
as it goes (a memory-mapped load would keep every touched page resident).
.safetensors files are read without torch, into NumPy arrays (bfloat16 as
ml_dtypes.bfloat16). Paths may be relative, absolute or object-store URIs
(mae_jax.paths.resolve); messages name them as given.
"""
import argparse
import io
import os
import pickle
import zipfile

import ml_dtypes
import numpy as np

from mae_jax import extras, paths
from mae_jax.errors import CheckpointError

MODEL_KEY = 'model'
STATE_DICT_KEY = 'state_dict'  # mmpose / mmcv checkpoints
TRAINING_KEYS = ('optimizer', 'epoch', 'scaler', 'args')


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


def _torch(purpose):
  return extras.require('torch', 'torch', purpose)


def _load_pickle(path, shown):
  """torch.load of a local file by name (torch reads it fastest so), of a
  URI through an open file."""
  torch = _torch('reading .pth files')
  with path.open('rb') as f:
    zipped = zipfile.is_zipfile(f)
    f.seek(0)
    if not zipped:
      raise CheckpointError(
          f'{shown}: not a PyTorch zip checkpoint (truncated or corrupt file, '
          'or a legacy pre-1.6 format; re-save it with a current torch.save)')
    try:
      with torch.serialization.safe_globals(_safe_globals()):
        return torch.load(f if paths.is_uri(path) else os.fspath(path),
                          map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
      first = str(e).strip().splitlines()
      detail = next((l for l in first if 'GLOBAL' in l or 'Unsupported' in l),
                    first[0] if first else '')
      raise CheckpointError(
          f'{shown}: refused to load: the pickle needs objects outside the '
          f'allowed plain types and could run code ({detail.strip()})'
      ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as e:
      raise CheckpointError(
          f'{shown}: cannot read PyTorch checkpoint (truncated or corrupt?): '
          f'{str(e).splitlines()[0]}') from None


# safetensors dtype names -> NumPy dtypes (safetensors.numpy.load lacks BF16).
_SAFETENSORS_DTYPES = {
    'F64': np.float64, 'F32': np.float32, 'F16': np.float16,
    'BF16': ml_dtypes.bfloat16, 'I64': np.int64, 'I32': np.int32,
    'I16': np.int16, 'I8': np.int8, 'U8': np.uint8, 'BOOL': np.bool_}


def _safetensors_bytes(data):
  """{name: NumPy array} of a whole .safetensors file's bytes."""
  import safetensors  # pylint: disable=import-outside-toplevel
  out = {}
  for name, view in safetensors.deserialize(data):
    if view['dtype'] not in _SAFETENSORS_DTYPES:
      raise CheckpointError(f'tensor {name}: unsupported dtype '
                            f'{view["dtype"]}')
    out[name] = np.frombuffer(view['data'], _SAFETENSORS_DTYPES[
        view['dtype']]).reshape(view['shape']).copy()
  return out


def _load_safetensors(path, shown):
  """{name: NumPy array}: memory-mapped reads for local files (no torch),
  the whole file's bytes for URIs."""
  import safetensors  # pylint: disable=import-outside-toplevel
  from safetensors import numpy as st_numpy  # pylint: disable=import-outside-toplevel
  try:
    if paths.is_uri(path):
      return _safetensors_bytes(path.read_bytes())
    return st_numpy.load_file(os.fspath(path))  # bfloat16: needs ml_dtypes
  except (safetensors.SafetensorError, OSError, ValueError, TypeError) as e:
    raise CheckpointError(
        f'{shown}: cannot read safetensors file (truncated or corrupt?): '
        f'{e}') from None


def read_state_dict(path):
  """Reads a weight file.

  Returns (state_dict, extras): state_dict maps official key names to
  tensors (torch tensors from .pth/.pt, NumPy arrays from .safetensors);
  extras names the top-level entries that were not model weights (e.g.
  'optimizer', 'epoch', 'scaler', 'args', or mmcv's 'meta'), mapped to
  their values. The weights are the file's 'model' dict (official MAE), its
  'state_dict' (mmpose / mmcv) or the file's dict itself.
  """
  shown = os.fspath(path)
  path = paths.resolve(path)
  if not path.is_file():
    raise CheckpointError(f'{shown}: no such file')
  if path.name.endswith('.safetensors'):
    return _load_safetensors(path, shown), {}
  obj = _load_pickle(path, shown)
  if not isinstance(obj, dict):
    raise CheckpointError(
        f'{shown}: expected a dict of tensors, got {type(obj).__name__}')
  inner = next((k for k in (MODEL_KEY, STATE_DICT_KEY)
                if isinstance(obj.get(k), dict)), None)
  if inner is not None:
    others = {k: v for k, v in obj.items() if k != inner}
    obj = obj[inner]
  else:
    others = {}
  torch = _torch('reading .pth files')
  bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
  if bad:
    raise CheckpointError(f'{shown}: entries that are not tensors: '
                          f'{", ".join(map(str, bad[:10]))}')
  return obj, others


def write_pth(path, state_dict, key=MODEL_KEY):
  """Writes {key: state_dict} (torch tensors) to `path` with
  `paths.write_atomic`: the bytes are made in memory, then a local file is
  replaced through a temporary sibling and a URI uploaded in one write."""
  torch = _torch('writing .pth files')
  buffer = io.BytesIO()
  torch.save({key: state_dict}, buffer)
  paths.write_atomic(path, buffer.getbuffer())
