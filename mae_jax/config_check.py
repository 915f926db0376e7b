"""Checks a config before anything is compiled, and a resumed run against
the config its checkpoint was written with.

Each error is one line naming the field, the bad value and what is allowed.
"""
import json
import math
import numbers

from mae_jax.errors import ConfigError
from mae_jax.models import MAE_CONFIGS, VIT_CONFIGS
from mae_jax.models.geometry import image_hw, normalize_img_size

KNOWN_DTYPES = ('float32', 'bfloat16')
LOCAL_SOURCES = ('embedded', 'folder')
ON_ERROR = ('skip', 'fail')
# Resuming is deny-by-default: every config field must equal the one the
# checkpoint was written with, except these, which change how a run is
# executed, logged or saved but not the updates it computes (mesh and
# attention kernels change float rounding only; skip_nonfinite and
# data.on_error only act on a failure, and are how one answers it).
# Anything else (recipe, schedule, data, model, dtype) needs
# config.resume_override.
NOT_TRAJECTORY = ('log_every_steps', 'checkpoint_every_steps',
                  'keep_checkpoints', 'figure_every_steps',
                  'eval_every_steps', 'eval_only', 'data.eval_split', 'mesh',
                  'attention', 'remat', 'fuse_patch_gather', 'skip_nonfinite',
                  'data.on_error', 'resume_override')
# Saved model fields that mirror a NOT_TRAJECTORY config field.
_MODEL_NOT_TRAJECTORY = ('fuse_patch_gather',)
ATTENTION = ('default', 'xla', 'cudnn', 'chunked')
CHANNELS = (1, 3)  # image files decode to grayscale or RGB
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # data.mean / data.std defaults
IMAGENET_STD = (0.229, 0.224, 0.225)


def check_image_fields(image_size, channels=3, mean=IMAGENET_MEAN,
                       std=IMAGENET_STD):
  """Checks data.image_size (an int or an (H, W) pair), data.channels and
  the per-channel data.mean / data.std; returns ((H, W), channels, mean,
  std) with mean / std as tuples of floats. Raises ConfigError naming the
  first bad field."""
  try:
    hw = image_hw(image_size)
  except ValueError:
    raise ConfigError(f'config.data.image_size={image_size!r} must be a '
                      'positive int or an (H, W) pair of them, e.g. '
                      '--config.data.image_size=(64,48)') from None
  if channels not in CHANNELS or isinstance(channels, bool):
    raise ConfigError(f'config.data.channels={channels!r} is not supported: '
                      'images decode to 1 (grayscale) or 3 (RGB) channels')
  stats = {}
  for name, value in (('mean', mean), ('std', std)):
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    example = ','.join(['0.5'] * channels) + (',' if channels == 1 else '')
    if (len(values) != channels or not all(
        isinstance(v, numbers.Real) and not isinstance(v, bool)
        and math.isfinite(v) for v in values)):
      raise ConfigError(f'config.data.{name}={value!r} must hold '
                        f'config.data.channels={channels} finite numbers, one '
                        f'per channel, e.g. --config.data.{name}='
                        f'({example})')
    stats[name] = tuple(float(v) for v in values)
  if not all(v > 0 for v in stats['std']):
    raise ConfigError(f'config.data.std={std!r} must be positive')
  return hw, channels, stats['mean'], stats['std']


def check_pretrain_config(config):
  """Raises ConfigError naming the first bad field."""
  _check_common(config, MAE_CONFIGS)
  if not 0.0 < config.mask_ratio < 1.0:
    raise ConfigError(f'config.mask_ratio={config.mask_ratio} must lie in the '
                      'open interval (0, 1)')
  if config.attention not in ATTENTION:
    raise ConfigError(f'config.attention={config.attention!r} is unknown; '
                      f'allowed: {", ".join(ATTENTION)}')


TASKS = ('finetune', 'linprobe')


def check_classifier_config(config):
  """Raises ConfigError naming the first bad field of a fine-tune/probe
  config."""
  if config.task not in TASKS:
    raise ConfigError(f'config.task={config.task!r} is unknown; allowed: '
                      f'{", ".join(TASKS)}')
  _check_common(config, VIT_CONFIGS)
  if config.num_classes < 0:
    raise ConfigError(f'config.num_classes={config.num_classes} must be >= 0 '
                      '(0: taken from the dataset)')
  if config.eval_every_steps < 1:
    raise ConfigError(f'config.eval_every_steps={config.eval_every_steps} '
                      'must be >= 1')


