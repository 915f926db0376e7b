"""PyTorch (official MAE / timm layout) <-> mae_jax parameter trees.

`convert_file` / `export_file` are the entry points of every conversion;
ViTPose files (official mmpose .pth, Hugging Face directories) are handed
to mae_jax.pose.convert.

Key names, tensor layouts and file-kind detection are in
mae_jax.torch_layout. The MAE's pos_embed and decoder_pos_embed are fixed
sin-cos tables: checked on the way in, rebuilt on the way out. Every
conversion is strict: any missing, unexpected or mis-shaped key is an error
that names them all, and so is a NaN or Inf in any weight unless
`allow_nonfinite` keeps it (with a warning).

Input geometry: a file's in_chans comes from its patch-embedding kernel and
its grid from pos_embed (a non-square grid needs img_size=(H, W)). Asking
for another img_size recomputes the MAE's fixed tables and resamples a
learned pos_embed bicubically; another in_chans adapts the patch-embedding
kernel (mae_jax.checkpoint.to_geometry).

Inputs may be torch tensors or NumPy arrays (a .safetensors file read without
torch); only the .pth side of a conversion needs torch.

Models with scan_blocks=True hold their blocks stacked ('blocks/...' with a
leading layer axis, see mae_jax.models.scan_layout): conversion always goes
through the unrolled layout (the one the official key names map to), and
params are stacked or unstacked at the edges, so every function here takes
and returns the layout of the model it is given.
"""
import collections
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mae_jax import checkpoint, extras as extras_lib, paths, weights
from mae_jax.models import (MAE_CONFIGS, VIT_CONFIGS, create_model,
                            model_input_shape)
from mae_jax.models import (POSE_CONFIGS, MaskedAutoencoder, ViTPose,
                            to_layout, unstack_blocks)
from mae_jax.models.pos_embed import resize_grid, sincos_2d
from mae_jax.pose import convert as pose_convert, layout as pose_layout
from mae_jax.torch_io import TRAINING_KEYS, CheckpointError, read_state_dict
from mae_jax.torch_layout import (array_to_torch, as_numpy, check_keys, detect,
                                  to_flax_path, to_torch_key, torch_shapes)

FIXED_TABLES = ('pos_embed', 'decoder_pos_embed')
SINCOS_ATOL = 1e-6


# ------------------------------------------------------------ torch -> flax
def _check_sincos(source, name, tensor, grid_size):
  table = as_numpy(tensor).astype(np.float32).reshape(tensor.shape[-2:])
  err = float(np.max(np.abs(table - sincos_2d(table.shape[1], grid_size))))
  if not err <= SINCOS_ATOL:  # also catches NaN
    raise CheckpointError(
        f'{source}: {name} is not the fixed 2D sin-cos table (max abs diff '
        f'{err:.3g} > {SINCOS_ATOL}); the MAE cannot hold a learned {name}')


def _missing_decoder(source):
  return CheckpointError(
      f'{source}: the file holds no decoder (mask_token, decoder_embed, '
      'decoder_blocks.*, decoder_norm, decoder_pred are missing), so it cannot '
      'become a full MAE; full weights are in mae_pretrain_vit_*_full.pth or '
      'mae_visualize_vit_*.pth; to fine-tune, convert it with --model '
      'vit_<size> instead')


def mae_from_torch(state_dict, model, source='<state dict>',
                   allow_nonfinite=False, warn=None):
  """Strict torch state dict -> MAE params. Consumes `state_dict`.

  Returns (params, skipped) where skipped lists the checked fixed tables.
  """
  expected = torch_shapes(model)
  if 'decoder_embed.weight' not in state_dict:
    raise _missing_decoder(source)
  check_keys(source, state_dict, expected)
  for name in FIXED_TABLES:
    _check_sincos(source, name, state_dict.pop(name), model.grid_size)
  flat = weights.pop_to_flax(state_dict, list(state_dict), source,
                             allow_nonfinite, warn)
  skipped = [f'{n} (fixed sin-cos table, matches the formula within '
             f'{SINCOS_ATOL})' for n in FIXED_TABLES]
  return traverse_util.unflatten_dict(flat), skipped


def _fresh_params(model, rng, wanted):
  """Initialises only the parameters at `paths` (XLA drops the rest)."""
  imgs = jnp.zeros((1, *model_input_shape(model)), jnp.float32)

  def init(key):
    flat = traverse_util.flatten_dict(model.init(key, imgs)['params'])
    return {p: flat[p] for p in wanted}
  return {p: np.asarray(v) for p, v in jax.jit(init)(rng).items()}


