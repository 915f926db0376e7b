"""ViTPose weights: the official mmpose `.pth` and Hugging Face
`VitPoseForPoseEstimation` directories <-> mae_jax checkpoints, and a pose
model initialised from MAE or ViT weights.

Key layouts are in mae_jax.pose.layout. As for MAE files, every conversion
is strict (missing, unexpected and mis-shaped keys are one error naming
them all), pickles are read with the safe unpickler (mae_jax.torch_io), NaN
or Inf weights are refused unless `allow_nonfinite`, and checkpoints are
written atomically (mae_jax.checkpoint.save).

Model description: a Hugging Face directory's config.json gives every
field (layer_norm_eps included; transformers' default is 1e-12, the
official code's 1e-6). An official `.pth` holds no description: width,
depth and patch come from the tensors and are matched against the registry
(`POSE_CONFIGS`) for the head count, unless a model name is given; the
head kind, its width and the joint count come from the head's tensors; the
image size is the registry's when its patch grid has the file's position
count, else `img_size` must say it.
"""
import collections
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mae_jax import checkpoint, extras as extras_lib, paths, weights
from mae_jax.errors import CheckpointError
from mae_jax.models import POSE_CONFIGS, ViTPose, create_model
from mae_jax.models import model_input_shape, to_layout, unstack_blocks
from mae_jax.models.geometry import grid_hw, normalize_img_size
from mae_jax.models.pos_embed import resize_grid
from mae_jax.pose import layout
from mae_jax.torch_io import read_state_dict
from mae_jax.torch_layout import check_keys

_BLOCK = re.compile(r'^backbone\.blocks\.(\d+)\.')
_BACKBONE_MODULES = ('patch_embed', 'pos_embed')


# ------------------------------------------------------------- shapes
def official_shapes(model):
  """Ordered {official key: shape} of every variable `model` has."""
  shapes = collections.OrderedDict()
  for collection, tree in checkpoint.abstract_variables(model).items():
    for path, leaf in traverse_util.flatten_dict(
        unstack_blocks(tree) if collection == 'params' else tree).items():
      key = layout.to_official(collection, path)
      shapes[key] = layout.array_to_official(
          key, np.empty(leaf.shape, np.bool_)).shape
  return shapes


# ------------------------------------------------------- model description
def is_hf_directory(path):
  """True when `path` is a directory holding a config.json."""
  path = paths.resolve(path)
  return path.is_dir() and (path / 'config.json').is_file()


def read_hf_directory(path):
  """(config dict, state dict of NumPy arrays) of a `save_pretrained`
  directory (config.json + model.safetensors)."""
  shown = os.fspath(path)
  root = paths.resolve(path)
  try:
    config = json.loads((root / 'config.json').read_text())
  except (OSError, ValueError) as e:
    raise CheckpointError(f'{shown}/config.json: unreadable: {e}') from None
  if config.get('model_type') != 'vitpose':
    raise CheckpointError(
        f'{shown}: config.json says model_type={config.get("model_type")!r}; '
        "only Hugging Face VitPoseForPoseEstimation ('vitpose') directories "
        'convert')
  weights = root / 'model.safetensors'
  if not weights.is_file():
    raise CheckpointError(f'{shown}: no model.safetensors (sharded or .bin '
                          'weights: re-save with save_pretrained)')
  state, _ = read_state_dict(os.path.join(shown, 'model.safetensors'))
  return config, state


