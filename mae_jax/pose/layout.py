"""ViTPose key layouts: the official mmpose `.pth` and Hugging Face's
`VitPoseForPoseEstimation`, against mae_jax's `ViTPose` variables.

Official (ViTAE-Transformer/ViTPose, mmpose `state_dict`):
  backbone.patch_embed.proj.{weight,bias}, backbone.pos_embed,
  backbone.blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*,
  backbone.last_norm.*, keypoint_head.deconv_layers.{0,3}.weight
  (ConvTranspose2d), keypoint_head.deconv_layers.{1,4}.{weight,bias,
  running_mean,running_var,num_batches_tracked} (BatchNorm2d),
  keypoint_head.final_layer.{weight,bias}.
Hugging Face (transformers' modeling_vitpose*.py): backbone.embeddings.*,
  backbone.encoder.layer.{i}.* with separate query/key/value,
  backbone.layernorm.*, head.{deconv1,batchnorm1,deconv2,batchnorm2,conv}.*
  or head.conv.* (simple head); its config.json describes the model.

Hugging Face state dicts are renamed to the official layout (q, k, v fused
into qkv in that order), so one mapping, official <-> Flax, serves both.
The backbone's keys are the MAE encoder's (mae_jax.torch_layout) under
`backbone.`; the head's follow below.
"""
import re

import numpy as np

from mae_jax.errors import CheckpointError
from mae_jax.torch_layout import as_numpy, to_flax_path, to_torch_key

BACKBONE, HEAD = 'backbone.', 'keypoint_head.'
# Official head module -> Flax module of ViTPose.
_HEAD_MODULES = {'deconv_layers.0': 'deconv_0', 'deconv_layers.1': 'bn_0',
                 'deconv_layers.3': 'deconv_1', 'deconv_layers.4': 'bn_1',
                 'final_layer': 'final_layer'}
_BN_STATS = {'running_mean': 'mean', 'running_var': 'var',
             'num_batches_tracked': 'num_batches_tracked'}


def is_pose_state(state_dict):
  """True for an official ViTPose state dict (backbone. / keypoint_head.)."""
  return any(k.startswith((BACKBONE, HEAD)) for k in state_dict)


# ----------------------------------------------------------- official keys
def to_flax(key, ndim):
  """Official key of an ndim-dimensional tensor -> (collection, Flax path),
  the collection 'params' or 'batch_stats'."""
  if key.startswith(BACKBONE):
    return 'params', to_flax_path(key[len(BACKBONE):], ndim)
  if key.startswith(HEAD):
    module, leaf = key[len(HEAD):].rsplit('.', 1)
    if module not in _HEAD_MODULES:
      raise CheckpointError(f'unknown head key {key!r}')
    name = _HEAD_MODULES[module]
    if leaf in _BN_STATS:
      return 'batch_stats', (name, _BN_STATS[leaf])
    if leaf != 'weight':
      return 'params', (name, leaf)
    return 'params', (name, 'scale' if name.startswith('bn_') else 'kernel')
  raise CheckpointError(f'key {key!r} is neither backbone.* nor '
                        'keypoint_head.*')


def to_official(collection, path):
  """(collection, Flax path) -> official key; inverse of `to_flax`."""
  name = path[0]
  if collection == 'batch_stats':
    back = {v: k for k, v in _BN_STATS.items()}
    return f'{HEAD}{_module_of(name)}.{back[path[1]]}'
  if name in ('deconv_0', 'deconv_1', 'bn_0', 'bn_1', 'final_layer'):
    leaf = 'weight' if path[1] in ('kernel', 'scale') else path[1]
    return f'{HEAD}{_module_of(name)}.{leaf}'
  return BACKBONE + to_torch_key(path)


def _module_of(name):
  return {v: k for k, v in _HEAD_MODULES.items()}[name]