def classifier_from_encoder(flat, model, rng, source='<state dict>',
                            old_grid=None, adapt_in_chans=False):
  """Fine-tuning init: encoder params (flat Flax dict, pos_embed as
  (1, 1+L, D)) -> classifier params with fresh head (and fc_norm when
  global_pool); pos_embed is resampled bicubically from `old_grid` ((gh, gw);
  by default the square grid its L gives) to the model's grid, and a
  patch-embedding kernel of another channel count is adapted when
  `adapt_in_chans` (mae_jax.checkpoint.adapt_patch_kernel).

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
      value = resize_grid(value[0], model.grid_size, old_grid=old_grid)[None]
    if path == ('patch_embed', 'kernel') and value.ndim == 4:
      value = checkpoint.fit_patch_kernel(value, model.in_chans,
                                          adapt_in_chans, source)
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


def init_classifier_from(path_or_state, model, rng, old_grid=None,
                         adapt_in_chans=False):
  """{'params': ...} for the classifier `model`, its encoder filled from
  pretrained weights (.pth/.safetensors path, mae_jax checkpoint dir, torch
  state dict or Flax params tree) and its head/fc_norm freshly initialised.
  `old_grid` is the (gh, gw) grid of a non-square torch file or Flax tree (a
  checkpoint dir knows its own); `adapt_in_chans` as in
  `classifier_from_encoder`."""
  source = (os.fspath(path_or_state)
            if isinstance(path_or_state, (str, os.PathLike)) else '<weights>')
  flat, grid = weights.flat_encoder(path_or_state, source)
  params, _, _ = classifier_from_encoder(
      flat, model, rng, source, grid or old_grid, adapt_in_chans)
  return {'params': params}


def norm_pix_setting(norm_pix_loss=None, extras=None):
  """(norm_pix_loss, where it came from) for an MAE made from a torch file,
  which holds no model description: the caller's switch when given, else a
  training checkpoint's args.norm_pix_loss, else the model default."""
  args = (extras or {}).get('args')
  in_args = getattr(args, 'norm_pix_loss', None)
  if norm_pix_loss is not None:
    where = f'from --{"" if norm_pix_loss else "no-"}norm-pix-loss'
    if in_args is not None and bool(in_args) != norm_pix_loss:
      where += f"; the file's args say {bool(in_args)}"
    return bool(norm_pix_loss), where
  if in_args is not None:
    return bool(in_args), "from the file's args"
  return MaskedAutoencoder.norm_pix_loss, ('default; pass --norm-pix-loss if '
                                           'the weights were trained with it')