def model_from_hf_config(config, state, source):
  """ViTPose of a Hugging Face config.json; unsupported variants (ViTPose+
  experts, another activation, no qkv bias, features of an inner layer) are
  refused naming the field."""
  bb = config.get('backbone_config') or {}
  depth = int(bb.get('num_hidden_layers', 12))
  refusals = []
  if int(bb.get('num_experts', 1)) != 1:
    refusals.append(f'num_experts={bb["num_experts"]} (ViTPose+ mixture-of-'
                    'experts models are not supported)')
  if bb.get('hidden_act', 'gelu') != 'gelu':
    refusals.append(f'hidden_act={bb["hidden_act"]!r} (exact GELU only)')
  if not bb.get('qkv_bias', True):
    refusals.append('qkv_bias=False')
  out = bb.get('out_indices')
  if out is not None and list(out) not in ([depth], [-1]):
    refusals.append(f'out_indices={out} (the last layer\'s features only, '
                    f'[{depth}])')
  patch = bb.get('patch_size', 16)
  patch = list(patch) if isinstance(patch, (list, tuple)) else [patch, patch]
  if patch[0] != patch[1]:
    refusals.append(f'patch_size={patch} (square patches only)')
  if refusals:
    raise CheckpointError(f'{source}: unsupported VitPose config: '
                          + '; '.join(refusals))
  simple = bool(config.get('use_simple_decoder', True))
  head_key = 'head.conv.weight'
  if head_key not in state:
    raise CheckpointError(f'{source}: no {head_key} in model.safetensors')
  fields = dict(
      img_size=normalize_img_size(bb.get('image_size', [256, 192])),
      patch_size=int(patch[0]), in_chans=int(bb.get('num_channels', 3)),
      embed_dim=int(bb.get('hidden_size', 768)), depth=depth,
      num_heads=int(bb.get('num_attention_heads', 12)),
      mlp_ratio=float(bb.get('mlp_ratio', 4)),
      norm_eps=float(bb.get('layer_norm_eps', 1e-12)),
      num_joints=int(state[head_key].shape[0]),
      head='simple' if simple else 'classic',
      upsample=int(config.get('scale_factor', 4)))
  if not simple:
    fields['head_width'] = int(state['head.deconv1.weight'].shape[1])
  return ViTPose(**fields)


def detect_official(state, source, model_name=None, img_size=None):
  """ViTPose for an official state dict (see the module docstring)."""
  if any('experts' in k for k in state):
    raise CheckpointError(f'{source}: a ViTPose+ file (mixture-of-experts '
                          'FFN): not supported')
  key = 'backbone.patch_embed.proj.weight'
  if key not in state or 'backbone.pos_embed' not in state:
    raise CheckpointError(f'{source}: no {key} / backbone.pos_embed: not a '
                          'ViTPose state dict')
  width, chans, patch, _ = state[key].shape
  depth = len({m.group(1) for m in map(_BLOCK.match, state) if m})
  if model_name is None:
    model_name = next((n for n, c in POSE_CONFIGS.items()
                       if (c['patch_size'], c['embed_dim'], c['depth'])
                       == (patch, width, depth)), None)
    if model_name is None:
      raise CheckpointError(
          f'{source}: no registry ViTPose has patch {patch}, width {width}, '
          f'depth {depth}; known: {", ".join(POSE_CONFIGS)}; pass --model')
  elif model_name not in POSE_CONFIGS:
    raise CheckpointError(f'{source}: {model_name!r} is not a ViTPose name; '
                          f'known: {", ".join(POSE_CONFIGS)}')
  fields = {'in_chans': int(chans)}
  final = state.get('keypoint_head.final_layer.weight')
  if final is None:
    raise CheckpointError(f'{source}: no keypoint_head.final_layer.weight')
  fields['num_joints'] = int(final.shape[0])
  deconv = state.get('keypoint_head.deconv_layers.0.weight')
  fields['head'] = 'simple' if deconv is None else 'classic'
  if deconv is not None:
    fields['head_width'] = int(deconv.shape[1])
  model = create_model(model_name, **fields)
  length = state['backbone.pos_embed'].shape[1] - 1
  for size in (img_size, model.img_size):
    if size is not None and _grid_length(size, model.patch_size) == length:
      return model.clone(img_size=normalize_img_size(size))
  raise CheckpointError(
      f'{source}: backbone.pos_embed holds {length} patch positions, not the '
      f'{model.num_patches} of img_size={model.img_size}; pass --img-size '
      'H,W, the size it was trained at')


def _grid_length(size, patch):
  try:
    gh, gw = grid_hw(size, patch)
  except ValueError:
    return None
  return gh * gw


