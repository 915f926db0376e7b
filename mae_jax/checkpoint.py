"""mae_jax checkpoints: an orbax CheckpointManager root with three items.

`params` holds the parameter tree (a model with BatchNorm adds a
`batch_stats` item, its running statistics), `model` the module
description {"class": ..., "fields": {...}} (JsonSave), so `load` rebuilds the
module without the caller naming it, and `checksums` (JsonSave)
{"params": {leaf name: checksum}} (mae_jax.checksums; training checkpoints
add one entry per saved state item). Converted files are saved at step 0.
`params` is written uncompressed by orbax's PyTree handler: the layout that
StandardSave writes and StandardRestore reads, but without zstd, which gains
little on float32 weights and doubled the peak memory of a conversion.

Block layout: a checkpoint stores the parameters in the layout of the model
it describes. `scan_blocks` is a saved model field (unlike `remat`, it
changes the parameter tree): False (also when the field is absent, as in
checkpoints written before it existed) means the unrolled 'blocks_{i}'
layout, True the stacked 'blocks' layout of nn.scan. `load(path,
scan_blocks=...)` converts to the layout asked for, so any checkpoint loads
into either kind of model; see mae_jax.models.scan_layout.

Checksums: `load` verifies the restored parameters against the step's
`checksums` item, before any conversion, and refuses a step whose data
changed since it was written (CorruptCheckpointError naming the leaf).
Steps written before checksums existed have no such item and load
unchecked.

Input geometry: `load(path, img_size=..., in_chans=...)` gives the model at
another image size or channel count (see `to_geometry`).

Paths: every function takes a str or path-like, relative (to the current
directory) or absolute, or an object-store URI such as gs://bucket/ckpt
(mae_jax.paths.resolve); error messages name the path as it was given.
"""
import dataclasses
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from mae_jax import paths
from mae_jax.checksums import numpy_tree_checksums, verify
from mae_jax.models import (MaskedAutoencoder, VisionTransformer, ViTPose,
                            model_input_shape, to_layout)
from mae_jax.models.pos_embed import resize_grid
from mae_jax.errors import CheckpointError

MODEL_CLASSES = {cls.__name__: cls
                 for cls in (MaskedAutoencoder, VisionTransformer, ViTPose)}
_NOT_SAVED = ('dtype', 'param_dtype', 'attention_impl', 'split_qkv',
              'fold_qkv_bias', 'remat', 'weight_init', 'parent', 'name')


def model_description(model):
  """{"class": name, "fields": {...}} with the JSON-able dataclass fields."""
  name = type(model).__name__
  if name not in MODEL_CLASSES:
    raise TypeError(f'cannot save a {name}; expected one of '
                    f'{", ".join(MODEL_CLASSES)}')
  fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
            if f.name not in _NOT_SAVED}
  return {'class': name, 'fields': fields}


def build_model(description, **overrides):
  """Inverse of `model_description`; overrides go to the constructor."""
  cls = MODEL_CLASSES.get(description.get('class'))
  if cls is None:
    raise CheckpointError(f'unknown model class {description.get("class")!r}')
  return cls(**{**description['fields'], **overrides})


def abstract_params(model):
  """ShapeDtypeStruct tree of the model's parameters (nothing allocated)."""
  return abstract_variables(model)['params']


def abstract_variables(model):
  """ShapeDtypeStruct trees of all the model's variable collections
  ({'params': ...} and, for a linear probe or ViTPose's classic head,
  'batch_stats')."""
  imgs = jax.ShapeDtypeStruct((1, *model_input_shape(model)), np.float32)
  if isinstance(model, MaskedAutoencoder):
    noise = jax.ShapeDtypeStruct((1, model.num_patches), np.float32)
    init = lambda key, x, n: model.init(key, x, noise=n)
    shapes = jax.eval_shape(init, jax.random.key(0), imgs, noise)
  else:
    shapes = jax.eval_shape(model.init, jax.random.key(0), imgs)
  return dict(shapes)