def from_torch(state_dict, model_name=None, extras=None, source='<weights>',
               rng=None, scan_blocks=False, norm_pix_loss=None,
               allow_nonfinite=False, warn=None, img_size=None,
               in_chans=None):
  """torch state dict -> (model, params, report lines). Consumes state_dict.

  The model is `model_name` (registry name) or detected from the keys; with
  scan_blocks it is the nn.scan variant and its params are stacked. Its
  geometry is the file's unless `img_size` (int or (H, W)) or `in_chans`
  (adapting the patch-embedding kernel) say otherwise. An MAE's
  norm_pix_loss comes from `norm_pix_setting(norm_pix_loss, extras)`; a
  classifier has no pixel loss, so passing norm_pix_loss for one is an error.
  Non-finite weights are refused unless `allow_nonfinite` (then `warn`ed).
  """
  extras = extras or {}
  found = detect(state_dict, source, img_size)
  if model_name is None:
    prefix = 'vit_' if found.kind.startswith('classifier') else 'mae_vit_'
    model_name = prefix + found.size
  report = [f'source kind: {found.kind} (size {found.size})']
  if model_name in MAE_CONFIGS:
    overrides = {k: v for k, v in found.overrides.items()
                 if k in ('img_size', 'in_chans')}
    overrides['norm_pix_loss'], where = norm_pix_setting(norm_pix_loss, extras)
    report.append(f'norm_pix_loss: {overrides["norm_pix_loss"]} ({where})')
  elif model_name in VIT_CONFIGS:
    overrides = dict(found.overrides)
    if norm_pix_loss is not None:
      raise CheckpointError(
          f'{source}: --[no-]norm-pix-loss applies to MAE conversion only; '
          f'{model_name} is a classifier, which has no pixel loss to record')
  else:
    raise CheckpointError(f'unknown model name {model_name!r}; known names: '
                          + ', '.join(sorted(MAE_CONFIGS) + sorted(VIT_CONFIGS)))
  stored = create_model(model_name, **overrides)
  model, lines = _target_model(stored, img_size, in_chans, source)
  report += lines
  nonfinite = dict(source=source, allow_nonfinite=allow_nonfinite, warn=warn)
  if isinstance(model, MaskedAutoencoder):
    if found.kind != 'mae':
      raise _missing_decoder(source)
    params, skipped = mae_from_torch(state_dict, stored, **nonfinite)
    params = checkpoint.to_geometry(params, stored, model, True, source)
  elif found.kind.startswith('classifier'):
    check_keys(source, state_dict, torch_shapes(stored))
    params = traverse_util.unflatten_dict(
        weights.pop_to_flax(state_dict, list(state_dict), **nonfinite))
    params = checkpoint.to_geometry(params, stored, model, True, source)
    skipped = []
  else:
    rng = jax.random.key(0) if rng is None else rng
    flat = weights.pop_to_flax(state_dict, list(state_dict), **nonfinite)
    old_grid = stored.grid_size if 'img_size' in found.overrides else None
    params, fresh, skipped = classifier_from_encoder(
        flat, model.clone(scan_blocks=False), rng, source, old_grid, True)
    report.append('initialised fresh (fine-tuning init): ' + ', '.join(fresh))
  model = model.clone(scan_blocks=scan_blocks)
  params = to_layout(params, scan_blocks)
  skipped += [f'{k} (training state, not weights)' for k in extras
              if k in TRAINING_KEYS]
  skipped += [f'{k} (not model weights)' for k in extras
              if k not in TRAINING_KEYS]
  fields = checkpoint.model_description(model)['fields']
  report += [f'model: {model_name} {type(model).__name__}({fields})',
             f'parameters: {weights.param_count(params):,}',
             'skipped on purpose: ' + ('; '.join(skipped) or 'nothing')]
  return model, params, report


def _target_model(stored, img_size, in_chans, source):
  """(model at the asked geometry, report lines) from the file's model."""
  changes = {}
  if img_size is not None:
    changes['img_size'] = img_size
  if in_chans is not None and in_chans != stored.in_chans:
    changes['in_chans'] = in_chans
  try:
    model = stored.clone(**changes)
    grid = model.grid_size
  except ValueError as e:
    raise CheckpointError(f'{source}: {e}') from None
  lines = []
  if grid != stored.grid_size:
    how = ('fixed sin-cos tables recomputed'
           if isinstance(stored, MaskedAutoencoder)
           else 'pos_embed resampled bicubically')
    lines.append(f'grid: {"x".join(map(str, stored.grid_size))} patches in '
                 f'the file -> {"x".join(map(str, grid))} ({how})')
  if model.in_chans != stored.in_chans:
    lines.append(f'in_chans: {stored.in_chans} in the file -> '
                 f'{model.in_chans} (patch-embedding kernel adapted)')
  return model, lines


def convert_file(src, dst, model_name=None, norm_pix_loss=None,
                 allow_nonfinite=False, warn=None, img_size=None,
                 in_chans=None, head=None):
  """Converts weights into the mae_jax directory `dst`: an MAE / ViT
  .pth/.pt/.safetensors file (options as in `from_torch`), an official
  ViTPose .pth or a Hugging Face VitPose directory (mae_jax.pose.convert),
  or, with a ViTPose `model_name`, MAE / ViT weights (a file or a mae_jax
  checkpoint directory) as the backbone of a new pose model with the
  `head` ('classic' by default) fresh.

  Returns report lines. Nothing is written unless conversion succeeds.
  """
  weights.refuse_existing(dst)
  source = os.fspath(src)
  nonfinite = dict(allow_nonfinite=allow_nonfinite, warn=warn)
  pose_init = model_name in POSE_CONFIGS
  _refuse_options(source, pose_init, norm_pix_loss, in_chans, head)
  if pose_convert.is_hf_directory(src):
    model, variables, report = pose_convert.from_hf_directory(src, **nonfinite)
  elif pose_init and paths.resolve(src).is_dir():
    model, variables, report = _pose_init(src, model_name, img_size, head)
  else:
    state_dict, extras = read_state_dict(src)
    if pose_layout.is_pose_state(state_dict):
      model, variables, report = pose_convert.from_official_state(
          state_dict, extras, source, model_name, img_size, **nonfinite)
    elif pose_init:
      model, variables, report = _pose_init(state_dict, model_name, img_size,
                                            head, source)
    else:
      model, params, report = from_torch(
          state_dict, model_name, extras, source, norm_pix_loss=norm_pix_loss,
          img_size=img_size, in_chans=in_chans, **nonfinite)
      variables = {'params': params}
  checkpoint.save(dst, model, variables)
  return report


