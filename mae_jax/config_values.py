"""Checks of config values: the (predicate, what is allowed) pairs of the
schema's rule tables (mae_jax.schema) and the check of the image fields
(data.image_size, data.channels, data.mean, data.std) that the schema and
the input pipeline share. Each error is one line naming the field, the bad
value and what is allowed.
"""
import math
import numbers

from mae_jax.errors import ConfigError
from mae_jax.models.geometry import image_hw

CHANNELS = (1, 3)  # image files decode to grayscale or RGB


def check_image_fields(image_size, channels, mean, std):
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


def is_bool(v):
  """True or False, not 0 or 1."""
  return isinstance(v, bool)


def number(test, text, none=False):
  """(predicate, what is allowed) of a real number field (None allowed with
  `none`)."""
  def ok(v):
    if v is None:
      return none
    return (isinstance(v, numbers.Real) and not isinstance(v, bool)
            and math.isfinite(v) and test(v))
  return ok, text + (' or None' if none else '')


def at_least(low):
  """(predicate, what is allowed) of an int field >= low."""
  return (lambda v: isinstance(v, numbers.Integral)
          and not isinstance(v, bool) and v >= low), f'must be >= {low}'


def is_name(v):
  """A non-empty string."""
  return isinstance(v, str) and bool(v)


BOOL = (is_bool, 'must be True or False')
NAME = (is_name, 'must be a non-empty string')
POSITIVE = number(lambda v: v > 0, 'must be > 0')
NON_NEGATIVE = number(lambda v: v >= 0, 'must be >= 0')
PROBABILITY = number(lambda v: 0 <= v <= 1, 'must lie in [0, 1]')