# ------------------------------------------------------------ conversion
def from_official(state, model, source, allow_nonfinite=False, warn=None):
  """Strict official state dict -> mae_jax variables of `model` (unrolled
  blocks): {'params': ..., 'batch_stats': ...} (the latter for the classic
  head). Consumes `state`."""
  check_keys(source, state, official_shapes(model))
  flat, bad = {'params': {}, 'batch_stats': {}}, []
  for key in list(state):
    tensor = state.pop(key)
    collection, path = layout.to_flax(key, tensor.ndim)
    arr = layout.tensor_to_flax(key, tensor)
    if key.endswith('num_batches_tracked'):
      arr = arr.astype(np.int32)
    flat[collection][path] = arr
    bad.append(weights.describe_nonfinite(key, path, arr))
  weights.refuse_nonfinite(source, [b for b in bad if b], allow_nonfinite,
                           warn)
  return {k: traverse_util.unflatten_dict(v) for k, v in flat.items() if v}


def to_official(model, variables, source='<variables>',
                allow_nonfinite=False, warn=None):
  """mae_jax variables (either block layout) -> ordered official state dict
  of torch tensors."""
  torch = extras_lib.require('torch', 'torch', 'writing .pth files')
  flat = {}
  for collection, tree in variables.items():
    tree = unstack_blocks(tree) if collection == 'params' else tree
    for path, arr in traverse_util.flatten_dict(tree).items():
      flat[layout.to_official(collection, path)] = (path, np.asarray(arr))
  state, bad = collections.OrderedDict(), []
  for key in official_shapes(model):
    if key not in flat:
      raise CheckpointError(f'{source}: variable for {key} is missing')
    path, arr = flat[key]
    bad.append(weights.describe_nonfinite(key, path, arr))
    state[key] = torch.from_numpy(layout.array_to_official(key, arr))
  weights.refuse_nonfinite(source, [b for b in bad if b], allow_nonfinite,
                           warn)
  return state


def _describe(model, variables, kind, skipped):
  fields = checkpoint.model_description(model)['fields']
  count = weights.param_count(variables['params'])
  return [f'source kind: {kind}', f'model: ViTPose({fields})',
          f'parameters: {count:,}',
          'skipped on purpose: ' + ('; '.join(skipped) or 'nothing')]


def from_hf_directory(src, allow_nonfinite=False, warn=None):
  """(model, variables, report lines) of a Hugging Face VitPose directory
  (config.json + model.safetensors); blocks unrolled."""
  source = os.fspath(src)
  config, hf_state = read_hf_directory(src)
  model = model_from_hf_config(config, hf_state, source)
  state = layout.hf_to_official(hf_state, source)
  variables = from_official(state, model, source, allow_nonfinite, warn)
  return model, variables, _describe(
      model, variables, 'Hugging Face VitPoseForPoseEstimation directory',
      [])


def from_official_state(state, extras, source, model_name=None,
                        img_size=None, allow_nonfinite=False, warn=None):
  """(model, variables, report lines) of an official ViTPose state dict
  (see `detect_official` for the model); consumes `state`."""
  model = detect_official(state, source, model_name, img_size)
  variables = from_official(state, model, source, allow_nonfinite, warn)
  return model, variables, _describe(
      model, variables, 'official ViTPose state dict (mmpose)',
      [f'{k} (not model weights)' for k in extras])


def export_pose(model, variables, src, dst, allow_nonfinite=False,
                warn=None):
  """A mae_jax ViTPose -> official `.pth` {'state_dict': ...} at `dst`."""
  from mae_jax.torch_io import write_pth  # pylint: disable=import-outside-toplevel
  state = to_official(model, variables, os.fspath(src), allow_nonfinite,
                      warn)
  write_pth(paths.resolve(dst), state, key='state_dict')
  return [f'model: ViTPose (head {model.head})',
          f'tensors: {len(state)}, values: '
          f'{sum(t.numel() for t in state.values()):,}']


