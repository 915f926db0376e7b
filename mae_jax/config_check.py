"""Checks a pretraining config before anything is compiled.

Each error is one line naming the field, the bad value and what is allowed.
"""
from mae_jax.models import MAE_CONFIGS, VIT_CONFIGS

KNOWN_DTYPES = ('float32', 'bfloat16')
LOCAL_SOURCES = ('embedded', 'folder')
ON_ERROR = ('skip', 'fail')
# Fields a resumed run must share with its checkpoint: they change the
# state's shapes or what the saved step and data position mean.
RESUME_FIELDS = ('task', 'model', 'norm_pix_loss', 'global_pool',
                 'num_classes', 'data.name', 'data.split', 'data.image_size',
                 'batch_size', 'accum_iter', 'seed')
ATTENTION = ('default', 'xla', 'cudnn', 'chunked')


class ConfigError(ValueError):
  """A config field holds a value that cannot work."""


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
  if size <= 0 or size % patch:
    raise ConfigError(f'config.data.image_size={size} is not a positive '
                      f'multiple of the patch size {patch} of {config.model}')
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
  if config.data.get('max_pixels', 1) < 1:
    raise ConfigError(f'config.data.max_pixels={config.data.max_pixels} must '
                      'be >= 1')
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


def check_resume(config, saved_config, model, saved_model, where):
  """Raises ConfigError naming every field in which the checkpoint at `where`
  (its saved config and model description, JSON dicts) differs from now."""
  import json
  now = _flat(json.loads(config.to_json()))
  then = _flat(saved_config)
  diffs = [f'{k}={then[k]!r} (checkpoint) != {now[k]!r} (now)'
           for k in RESUME_FIELDS if k in now and k in then
           and then[k] != now[k]]
  if not diffs:  # same config fields; the module itself may still differ
    fields = json.loads(json.dumps(model))
    diffs = [f'model.{k}={v!r} (checkpoint) != {fields["fields"].get(k)!r} '
             '(now)' for k, v in saved_model.get('fields', {}).items()
             if fields['fields'].get(k) != v]
    if saved_model.get('class') != fields['class']:
      diffs.insert(0, f'model class {saved_model.get("class")!r} '
                   f'(checkpoint) != {fields["class"]!r} (now)')
  if diffs:
    raise ConfigError(f'checkpoint {where} was written by another config: '
                      f'{"; ".join(diffs)}; use its config or another '
                      '--workdir')