def _check_common(config, registry):
  if config.model not in registry:
    raise ConfigError(f'config.model={config.model!r} is unknown; allowed: '
                      f'{", ".join(registry)}')
  patch = registry[config.model]['patch_size']
  size = config.data.image_size
  hw, _, _, _ = check_image_fields(
      size, *(config.data.get(k, d) for k, d in (
          ('channels', 3), ('mean', IMAGENET_MEAN), ('std', IMAGENET_STD))))
  if any(side % patch for side in hw):
    raise ConfigError(f'config.data.image_size={normalize_img_size(size)!r} '
                      f'is not a multiple of the patch size {patch} of '
                      f'{config.model}')
  if config.dtype not in KNOWN_DTYPES:
    raise ConfigError(f'config.dtype={config.dtype!r} is unknown; allowed: '
                      f'{", ".join(KNOWN_DTYPES)}')
  for field in ('batch_size', 'accum_iter', 'log_every_steps',
                'checkpoint_every_steps', 'keep_checkpoints'):
    if getattr(config, field) < 1:
      raise ConfigError(f'config.{field}={getattr(config, field)} must be '
                        '>= 1')
  if config.total_steps <= 0 and config.epochs <= 0:
    raise ConfigError('config.total_steps and config.epochs are both <= 0; '
                      'set one of them to a positive number')
  on_error = config.data.get('on_error', 'skip')
  if on_error not in ON_ERROR:
    raise ConfigError(f'config.data.on_error={on_error!r} is unknown; '
                      f'allowed: {", ".join(ON_ERROR)}')
  for field in ('max_pixels', 'shuffle_buffer', 'repeats'):
    value = config.data.get(field)
    if value is not None and value < 1:
      raise ConfigError(f'config.data.{field}={value} must be >= 1')
  resume_overrides(config)
  name, data_dir = config.data.name, config.data.data_dir
  if name == 'folder' and not data_dir:
    raise ConfigError("config.data.data_dir is required for "
                      "config.data.name='folder' (DIR/<split>/<class>/*.jpg)")
  if name not in LOCAL_SOURCES and not data_dir:
    raise ConfigError(f'config.data.data_dir is required for the tfds dataset '
                      f'config.data.name={name!r}; use one of '
                      f'{", ".join(LOCAL_SOURCES)} or a tfds name with its '
                      'data_dir')


def _flat(tree, prefix=''):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def resume_overrides(config):
  """Field names of config.resume_override ('total_steps,epochs'), each a
  config field; raises ConfigError naming one that is not."""
  names = [n.strip() for n in (config.get('resume_override') or '').split(',')
           if n.strip()]
  fields = _flat(json.loads(config.to_json()))
  for name in names:
    if name not in fields:
      raise ConfigError(f'config.resume_override names {name!r}, which is '
                        'not a config field (write nested ones as '
                        'data.image_size)')
  return names


def check_resume(config, saved_config, model, saved_model, where):
  """Compares a run with the checkpoint at `where` (its saved config and
  model description, JSON dicts) before it is restored.

  Every config field must be equal, except NOT_TRAJECTORY and the fields
  named in config.resume_override; fields absent from either side (added
  to the configs after the checkpoint was written) are not compared.
  Raises ConfigError naming every differing field; returns one
  'FIELD: OLD -> NEW' string per difference resume_override allowed.
  """
  now = _flat(json.loads(config.to_json()))
  then = _flat(saved_config)
  allowed = resume_overrides(config)
  differ = [k for k in now if k in then and then[k] != now[k]
            and k not in NOT_TRAJECTORY]
  overridden = [f'{k}: {then[k]!r} -> {now[k]!r}' for k in differ
                if k in allowed]
  diffs = [f'{k}={then[k]!r} (checkpoint) != {now[k]!r} (now)'
           for k in differ if k not in allowed]
  if not diffs:  # same config fields; the module itself may still differ
    fields = json.loads(json.dumps(model))
    diffs = [f'model.{k}={v!r} (checkpoint) != {fields["fields"].get(k)!r} '
             '(now)' for k, v in saved_model.get('fields', {}).items()
             if fields['fields'].get(k) != v
             and k not in _MODEL_NOT_TRAJECTORY]
    if saved_model.get('class') != fields['class']:
      diffs.insert(0, f'model class {saved_model.get("class")!r} '
                   f'(checkpoint) != {fields["class"]!r} (now)')
  if diffs:
    raise ConfigError(
        f'checkpoint {where} was written by another config: '
        f'{"; ".join(diffs)}; resuming would change the run. Use its config, '
        'another --workdir, or allow the change with '
        '--config.resume_override=FIELD[,FIELD...]')
  return overridden
