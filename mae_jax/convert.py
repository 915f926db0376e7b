"""PyTorch (official MAE / timm layout) <-> mae_jax parameter trees.

Key mapping: `blocks.{i}.` <-> `blocks_{i}/`, `decoder_blocks.{i}.` <->
`decoder_blocks_{i}/`, `patch_embed.proj` <-> `patch_embed`; Linear weight
(out, in) <-> kernel (in, out); conv weight (D, C, p, p) <-> kernel
(p, p, C, D); LayerNorm weight <-> scale. The MAE's pos_embed and
decoder_pos_embed are fixed sin-cos tables: checked on the way in, rebuilt
on the way out. Every conversion is strict: any missing, unexpected or
mis-shaped key is an error that names them all.

Models with scan_blocks=True hold their blocks stacked ('blocks/...' with a
leading layer axis, see mae_jax.models.scan_layout): conversion always goes
through the unrolled layout (the one the official key names map to), and
params are stacked or unstacked at the edges, so every function here takes
and returns the layout of the model it is given.
"""
import collections
import dataclasses
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mae_jax import checkpoint
from mae_jax.models import MAE_CONFIGS, VIT_CONFIGS, create_model
from mae_jax.models import MaskedAutoencoder, to_layout, unstack_blocks
from mae_jax.models.pos_embed import resize_grid, sincos_2d
from mae_jax.torch_io import TRAINING_KEYS, CheckpointError, read_state_dict

FIXED_TABLES = ('pos_embed', 'decoder_pos_embed')
SINCOS_ATOL = 1e-6
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


def tensor_to_flax(tensor):
  """torch tensor -> NumPy array in the Flax layout (fresh memory unless the
  tensor already is contiguous in that layout)."""
  import torch  # pylint: disable=import-outside-toplevel
  tensor = tensor.detach()
  if tensor.dtype == torch.bfloat16:
    tensor = tensor.float()
  if tensor.ndim == 4:
    tensor = tensor.permute(2, 3, 1, 0)
  elif tensor.ndim == 2:
    tensor = tensor.t()
  return tensor.contiguous().numpy()


def array_to_torch(path, arr):
  """Flax-layout array -> torch tensor in the official layout."""
  import torch  # pylint: disable=import-outside-toplevel
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


def detect(state_dict, source='<state dict>'):
  """File kind and model size from key names and shapes."""
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
  overrides = {}
  if 'pos_embed' in keys:
    grid = int(round((state_dict['pos_embed'].shape[1] - 1) ** 0.5))
    overrides['img_size'] = grid * patch
  if kind.startswith('classifier'):
    overrides['num_classes'] = int(state_dict['head.weight'].shape[0])
    overrides['global_pool'] = kind == 'classifier_gpool'
  return Detected(kind, size, overrides)


# ------------------------------------------------------------ torch -> flax
def _check_sincos(source, name, tensor):
  table = tensor.detach().float().numpy().reshape(tensor.shape[-2:])
  grid = int(round((table.shape[0] - 1) ** 0.5))
  err = float(np.max(np.abs(table - sincos_2d(table.shape[1], grid))))
  if err > SINCOS_ATOL:
    raise CheckpointError(
        f'{source}: {name} is not the fixed 2D sin-cos table (max abs diff '
        f'{err:.3g} > {SINCOS_ATOL}); the MAE cannot hold a learned {name}')


def _pop_to_flax(state_dict, keys):
  """Converts and removes `keys` one by one, so memory is freed as we go."""
  flat = {}
  for key in keys:
    tensor = state_dict.pop(key)
    flat[to_flax_path(key, tensor.ndim)] = tensor_to_flax(tensor)
    del tensor
  return flat


def _missing_decoder(source):
  return CheckpointError(
      f'{source}: the file holds no decoder (mask_token, decoder_embed, '
      'decoder_blocks.*, decoder_norm, decoder_pred are missing), so it cannot '
      'become a full MAE; full weights are in mae_pretrain_vit_*_full.pth or '
      'mae_visualize_vit_*.pth; to fine-tune, convert it with --model '
      'vit_<size> instead')