# -------------------------------------------------- init from MAE weights
def init_from_encoder(source, model, rng, name=None):
  """ViTPose variables with the backbone from pretrained MAE / ViT weights
  (an MAE or classifier .pth/.safetensors, a mae_jax checkpoint directory,
  a torch state dict or a Flax params tree): patch_embed and blocks by
  name, pos_embed resampled bicubically to the model's grid with its cls
  row kept (14 x 14 -> 16 x 12 for 224 -> 256 x 192 at patch 16), and a
  smaller patch kernel zero-padded to the model's patch (14 -> 16 for
  ViT-H/14 weights), as the official ViTPose initialisation does. Everything else (`last_norm`, the
  head, its BatchNorm statistics) is fresh: the MAE's final `norm` is not
  `last_norm` by name, so the official code leaves it at its init too.

  Returns (variables in the model's block layout, report lines); `name`
  names an in-memory source in messages.
  """
  shown = (os.fspath(source) if isinstance(source, (str, os.PathLike))
           else name or '<weights>')
  flat, grid = weights.flat_encoder(source, shown)
  unrolled = model.clone(scan_blocks=False)
  imgs = jnp.zeros((1, *model_input_shape(model)), jnp.float32)
  variables = jax.jit(unrolled.init)(rng, imgs)
  params = dict(traverse_util.flatten_dict(variables['params']))
  loaded, missing, wrong, notes = [], [], [], []
  for path, fresh in params.items():
    if not (path[0] in _BACKBONE_MODULES or path[0].startswith('blocks_')):
      continue
    if path not in flat:
      missing.append('/'.join(path))
      continue
    value = np.asarray(flat[path])
    if path == ('pos_embed',) and value.shape != fresh.shape:
      value = resize_grid(value[0], model.grid_size, old_grid=grid)[None]
    if path == ('patch_embed', 'kernel'):
      value, note = _pad_patch_kernel(value, model.patch_size, shown)
      notes += note
      value = checkpoint.fit_patch_kernel(value, model.in_chans, False, shown)
    if value.shape != fresh.shape:
      wrong.append(f'{"/".join(path)} {value.shape} (expected {fresh.shape})')
    params[path] = value
    loaded.append(path)
  if missing or wrong:
    raise CheckpointError(f'{shown}: encoder weights do not fit the ViTPose '
                          f'backbone; missing: {missing}; wrong shape: {wrong}')
  variables = {**variables, 'params': to_layout(
      traverse_util.unflatten_dict(params), model.scan_blocks)}
  variables = jax.tree.map(np.asarray, variables)
  old = ('x'.join(map(str, grid)) if grid else
         f'{flat[("pos_embed",)].shape[1] - 1} positions')
  report = [
      f'loaded from {shown}: {_modules(loaded)}; pos_embed {old} -> '
      f'{"x".join(map(str, model.grid_size))} (bicubic, cls row kept)'
      + ''.join(f'; {n}' for n in notes),
      'initialised fresh: ' + _modules(p for p in params if p not in loaded),
      'skipped on purpose: ' + (_modules(p for p in flat if p[0] not in
                                         {q[0] for q in loaded})
                                or 'nothing')]
  return variables, report


def _pad_patch_kernel(kernel, patch, source):
  """(kernel (p0, p0, C, D) zero-padded to (patch, patch, C, D), notes): the
  official initialisation's default for a smaller pretrained patch (ViT-H/14
  MAE weights -> the patch-16 ViTPose-H), pad (p - p0) // 2 before and the
  rest after. A larger pretrained patch is an error."""
  have = kernel.shape[0]
  if have == patch:
    return kernel, []
  if have > patch:
    raise CheckpointError(f'{source}: the pretrained patch embedding is '
                          f'{have}x{have}, larger than the model\'s patch '
                          f'{patch}')
  before = (patch - have) // 2
  after = patch - have - before
  padded = np.pad(kernel, ((before, after), (before, after), (0, 0), (0, 0)))
  return padded, [f'patch_embed kernel {have}x{have} -> {patch}x{patch} '
                  '(zero-padded, as the official initialisation)']


def _modules(paths_):
  """Top-level module names of Flax paths, numbered ones collapsed:
  'blocks_0' ... 'blocks_11' -> 'blocks_0..11'."""
  numbered, plain = collections.defaultdict(set), set()
  for path in paths_:
    m = re.match(r'^(.*)_(\d+)$', path[0])
    if m:
      numbered[m.group(1)].add(int(m.group(2)))
    else:
      plain.add(path[0])
  names = plain | {f'{n}_{min(i)}..{max(i)}' if len(i) > 1 else f'{n}_{min(i)}'
                   for n, i in numbered.items()}
  return ', '.join(sorted(names))