def _refuse_options(source, pose_init, norm_pix_loss, in_chans, head):
  """Options that do not apply to the conversion asked for."""
  if pose_init and norm_pix_loss is not None:
    raise CheckpointError(f'{source}: --[no-]norm-pix-loss applies to MAE '
                          'conversion only, not to a ViTPose')
  if pose_init and in_chans is not None:
    raise CheckpointError(f'{source}: --in-chans is not supported for a '
                          'ViTPose initialisation')
  if head is not None and not pose_init:
    raise CheckpointError(f'{source}: --head applies to a ViTPose '
                          'initialisation only (--model vitpose_...)')


def _pose_init(src, model_name, img_size, head, source=None):
  """(model, variables, report) of a ViTPose whose backbone comes from MAE
  / ViT weights (mae_jax.pose.convert.init_from_encoder)."""
  fields = {'head': head} if head else {}
  if img_size is not None:
    fields['img_size'] = img_size
  model = create_model(model_name, **fields)
  variables, report = pose_convert.init_from_encoder(
      src, model, jax.random.key(0), source)
  return model, variables, [f'model: {model_name} (head {model.head})'] + report


# ------------------------------------------------------------ flax -> torch
def to_torch(model, params, source='<params>', allow_nonfinite=False,
             warn=None):
  """Params -> ordered torch state dict in the official key layout; the MAE
  gains its fixed pos_embed / decoder_pos_embed tables (1, 1+L, D). Params
  may be in either block layout. Non-finite values are refused unless
  `allow_nonfinite` (then `warn`ed)."""
  torch = extras_lib.require('torch', 'torch', 'writing .pth files')
  flat = traverse_util.flatten_dict(unstack_blocks(params))
  state, bad = collections.OrderedDict(), []
  for key, shape in torch_shapes(model).items():
    if isinstance(model, MaskedAutoencoder) and key in FIXED_TABLES:
      table = sincos_2d(shape[-1], model.grid_size)[None]
      state[key] = torch.from_numpy(table)
      continue
    path = to_flax_path(key, len(shape))
    if path not in flat:
      raise CheckpointError(f'parameter {"/".join(path)} is missing')
    arr = np.asarray(flat.pop(path))
    bad.append(weights.describe_nonfinite(key, path, arr))
    state[key] = array_to_torch(path, arr)
  weights.refuse_nonfinite(source, [b for b in bad if b], allow_nonfinite,
                           warn)
  return state


def export_file(src, dst, allow_nonfinite=False, warn=None):
  """mae_jax checkpoint `src` -> .pth `dst` holding {'model': state_dict}
  in the official MAE layout ({'state_dict': ...} in mmpose's for a
  ViTPose).

  Returns report lines; an MAE's norm_pix_loss, which a state dict cannot
  hold, is among them."""
  from mae_jax.torch_io import write_pth  # pylint: disable=import-outside-toplevel
  weights.refuse_existing(dst)
  model, variables = checkpoint.load(src)
  if isinstance(model, ViTPose):
    return pose_convert.export_pose(model, variables, src, dst,
                                    allow_nonfinite, warn)
  state = to_torch(model, variables['params'], os.fspath(src),
                   allow_nonfinite, warn)
  write_pth(paths.resolve(dst), state)
  report = [f'model: {type(model).__name__}']
  if isinstance(model, MaskedAutoencoder):
    report.append(f'norm_pix_loss: {model.norm_pix_loss} (from the checkpoint; '
                  'a state dict cannot hold it: pass --'
                  f'{"" if model.norm_pix_loss else "no-"}norm-pix-loss when '
                  'converting the .pth back)')
  return report + [f'tensors: {len(state)}, parameters: '
                   f'{sum(t.numel() for t in state.values()):,}']
