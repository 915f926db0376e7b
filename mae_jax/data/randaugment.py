"""RandAugment `rand-m9-mstd0.5-inc1` in TensorFlow, stateless.

Two layers; each picks one of OPS uniformly (with replacement) and applies it
with probability 0.5 at magnitude m ~ N(9, 0.5) clipped to [0, 10]; the op
sees level = m / 10 in [0, 1] and a random sign. Ops take and return uint8
(H, W, 3) images (pixel values 0..255), mirroring PIL's ImageOps and
ImageEnhance; geometric ops sample bilinearly (PIL's bicubic is not offered
by ImageProjectiveTransformV3) and fill with FILL.
"""
import functools
import math

import tensorflow as tf

FILL = (124, 116, 104)  # ImageNet mean in uint8: fill of geometric ops
NUM_LAYERS = 2
MAGNITUDE = 9.0
MAGNITUDE_STD = 0.5
MAX_MAGNITUDE = 10.0
PROB = 0.5


def _split(key, n):
  return tf.unstack(tf.random.experimental.stateless_split(key, n))


def _to_uint8(image):
  """float pixels -> uint8, clipped, truncated toward zero as PIL does."""
  return tf.cast(tf.clip_by_value(image, 0.0, 255.0), tf.uint8)


def grayscale(image):
  """PIL 'L' conversion (ITU-R 601-2 luma, fixed point): int32 (H, W, 1)."""
  rgb = tf.cast(image, tf.int32)
  luma = rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471
  return ((luma + 0x8000) // 2**16)[..., None]


def _blend(degenerate, image, factor):
  """PIL ImageEnhance: degenerate + factor * (image - degenerate)."""
  degenerate = tf.cast(degenerate, tf.float32)
  image = tf.cast(image, tf.float32)
  return _to_uint8(degenerate + factor * (image - degenerate))


def autocontrast(image):
  """Per channel, stretches [min, max] linearly to [0, 255] (flat: as is)."""
  x = tf.cast(image, tf.float32)
  lo = tf.reduce_min(x, axis=[0, 1])
  hi = tf.reduce_max(x, axis=[0, 1])
  scale = 255.0 / tf.maximum(hi - lo, 1.0)
  return tf.where(hi > lo, _to_uint8((x - lo) * scale), image)


def equalize(image):
  """PIL ImageOps.equalize per channel: LUT from the cumulative histogram,
  step = (pixels - count of the top occupied level) // 255."""
  x = tf.cast(image, tf.int32)
  offsets = tf.range(3) * 256
  hist = tf.reshape(tf.math.bincount(tf.reshape(x + offsets, [-1]),
                                     minlength=768, maxlength=768), [3, 256])
  levels = tf.range(256)[None]
  top = tf.reduce_max(tf.where(hist > 0, levels, -1), axis=1, keepdims=True)
  top_count = tf.reduce_sum(tf.where(levels == top, hist, 0), axis=1,
                            keepdims=True)
  step = (tf.reduce_sum(hist, axis=1, keepdims=True) - top_count) // 255
  lut = (step // 2 + tf.cumsum(hist, axis=1, exclusive=True)) // tf.maximum(
      step, 1)
  lut = tf.where(step > 0, tf.minimum(lut, 255), levels)  # step 0: identity
  out = tf.gather(tf.reshape(lut, [-1]), x + offsets)
  return tf.cast(out, tf.uint8)


def invert(image):
  return 255 - image


def posterize(image, bits):
  """Keeps the top `bits` (int, 0..8) bits of each pixel."""
  mask = 256 - 2**(8 - tf.cast(bits, tf.int32))
  return tf.cast(tf.bitwise.bitwise_and(tf.cast(image, tf.int32), mask),
                 tf.uint8)


def solarize(image, threshold):
  """Inverts pixels >= threshold (uint8 units)."""
  x = tf.cast(image, tf.float32)
  return tf.where(x >= tf.cast(threshold, tf.float32), 255 - image, image)


def solarize_add(image, add, threshold=128):
  """Adds `add` (clipped at 255) to pixels below threshold."""
  x = tf.cast(image, tf.int32)
  added = tf.cast(tf.minimum(x + tf.cast(add, tf.int32), 255), tf.uint8)
  return tf.where(x < threshold, added, image)


def color(image, factor):
  return _blend(tf.tile(grayscale(image), [1, 1, 3]), image, factor)


def contrast(image, factor):
  """Blend with the grey level of the rounded mean luma."""
  mean = tf.floor(
      tf.reduce_mean(tf.cast(grayscale(image), tf.float32)) + 0.5)
  return _blend(tf.fill(tf.shape(image), mean), image, factor)


def brightness(image, factor):
  return _blend(tf.zeros_like(image), image, factor)


def sharpness(image, factor):
  """Blend with PIL's SMOOTH filter (3x3, centre 5, others 1, / 13; the
  1-pixel border is left unfiltered)."""
  x = tf.cast(image, tf.float32)
  kernel = tf.constant([[1., 1., 1.], [1., 5., 1.], [1., 1., 1.]]) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(x[None], kernel, [1, 1, 1, 1], 'VALID')[0]
  smooth = tf.pad(tf.floor(smooth + 0.5), [[1, 1], [1, 1], [0, 0]])
  shape = tf.shape(image)
  rows = tf.range(shape[0])[:, None, None]
  cols = tf.range(shape[1])[None, :, None]
  inner = ((rows > 0) & (rows < shape[0] - 1) & (cols > 0)
           & (cols < shape[1] - 1))
  return _blend(tf.where(inner, smooth, x), image, factor)


def affine(image, matrix):
  """PIL Image.transform(AFFINE, matrix): output pixel centre (x, y) (pixel
  units, centres at +0.5) samples input (a x + b y + c, d x + e y + f);
  bilinear, FILL outside. matrix: 6 floats (a, b, c, d, e, f)."""
  a, b, c, d, e, f = tf.unstack(tf.cast(tf.stack(matrix), tf.float32))
  # TF samples at pixel indices: shift both sides by the 0.5 centre offset.
  c = c + 0.5 * (a + b - 1.0)
  f = f + 0.5 * (d + e - 1.0)
  transform = tf.stack([a, b, c, d, e, f, 0.0, 0.0])[None]
  fill = tf.constant(FILL, tf.float32)
  x = tf.cast(image, tf.float32)[None] - fill
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=x, transforms=transform, output_shape=tf.shape(image)[:2],
      fill_value=0.0, interpolation='BILINEAR', fill_mode='CONSTANT')[0]
  return _to_uint8(tf.round(out + fill))


