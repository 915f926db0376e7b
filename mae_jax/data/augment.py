"""Per-example transforms in TensorFlow: decode, RandomResizedCrop, flip,
normalise (MAE_SPEC section 6), and the eval resize + center crop.

Every random draw is a stateless op keyed by `example_key(seed, epoch, index)`,
so an example's augmentation does not depend on parallelism or on resuming.
Images are uint8 (H, W, 3) in; float32 (size, size, 3) normalised out.
"""
import math

import tensorflow as tf

MEAN_RGB = (0.485, 0.456, 0.406)  # ImageNet statistics of [0, 1] pixels
STD_RGB = (0.229, 0.224, 0.225)
CROP_PCT = 0.875  # eval: resize shorter side to int(size / CROP_PCT)
SCALE = (0.2, 1.0)  # RandomResizedCrop area fraction (MAE pretraining)
RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop aspect ratio w / h
_TRIES = 10  # torchvision's number of area/ratio draws before the fallback


def example_key(seed, epoch, index):
  """Stateless RNG key (int32 (2,)) for one example in one epoch."""
  key = tf.stack([tf.cast(seed, tf.int64), tf.cast(epoch, tf.int64)])
  return tf.random.experimental.stateless_fold_in(key, tf.cast(index, tf.int64))


def decode_image(data):
  """Encoded JPEG/PNG/GIF/BMP bytes -> uint8 (H, W, 3).

  Grayscale is replicated to RGB; an alpha channel is dropped.
  """
  image = tf.io.decode_image(data, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def sample_crop_box(key, height, width, scale=SCALE, ratio=RATIO):
  """torchvision RandomResizedCrop.get_params, vectorised and stateless.

  Draws 10 (area fraction, log aspect) pairs and keeps the first box that
  fits; if none fits, takes the largest center box with aspect clamped to
  `ratio`. Returns int32 scalars (top, left, crop_height, crop_width).
  """
  h_img = tf.cast(height, tf.float32)
  w_img = tf.cast(width, tf.float32)
  k_area, k_ratio, k_offset = tf.unstack(
      tf.random.experimental.stateless_split(key, 3))
  area = h_img * w_img * tf.random.stateless_uniform(
      [_TRIES], k_area, minval=scale[0], maxval=scale[1])
  aspect = tf.exp(tf.random.stateless_uniform(
      [_TRIES], k_ratio, minval=math.log(ratio[0]), maxval=math.log(ratio[1])))
  w = tf.round(tf.sqrt(area * aspect))  # round half to even, as Python's round
  h = tf.round(tf.sqrt(area / aspect))
  fits = (w > 0) & (w <= w_img) & (h > 0) & (h <= h_img)
  first = tf.argmax(tf.cast(fits, tf.int32))
  u_top, u_left = tf.unstack(tf.random.stateless_uniform([2], k_offset))

  in_ratio = w_img / h_img
  fallback_w = tf.where(in_ratio > ratio[1], tf.round(h_img * ratio[1]), w_img)
  fallback_h = tf.where(in_ratio < ratio[0], tf.round(w_img / ratio[0]), h_img)
  found = tf.reduce_any(fits)
  crop_h = tf.cast(tf.where(found, h[first], fallback_h), tf.int32)
  crop_w = tf.cast(tf.where(found, w[first], fallback_w), tf.int32)
  free_h, free_w = height - crop_h, width - crop_w
  rand_top = tf.cast(u_top * tf.cast(free_h + 1, tf.float32), tf.int32)
  rand_left = tf.cast(u_left * tf.cast(free_w + 1, tf.float32), tf.int32)
  top = tf.where(found, tf.minimum(rand_top, free_h), free_h // 2)
  left = tf.where(found, tf.minimum(rand_left, free_w), free_w // 2)
  return top, left, crop_h, crop_w


def normalize(image):
  """float (..., 3) pixels in [0, 255] -> ImageNet-normalised float32."""
  image = tf.cast(image, tf.float32) / 255.0
  return (image - tf.constant(MEAN_RGB)) / tf.constant(STD_RGB)


def _resize_bicubic(image, height, width):
  """Antialiased bicubic resize (PIL-like), clipped to [0, 255] like uint8."""
  image = tf.image.resize(tf.cast(image, tf.float32), tf.stack([height, width]),
                          method='bicubic', antialias=True)  # f32 in: faster
  return tf.clip_by_value(image, 0.0, 255.0)


def train_transform(image, key, size, scale=SCALE, ratio=RATIO):
  """RandomResizedCrop(size, bicubic) + horizontal flip (p=0.5) + normalise.

  uint8 (H, W, 3) -> float32 (size, size, 3).
  """
  image = tf.convert_to_tensor(image)
  k_box, k_flip = tf.unstack(tf.random.experimental.stateless_split(key, 2))
  shape = tf.shape(image)
  top, left, crop_h, crop_w = sample_crop_box(k_box, shape[0], shape[1],
                                              scale, ratio)
  crop = image[top:top + crop_h, left:left + crop_w]
  crop = _resize_bicubic(crop, size, size)
  flip = tf.random.stateless_uniform([], k_flip) < 0.5
  crop = tf.cond(flip, lambda: tf.reverse(crop, axis=[1]), lambda: crop)
  return normalize(crop)


def eval_transform(image, size, crop_pct=CROP_PCT):
  """Resize shorter side to int(size / crop_pct) (bicubic), center crop
  size x size, normalise. uint8 (H, W, 3) -> float32 (size, size, 3)."""
  image = tf.convert_to_tensor(image)
  resize = int(size / crop_pct)
  shape = tf.shape(image)
  h, w = shape[0], shape[1]
  short = tf.minimum(h, w)
  new_h = tf.where(h <= w, resize, resize * h // short)  # as torchvision
  new_w = tf.where(h <= w, resize * w // short, resize)
  image = _resize_bicubic(image, new_h, new_w)
  top = tf.cast(tf.round(tf.cast(new_h - size, tf.float32) / 2), tf.int32)
  left = tf.cast(tf.round(tf.cast(new_w - size, tf.float32) / 2), tf.int32)
  image = image[top:top + size, left:left + size]
  image.set_shape([size, size, 3])
  return normalize(image)