def mae_from_torch(state_dict, model, source='<state dict>'):
  """Strict torch state dict -> MAE params. Consumes `state_dict`.

  Returns (params, skipped) where skipped lists the checked fixed tables.
  """
  expected = torch_shapes(model)
  if 'decoder_embed.weight' not in state_dict:
    raise _missing_decoder(source)
  check_keys(source, state_dict, expected)
  for name in FIXED_TABLES:
    _check_sincos(source, name, state_dict.pop(name))
  flat = _pop_to_flax(state_dict, list(state_dict))
  skipped = [f'{n} (fixed sin-cos table, matches the formula within '
             f'{SINCOS_ATOL})' for n in FIXED_TABLES]
  return traverse_util.unflatten_dict(flat), skipped


def _fresh_params(model, rng, paths):
  """Initialises only the parameters at `paths` (XLA drops the rest)."""
  size = model.img_size
  imgs = jnp.zeros((1, size, size, 3), jnp.float32)

  def init(key):
    flat = traverse_util.flatten_dict(model.init(key, imgs)['params'])
    return {p: flat[p] for p in paths}
  return {p: np.asarray(v) for p, v in jax.jit(init)(rng).items()}


def classifier_from_encoder(flat, model, rng, source='<state dict>'):
  """Fine-tuning init: encoder params (flat Flax dict, pos_embed as
  (1, 1+L, D)) -> classifier params with fresh head (and fc_norm when
  global_pool); pos_embed is resampled bicubically to the model's grid.

  Returns (params, fresh, skipped): names initialised fresh and source
  entries not used. `flat` is unrolled; params are in the model's layout.
  """
  expected = traverse_util.flatten_dict(
      unstack_blocks(checkpoint.abstract_params(model)))
  fresh_modules = ('head', 'fc_norm') if model.global_pool else ('head',)
  fresh = [p for p in expected if p[0] in fresh_modules]
  params, missing, wrong = {}, [], []
  for path, leaf in expected.items():
    if path in fresh:
      continue
    if path not in flat:
      missing.append(to_torch_key(path))
      continue
    value = np.asarray(flat[path])
    if path == ('pos_embed',) and value.shape != leaf.shape:
      value = resize_grid(value[0], model.grid_size)[None]
    if value.shape != tuple(leaf.shape):
      wrong.append(f'{to_torch_key(path)} {value.shape} '
                   f'(expected {tuple(leaf.shape)})')
    params[path] = value
  if missing or wrong:
    raise CheckpointError(f'{source}: encoder weights do not fit '
                          f'{type(model).__name__}; missing: {missing}; '
                          f'wrong shape: {wrong}')
  params.update(_fresh_params(model, rng, fresh))
  skipped = sorted(to_torch_key(p) for p in set(flat) - set(params))
  fresh_names = sorted({to_torch_key(p[:1]) + '.*' for p in fresh})
  params = {p: params[p] for p in expected}  # keep the model's order
  params = to_layout(traverse_util.unflatten_dict(params), model.scan_blocks)
  return params, fresh_names, skipped


def _flat_encoder(path_or_state):
  """Encoder weights as a flat Flax dict (unrolled blocks) with pos_embed
  (1, 1+L, D)."""
  if isinstance(path_or_state, (str, os.PathLike)):
    if os.path.isdir(path_or_state):
      model, variables = checkpoint.load(path_or_state, scan_blocks=False)
      flat = traverse_util.flatten_dict(variables['params'])
      if isinstance(model, MaskedAutoencoder):
        flat[('pos_embed',)] = sincos_2d(model.embed_dim, model.grid_size)[None]
      return flat
    state, _ = read_state_dict(path_or_state)
  else:
    state = dict(path_or_state.get('params', path_or_state))
    if not any('.' in k for k in state):  # a Flax params tree
      return traverse_util.flatten_dict(unstack_blocks(state))
  return _pop_to_flax(dict(state), list(state))


def init_classifier_from(path_or_state, model, rng):
  """{'params': ...} for the classifier `model`, its encoder filled from
  pretrained weights (.pth/.safetensors path, mae_jax checkpoint dir, torch
  state dict or Flax params tree) and its head/fc_norm freshly initialised."""
  source = (os.fspath(path_or_state)
            if isinstance(path_or_state, (str, os.PathLike)) else '<weights>')
  params, _, _ = classifier_from_encoder(_flat_encoder(path_or_state), model,
                                         rng, source)
  return {'params': params}