def rotate(image, degrees):
  """Counter-clockwise rotation by `degrees` about the image centre."""
  theta = tf.cast(degrees, tf.float32) * (math.pi / 180.0)
  cos, sin = tf.cos(theta), tf.sin(theta)
  shape = tf.cast(tf.shape(image), tf.float32)
  cx, cy = shape[1] / 2, shape[0] / 2
  return affine(image, [cos, -sin, cx - cos * cx + sin * cy,
                        sin, cos, cy - sin * cx - cos * cy])


def shear_x(image, factor):
  return affine(image, [1.0, factor, 0.0, 0.0, 1.0, 0.0])


def shear_y(image, factor):
  return affine(image, [1.0, 0.0, 0.0, factor, 1.0, 0.0])


def translate_x(image, pixels):
  return affine(image, [1.0, 0.0, pixels, 0.0, 1.0, 0.0])


def translate_y(image, pixels):
  return affine(image, [1.0, 0.0, 0.0, 0.0, 1.0, pixels])


def _width(image):
  return tf.cast(tf.shape(image)[1], tf.float32)


def _height(image):
  return tf.cast(tf.shape(image)[0], tf.float32)


# name -> fn(image, level in [0, 1], sign +-1.0) for the 'increasing' op set.
OPS = {
    'AutoContrast': lambda im, level, sign: autocontrast(im),
    'Equalize': lambda im, level, sign: equalize(im),
    'Invert': lambda im, level, sign: invert(im),
    'Rotate': lambda im, level, sign: rotate(im, 30.0 * level * sign),
    'PosterizeIncreasing': lambda im, level, sign: posterize(
        im, 4 - tf.cast(4.0 * level, tf.int32)),
    'SolarizeIncreasing': lambda im, level, sign: solarize(
        im, 256.0 - 256.0 * level),
    'SolarizeAdd': lambda im, level, sign: solarize_add(
        im, tf.cast(110.0 * level, tf.int32)),
    'ColorIncreasing': lambda im, level, sign: color(im, 1 + 0.9 * level * sign),
    'ContrastIncreasing': lambda im, level, sign: contrast(
        im, 1 + 0.9 * level * sign),
    'BrightnessIncreasing': lambda im, level, sign: brightness(
        im, 1 + 0.9 * level * sign),
    'SharpnessIncreasing': lambda im, level, sign: sharpness(
        im, 1 + 0.9 * level * sign),
    'ShearX': lambda im, level, sign: shear_x(im, 0.3 * level * sign),
    'ShearY': lambda im, level, sign: shear_y(im, 0.3 * level * sign),
    'TranslateXRel': lambda im, level, sign: translate_x(
        im, 0.45 * level * sign * _width(im)),
    'TranslateYRel': lambda im, level, sign: translate_y(
        im, 0.45 * level * sign * _height(im)),
}
OP_NAMES = tuple(OPS)


def apply_op(image, name, magnitude, key):
  """OPS[name] at `magnitude` (0..MAX_MAGNITUDE) with a random sign from
  `key`. uint8 (H, W, 3) -> uint8 (H, W, 3)."""
  if name not in OPS:
    raise ValueError(f'unknown RandAugment op {name!r}; allowed: '
                     f'{", ".join(OP_NAMES)}')
  sign = tf.where(tf.random.stateless_uniform([], key) < 0.5, -1.0, 1.0)
  level = tf.cast(magnitude, tf.float32) / MAX_MAGNITUDE
  out = OPS[name](tf.convert_to_tensor(image), level, sign)
  out.set_shape(image.shape)
  return out


def rand_augment(image, key, num_layers=NUM_LAYERS, magnitude=MAGNITUDE,
                 magnitude_std=MAGNITUDE_STD, prob=PROB):
  """RandAugment: `num_layers` ops drawn uniformly from OPS, each applied
  with probability `prob` at magnitude N(magnitude, magnitude_std) clipped
  to [0, MAX_MAGNITUDE]. uint8 (H, W, 3) -> uint8 (H, W, 3)."""
  image = tf.convert_to_tensor(image)
  for layer_key in _split(key, num_layers):
    k_op, k_apply, k_mag, k_sign = _split(layer_key, 4)
    op = tf.random.stateless_uniform([], k_op, 0, len(OP_NAMES), tf.int32)
    mag = tf.clip_by_value(
        magnitude + magnitude_std * tf.random.stateless_normal([], k_mag),
        0.0, MAX_MAGNITUDE)
    branches = [functools.partial(apply_op, image, name, mag, k_sign)
                for name in OP_NAMES]
    apply = tf.random.stateless_uniform([], k_apply) < prob
    image = tf.cond(apply, lambda b=branches: tf.switch_case(op, b),
                    lambda im=image: im)
  return image