def save(directory, model, variables, step=0):
  """Writes model + params to a new orbax root `directory`, atomically.

  `variables` is {'params': tree} (with 'batch_stats' when the model has
  BatchNorm statistics) or the params tree itself. A local root
  is written to a temporary sibling and renamed, so a failure leaves no
  partial `directory`. On an object store (a URI), where a rename copies
  every object and is no more atomic, the root is written in place and a
  failed save removes what it wrote; only a process killed mid-save can
  leave a partial `directory` there, which a later `save` refuses to
  overwrite.
  """
  shown = os.fspath(directory)
  directory = paths.resolve(directory)
  if directory.exists():
    raise CheckpointError(f'{shown}: already exists; remove it or choose '
                          'another destination')
  items = dict(variables) if 'params' in variables else {'params': variables}
  items = {k: jax.tree.map(np.asarray, v) for k, v in items.items()
           if k in ('params', 'batch_stats')}
  in_place = paths.is_uri(directory)
  target = directory if in_place else (
      directory.parent / f'.{directory.name}.tmp-{os.getpid()}')
  target.rmtree(missing_ok=True)
  options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False,
                                         create=True)
  done = False
  try:
    handlers = {k: ocp.PyTreeCheckpointHandler(use_compression=False)
                for k in items}
    handlers.update(model=ocp.JsonCheckpointHandler(),
                    checksums=ocp.JsonCheckpointHandler())
    with ocp.CheckpointManager(target, options=options,
                               item_handlers=handlers) as mngr:
      mngr.save(step, args=ocp.args.Composite(
          model=ocp.args.JsonSave(model_description(model)),
          checksums=ocp.args.JsonSave(
              {k: numpy_tree_checksums(v) for k, v in items.items()}),
          **{k: ocp.args.PyTreeSave(v) for k, v in items.items()}))
    if not in_place:
      target.rename(directory)
    done = True
  finally:
    if not done:
      target.rmtree(missing_ok=True)


def _root(path):
  """The orbax root for `path`: itself or its `checkpoints/` subdirectory."""
  shown = os.fspath(path)
  path = paths.resolve(path)
  if not path.exists():
    raise CheckpointError(f'{shown}: no such checkpoint directory')
  if not path.is_dir():
    raise CheckpointError(f'{shown}: is a file, not a mae_jax checkpoint '
                          'directory (convert it with convert_torch_weights.py)')
  sub = path / 'checkpoints'
  return sub if sub.is_dir() else path


def read_checksums(mngr, step):
  """The `checksums` item of `step` ({item: {leaf name: checksum}}) through
  the orbax CheckpointManager `mngr`, or None when the step has none (it
  was written before checksums were). `mngr` must know the item: created
  without item_names, or with 'checksums' among them."""
  if not (mngr.directory / str(step) / 'checksums').exists():
    return None
  return mngr.restore(step, args=ocp.args.Composite(
      checksums=ocp.args.JsonRestore()))['checksums']


def is_checkpoint(path):
  """True when `path` (or path/checkpoints) holds a step with a model item."""
  try:
    root = _root(path)
  except CheckpointError:
    return False
  return any(d.name.isdigit() and (d / 'model').is_dir()
             for d in root.iterdir())


def load(path, step=None, adapt_in_chans=False, **overrides):
  """Restores (model, variables) from `path`: {'params': tree of NumPy
  arrays}, plus 'batch_stats' (the head's BatchNorm statistics) from a
  linear-probing workdir or a ViTPose with the classic head, so that
  `model.apply(variables, images)` runs.

  `path` is an orbax root written by `save` or a training workdir whose
  `checkpoints/` is one; the newest step is used unless `step` is given.
  Overrides (e.g. dtype=jnp.bfloat16) go to the module constructor;
  scan_blocks=True/False also converts the parameters to that block layout
  (the default is the layout the checkpoint was written in).
  img_size= and in_chans= give the model at another input geometry; the
  parameters follow as `to_geometry` describes (another channel count only
  with adapt_in_chans=True). A step whose parameters do not match the
  checksums saved with them raises CorruptCheckpointError naming the leaf.
  """
  root = _root(path)
  path = os.fspath(path)
  if not is_checkpoint(root):
    raise CheckpointError(f'{path}: not a mae_jax checkpoint (no step '
                          'directory with a "model" item)')
  geometry = {k: overrides.pop(k) for k in ('img_size', 'in_chans')
              if k in overrides}
  options = ocp.CheckpointManagerOptions(create=False)
  with ocp.CheckpointManager(root, options=options,
                             item_names=('params', 'model', 'checksums',
                                         'batch_stats')) as mngr:
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f'{path}: no finished checkpoint step')
    description = mngr.restore(
        step, args=ocp.args.Composite(model=ocp.args.JsonRestore()))['model']
    stored_scan = bool(description['fields'].get('scan_blocks', False))
    model = build_model(description, **{**overrides,
                                        'scan_blocks': stored_scan})
    expected = abstract_params(model)
    restore_args = jax.tree.map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), expected)
    try:
      params = mngr.restore(step, args=ocp.args.Composite(
          params=ocp.args.PyTreeRestore(item=expected,
                                        restore_args=restore_args)))['params']
    except (ValueError, KeyError, FileNotFoundError) as e:
      raise CheckpointError(f'{path}: parameters do not match '
                            f'{description["class"]}: {e}') from None
    variables = {'params': params, **_restore_batch_stats(mngr, step, model)}
    saved = read_checksums(mngr, step)
    if saved is not None:
      verify(saved, {k: numpy_tree_checksums(v) for k, v in variables.items()},
             f'{path}: checkpoint step {step}',
             f'; load another step with load(path, step=N) (steps: '
             f'{sorted(mngr.all_steps())})')
  _check_shapes(path, expected, params)
  if geometry:
    try:
      target = model.clone(**geometry)
      _ = target.grid_size
    except ValueError as e:
      raise CheckpointError(f'{path}: {e}') from None
    params = to_geometry(params, model, target, adapt_in_chans, path)
    model = target
    _check_shapes(path, abstract_params(model), params)
  scan = bool(overrides.get('scan_blocks', stored_scan))
  if scan != stored_scan:
    params = to_layout(params, scan)
    model = model.clone(scan_blocks=scan)
  return model, {**variables, 'params': params}


