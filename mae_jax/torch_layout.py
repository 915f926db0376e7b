"""The official PyTorch MAE / timm key layout: key names <-> Flax paths,
tensor layouts, the torch shapes a model needs, and what a state dict holds.

Key mapping: `blocks.{i}.` <-> `blocks_{i}/`, `decoder_blocks.{i}.` <->
`decoder_blocks_{i}/`, `patch_embed.proj` <-> `patch_embed`; Linear weight
(out, in) <-> kernel (in, out); conv weight (D, C, p, p) <-> kernel
(p, p, C, D); LayerNorm weight <-> scale. Tensors may be torch tensors or
NumPy arrays; torch is imported only to build torch tensors.
"""
import collections
import dataclasses
import re
import sys

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mae_jax import checkpoint, extras
from mae_jax.models import MAE_CONFIGS, MaskedAutoencoder, unstack_blocks
from mae_jax.models.geometry import grid_hw, normalize_img_size
from mae_jax.torch_io import CheckpointError

_BLOCK = re.compile(r'^(blocks|decoder_blocks)\.(\d+)\.(.*)$')


# ----------------------------------------------------------------- key names
def to_flax_path(key, ndim):
  """'blocks.3.attn.qkv.weight' -> ('blocks_3', 'attn', 'qkv', 'kernel')."""
  m = _BLOCK.match(key)
  if m:
    parts = [f'{m.group(1)}_{m.group(2)}'] + m.group(3).split('.')
  else:
    parts = key.split('.')
  if parts[:2] == ['patch_embed', 'proj']:
    parts = ['patch_embed'] + parts[2:]
  if len(parts) > 1 and parts[-1] == 'weight':
    parts[-1] = 'scale' if ndim == 1 else 'kernel'
  return tuple(parts)


def to_torch_key(path):
  """('blocks_3', 'attn', 'qkv', 'kernel') -> 'blocks.3.attn.qkv.weight'."""
  parts = list(path)
  m = re.match(r'^(blocks|decoder_blocks)_(\d+)$', parts[0])
  if m:
    parts[0] = f'{m.group(1)}.{m.group(2)}'
  elif parts[0] == 'patch_embed':
    parts[0] = 'patch_embed.proj'
  if len(parts) > 1 and parts[-1] in ('kernel', 'scale'):
    parts[-1] = 'weight'
  return '.'.join(parts)


def as_numpy(tensor):
  """torch tensor or array -> NumPy array (bfloat16 widened to float32)."""
  torch = sys.modules.get('torch')
  if torch is not None and isinstance(tensor, torch.Tensor):
    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
      tensor = tensor.float()
    tensor = tensor.numpy()
  arr = np.asarray(tensor)
  return arr.astype(np.float32) if arr.dtype == jnp.bfloat16 else arr


def tensor_to_flax(tensor):
  """torch tensor or array -> NumPy array in the Flax layout (fresh memory
  unless it already is contiguous in that layout)."""
  arr = as_numpy(tensor)
  if arr.ndim == 4:
    arr = arr.transpose(2, 3, 1, 0)
  elif arr.ndim == 2:
    arr = arr.T
  return np.ascontiguousarray(arr)


def array_to_torch(path, arr):
  """Flax-layout array -> torch tensor in the official layout."""
  torch = extras.require('torch', 'torch', 'writing .pth files')
  arr = np.asarray(arr)
  if path[-1] == 'kernel' and arr.ndim == 4:
    arr = arr.transpose(3, 2, 0, 1)
  elif path[-1] == 'kernel' and arr.ndim == 2:
    arr = arr.T
  return torch.from_numpy(np.array(arr, order='C'))


def torch_shapes(model):
  """Ordered {official key: shape} that `model` needs from a torch file."""
  flat = traverse_util.flatten_dict(
      unstack_blocks(checkpoint.abstract_params(model)))
  shapes = collections.OrderedDict()
  for path, leaf in flat.items():
    shape = tuple(leaf.shape)
    if path[-1] == 'kernel' and len(shape) == 4:
      shape = (shape[3], shape[2], shape[0], shape[1])
    elif path[-1] == 'kernel':
      shape = shape[::-1]
    shapes[to_torch_key(path)] = shape
    if isinstance(model, MaskedAutoencoder) and path[0] in ('cls_token',
                                                            'mask_token'):
      name = 'pos_embed' if path[0] == 'cls_token' else 'decoder_pos_embed'
      shapes[name] = (1, 1 + model.num_patches, shape[-1])
  return shapes


