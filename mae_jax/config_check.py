"""Checks a pretraining config before anything is compiled.

Each error is one line naming the field, the bad value and what is allowed.
"""
from mae_jax.models import MAE_CONFIGS, VIT_CONFIGS

KNOWN_DTYPES = ('float32', 'bfloat16')
LOCAL_SOURCES = ('embedded', 'folder')


class ConfigError(ValueError):
  """A config field holds a value that cannot work."""


def check_pretrain_config(config):
  """Raises ConfigError naming the first bad field."""
  _check_common(config, MAE_CONFIGS)
  if not 0.0 < config.mask_ratio < 1.0:
    raise ConfigError(f'config.mask_ratio={config.mask_ratio} must lie in the '
                      'open interval (0, 1)')


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
  name, data_dir = config.data.name, config.data.data_dir
  if name == 'folder' and not data_dir:
    raise ConfigError("config.data.data_dir is required for "
                      "config.data.name='folder' (DIR/<split>/<class>/*.jpg)")
  if name not in LOCAL_SOURCES and not data_dir:
    raise ConfigError(f'config.data.data_dir is required for the tfds dataset '
                      f'config.data.name={name!r}; use one of '
                      f'{", ".join(LOCAL_SOURCES)} or a tfds name with its '
                      'data_dir')