def _restore_batch_stats(mngr, step, model):
  """{'batch_stats': NumPy tree} of a linear-probing checkpoint (its head's
  BatchNorm statistics), or {} when `model` has none or the step lacks
  them."""
  expected = abstract_variables(model).get('batch_stats')
  if expected is None or not (mngr.directory / str(step) /
                              'batch_stats').exists():
    return {}
  restore_args = jax.tree.map(
      lambda _: ocp.RestoreArgs(restore_type=np.ndarray), expected)
  return {'batch_stats': mngr.restore(step, args=ocp.args.Composite(
      batch_stats=ocp.args.PyTreeRestore(
          item=expected, restore_args=restore_args)))['batch_stats']}


# -------------------------------------------------------- input geometry
def adapt_patch_kernel(kernel, in_chans):
  """(p, p, C0, D) patch-embedding kernel -> (p, p, in_chans, D).

  To 1 channel the kernel is summed over its input channels (a gray image
  repeated to C0 channels gives the same embedding); to other counts it is
  repeated cyclically over the channels and scaled by C0 / in_chans.
  """
  kernel = np.asarray(kernel)
  have = kernel.shape[2]
  if in_chans == have:
    return kernel
  if in_chans == 1:
    return kernel.sum(axis=2, keepdims=True)
  picks = np.arange(in_chans) % have
  return (kernel[:, :, picks] * (have / in_chans)).astype(kernel.dtype)


def fit_patch_kernel(kernel, in_chans, adapt, source):
  """`adapt_patch_kernel` when `adapt`; a channel mismatch otherwise is a
  CheckpointError naming in_chans."""
  have = np.shape(kernel)[2]
  if have == in_chans:
    return kernel
  if not adapt:
    raise CheckpointError(
        f'{source}: the patch embedding takes {have} channels, not '
        f'in_chans={in_chans}; ask for adapt_in_chans=True (convert_torch_'
        'weights.py --in-chans) to sum or repeat its kernel over channels')
  return adapt_patch_kernel(kernel, in_chans)


def to_geometry(params, stored, model, adapt_in_chans=False,
                source='<params>'):
  """Params of `stored` -> params of `model`, the same module at another
  img_size / in_chans (either block layout, unchanged).

  A learned pos_embed (the ViT's) is resampled bicubically from the stored
  grid to the new one (align_corners=False, cls row kept); the MAE's fixed
  sin-cos tables are not parameters and follow the grid by themselves. The
  patch-embedding kernel of another channel count is refused unless
  `adapt_in_chans` (see `adapt_patch_kernel`); an MAE's decoder_pred, which
  predicts p*p*in_chans values, cannot be adapted.
  """
  flat = dict(traverse_util.flatten_dict(params))
  if stored.in_chans != model.in_chans:
    if isinstance(model, MaskedAutoencoder):
      raise CheckpointError(
          f'{source}: the MAE predicts {stored.in_chans}-channel patches; '
          f'its decoder_pred cannot be adapted to in_chans={model.in_chans} '
          '(load or convert the encoder as a ViT classifier instead)')
    key = ('patch_embed', 'kernel')
    flat[key] = fit_patch_kernel(flat[key], model.in_chans, adapt_in_chans,
                                 source)
  if ('pos_embed',) in flat and stored.grid_size != model.grid_size:
    flat[('pos_embed',)] = resize_grid(
        np.asarray(flat[('pos_embed',)])[0], model.grid_size,
        old_grid=stored.grid_size)[None]
  return traverse_util.unflatten_dict(flat)


def _check_shapes(path, expected, params):
  want = traverse_util.flatten_dict(expected, sep='/')
  got = traverse_util.flatten_dict(params, sep='/')
  bad = [f'{k}: {got[k].shape} != {want[k].shape}' for k in want
         if k in got and tuple(got[k].shape) != tuple(want[k].shape)]
  missing = sorted(set(want) - set(got))
  if bad or missing:
    raise CheckpointError(f'{path}: parameter mismatch; missing: {missing}; '
                          f'wrong shape: {bad}')