def _param_count(params):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def from_torch(state_dict, model_name=None, extras=None, source='<weights>',
               rng=None, scan_blocks=False):
  """torch state dict -> (model, params, report lines). Consumes state_dict.

  The model is `model_name` (registry name) or detected from the keys; with
  scan_blocks it is the nn.scan variant and its params are stacked.
  """
  extras = extras or {}
  found = detect(state_dict, source)
  if model_name is None:
    prefix = 'vit_' if found.kind.startswith('classifier') else 'mae_vit_'
    model_name = prefix + found.size
  if model_name in MAE_CONFIGS:
    overrides = {k: v for k, v in found.overrides.items() if k == 'img_size'}
    args = extras.get('args')
    if hasattr(args, 'norm_pix_loss'):
      overrides['norm_pix_loss'] = bool(args.norm_pix_loss)
  elif model_name in VIT_CONFIGS:
    overrides = dict(found.overrides)
  else:
    create_model(model_name)  # raises, listing the known names
  model = create_model(model_name, **overrides, scan_blocks=scan_blocks)
  report = [f'source kind: {found.kind} (size {found.size})']
  if isinstance(model, MaskedAutoencoder):
    if found.kind != 'mae':
      raise _missing_decoder(source)
    params, skipped = mae_from_torch(state_dict, model, source)
  elif found.kind.startswith('classifier'):
    check_keys(source, state_dict, torch_shapes(model))
    params = traverse_util.unflatten_dict(
        _pop_to_flax(state_dict, list(state_dict)))
    skipped = []
  else:
    rng = jax.random.key(0) if rng is None else rng
    flat = _pop_to_flax(state_dict, list(state_dict))
    params, fresh, skipped = classifier_from_encoder(flat, model, rng, source)
    report.append('initialised fresh (fine-tuning init): ' + ', '.join(fresh))
  params = to_layout(params, scan_blocks)
  skipped += [f'{k} (training state, not weights)' for k in extras
              if k in TRAINING_KEYS]
  skipped += [f'{k} (not model weights)' for k in extras
              if k not in TRAINING_KEYS]
  fields = checkpoint.model_description(model)['fields']
  report += [f'model: {model_name} {type(model).__name__}({fields})',
             f'parameters: {_param_count(params):,}',
             'skipped on purpose: ' + ('; '.join(skipped) or 'nothing')]
  return model, params, report


def convert_file(src, dst, model_name=None):
  """Converts a .pth/.pt/.safetensors file into the mae_jax directory `dst`.

  Returns report lines. Nothing is written unless conversion succeeds.
  """
  if os.path.exists(dst):
    raise CheckpointError(f'{dst}: already exists; remove it or choose another '
                          'destination')
  state_dict, extras = read_state_dict(src)
  model, params, report = from_torch(state_dict, model_name, extras,
                                     os.fspath(src))
  checkpoint.save(dst, model, {'params': params})
  return report


# ------------------------------------------------------------ flax -> torch
def to_torch(model, params):
  """Params -> ordered torch state dict in the official key layout; the MAE
  gains its fixed pos_embed / decoder_pos_embed tables (1, 1+L, D). Params
  may be in either block layout."""
  import torch  # pylint: disable=import-outside-toplevel
  flat = traverse_util.flatten_dict(unstack_blocks(params))
  state = collections.OrderedDict()
  for key, shape in torch_shapes(model).items():
    if isinstance(model, MaskedAutoencoder) and key in FIXED_TABLES:
      table = sincos_2d(shape[-1], model.grid_size)[None]
      state[key] = torch.from_numpy(table)
      continue
    path = to_flax_path(key, len(shape))
    if path not in flat:
      raise CheckpointError(f'parameter {"/".join(path)} is missing')
    state[key] = array_to_torch(path, flat.pop(path))
  return state


def export_file(src, dst):
  """mae_jax checkpoint `src` -> .pth `dst` holding {'model': state_dict}."""
  from mae_jax.torch_io import write_pth  # pylint: disable=import-outside-toplevel
  if os.path.exists(dst):
    raise CheckpointError(f'{dst}: already exists; remove it or choose another '
                          'destination')
  model, variables = checkpoint.load(src)
  state = to_torch(model, variables['params'])
  write_pth(dst, state)
  return [f'model: {type(model).__name__}',
          f'tensors: {len(state)}, parameters: '
          f'{sum(t.numel() for t in state.values()):,}']