def tensor_to_flax(key, tensor):
  """Official tensor -> NumPy array in the Flax layout of `to_flax`."""
  arr = as_numpy(tensor)
  if arr.ndim == 4 and key.startswith(HEAD + 'deconv_layers.'):
    return np.ascontiguousarray(arr.transpose(2, 3, 0, 1))  # (in, out, k, k)
  if arr.ndim == 4:
    return np.ascontiguousarray(arr.transpose(2, 3, 1, 0))  # (out, in, k, k)
  if arr.ndim == 2:
    return np.ascontiguousarray(arr.T)
  return arr


def array_to_official(key, arr):
  """Flax-layout array -> NumPy array in the official layout of `key`
  (num_batches_tracked as int64, as PyTorch keeps it)."""
  arr = np.asarray(arr)
  if key.endswith('num_batches_tracked'):
    return arr.astype(np.int64)
  if arr.ndim == 4 and key.startswith(HEAD + 'deconv_layers.'):
    return np.ascontiguousarray(arr.transpose(2, 3, 0, 1))
  if arr.ndim == 4:
    return np.ascontiguousarray(arr.transpose(3, 2, 0, 1))
  if arr.ndim == 2:
    return np.ascontiguousarray(arr.T)
  return arr


# ----------------------------------------------------- Hugging Face layout
_HF_LAYER = re.compile(r'^backbone\.encoder\.layer\.(\d+)\.(.+)$')
_HF_BLOCK_PARTS = {
    'layernorm_before': 'norm1', 'layernorm_after': 'norm2',
    'attention.output.dense': 'attn.proj', 'mlp.fc1': 'mlp.fc1',
    'mlp.fc2': 'mlp.fc2'}
_HF_TOP = {
    'backbone.embeddings.patch_embeddings.projection':
        'backbone.patch_embed.proj',
    'backbone.embeddings.position_embeddings': 'backbone.pos_embed',
    'backbone.layernorm': 'backbone.last_norm',
    'head.deconv1': 'keypoint_head.deconv_layers.0',
    'head.batchnorm1': 'keypoint_head.deconv_layers.1',
    'head.deconv2': 'keypoint_head.deconv_layers.3',
    'head.batchnorm2': 'keypoint_head.deconv_layers.4',
    'head.conv': 'keypoint_head.final_layer'}


def hf_to_official(state_dict, source):
  """Hugging Face VitPoseForPoseEstimation state dict -> official keys
  (NumPy arrays). Every key must be known: others are an error naming
  them."""
  out, qkv, unknown = {}, {}, []
  for key, tensor in state_dict.items():
    arr = as_numpy(tensor)
    m = _HF_LAYER.match(key)
    if m:
      i, rest = m.groups()
      attn = re.match(r'^attention\.attention\.(query|key|value)\.'
                      r'(weight|bias)$', rest)
      if attn:
        qkv.setdefault((i, attn.group(2)), {})[attn.group(1)] = arr
        continue
      part, leaf = rest.rsplit('.', 1)
      if part in _HF_BLOCK_PARTS:
        out[f'backbone.blocks.{i}.{_HF_BLOCK_PARTS[part]}.{leaf}'] = arr
        continue
    else:
      base = next((b for b in _HF_TOP if key.startswith(b + '.') or key == b),
                  None)
      if base is not None:
        out[_HF_TOP[base] + key[len(base):]] = arr
        continue
    unknown.append(key)
  if unknown:
    raise CheckpointError(f'{source}: keys that are not a single-dataset '
                          f'VitPoseForPoseEstimation\'s: {", ".join(unknown)}')
  for (i, leaf), parts in sorted(qkv.items()):
    if set(parts) != {'query', 'key', 'value'}:
      raise CheckpointError(f'{source}: layer {i} attention {leaf} lacks '
                            f'{sorted({"query", "key", "value"} - set(parts))}')
    out[f'backbone.blocks.{i}.attn.qkv.{leaf}'] = np.concatenate(
        [parts['query'], parts['key'], parts['value']], axis=0)
  return out