def check_keys(source, state_dict, expected):
  """Raises one CheckpointError listing missing/unexpected/mis-shaped keys."""
  missing = [k for k in expected if k not in state_dict]
  unexpected = [k for k in state_dict if k not in expected]
  wrong = [f'{k} {tuple(state_dict[k].shape)} (expected {expected[k]})'
           for k in expected
           if k in state_dict and tuple(state_dict[k].shape) != expected[k]]
  problems = [f'{label}: {", ".join(keys)}' for label, keys in
              (('missing', missing), ('unexpected', unexpected),
               ('wrong shape', wrong)) if keys]
  if problems:
    raise CheckpointError(f'{source}: keys do not match the model; '
                          + '; '.join(problems))


# ----------------------------------------------------------------- detection
@dataclasses.dataclass
class Detected:
  """What a torch state dict holds: kind, size and model-field overrides."""
  kind: str  # 'mae', 'encoder', 'classifier_gpool' or 'classifier_cls'
  size: str  # e.g. 'base_patch16'
  overrides: dict


def _known_sizes():
  return ', '.join(f'{n[len("mae_vit_"):]} (patch {c["patch_size"]}, width '
                   f'{c["embed_dim"]}, depth {c["depth"]})'
                   for n, c in MAE_CONFIGS.items())


def detect(state_dict, source='<state dict>', img_size=None):
  """File kind, model size and the file's geometry from key names and shapes.

  in_chans comes from the patch-embedding kernel (D, C, p, p). The grid
  comes from pos_embed's L patch positions: `img_size`'s grid when it has L
  patches (so a non-square file needs it), else the square grid of a
  perfect-square L; other L are an error naming the --img-size flag.
  """
  keys = set(state_dict)
  if 'patch_embed.proj.weight' not in keys:
    raise CheckpointError(f'{source}: no patch_embed.proj.weight: not an MAE '
                          'or ViT state dict')
  if any(k.startswith('decoder_') for k in keys) or 'mask_token' in keys:
    kind = 'mae'
  elif 'head.weight' in keys:
    kind = 'classifier_gpool' if 'fc_norm.weight' in keys else 'classifier_cls'
  elif 'norm.weight' in keys:
    kind = 'encoder'
  else:
    raise CheckpointError(f'{source}: neither a decoder, a head nor a final '
                          'norm: unrecognised layout')
  width, chans, patch, _ = state_dict['patch_embed.proj.weight'].shape
  depth = len({m.group(2) for m in map(_BLOCK.match, keys)
               if m and m.group(1) == 'blocks'})
  size = next((n[len('mae_vit_'):] for n, c in MAE_CONFIGS.items()
               if (c['patch_size'], c['embed_dim'], c['depth'])
               == (patch, width, depth)), None)
  if size is None:
    raise CheckpointError(
        f'{source}: unknown model size (patch {patch}, width {width}, depth '
        f'{depth}); known sizes: {_known_sizes()}; or pass --model')
  overrides = {'in_chans': int(chans)}
  if 'pos_embed' in keys:
    overrides['img_size'] = _file_img_size(
        state_dict['pos_embed'].shape[1] - 1, patch, img_size, source)
  if kind.startswith('classifier'):
    overrides['num_classes'] = int(state_dict['head.weight'].shape[0])
    overrides['global_pool'] = kind == 'classifier_gpool'
  return Detected(kind, size, overrides)


def _file_img_size(length, patch, img_size, source):
  """img_size the file was made for, from its L = length patch positions."""
  if img_size is not None:
    try:
      gh, gw = grid_hw(img_size, patch)
    except ValueError as e:
      raise CheckpointError(f'{source}: --img-size: {e}') from None
    if gh * gw == length:
      return normalize_img_size(img_size)
  side = int(round(length ** 0.5))
  if side * side == length:
    return side * patch
  raise CheckpointError(
      f'{source}: pos_embed holds L={length} patch positions, not a square '
      'grid; pass --img-size H,W (img_size=(H, W)), the size it was made for')
