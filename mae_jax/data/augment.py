"""Per-example transforms in TensorFlow: decode, the three training recipes
(He et al. 2021, appendix A.1, Tables 8-10) and the eval resize + center crop.

  'pretrain': RandomResizedCrop(scale 0.2-1) + flip + normalise.
  'finetune': RandomResizedCrop(scale 0.08-1) + flip + RandAugment
      rand-m9-mstd0.5-inc1 + normalise + random erasing (p=0.25, pixel mode).
  'linprobe': single-draw RandomResizedCrop (scale 0.08-1) + flip + normalise.
  'none': the eval transform, no random draw: for images whose label a crop
      or a mirror image changes (the digits: a mirrored 2 is no digit).

Every random draw is a stateless op keyed by `example_key(seed, epoch, index)`,
so an example's augmentation does not depend on parallelism or on resuming.
Images are uint8 (H, W, 3) RGB in; float32 (height, width, C) out, each
channel normalised with its `mean` / `std` (statistics of [0, 1] pixels;
default ImageNet RGB). `size` is an int (square) or an (height, width) pair.
C = len(mean): 3 keeps RGB; 1 converts to grayscale with PIL's 'L' formula
(ITU-R 601-2 luma, `to_channels`) on the uint8 crop before it is resized
('finetune': after RandAugment, whose colour ops need RGB).
'finetune', 'linprobe' and eval resize with `resize_bicubic_pil`, which
reproduces PIL's uint8 bicubic resize (as the PyTorch reference does).
A non-square size crops as torchvision's RandomResizedCrop((H, W)) does:
the box is drawn with the same area and aspect-ratio ranges (the ratio of
the box, not of the output) and resized to (H, W).
"""
import math

import tensorflow as tf

from mae_jax.data import randaugment
from mae_jax.errors import ConfigError
from mae_jax.images import IMAGENET_MEAN, IMAGENET_STD
from mae_jax.models.geometry import image_hw

CROP_PCT = 0.875  # eval: resize so that int(side / CROP_PCT) fits
SCALE = (0.2, 1.0)  # RandomResizedCrop area fraction (MAE pretraining)
RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop aspect ratio w / h
FINETUNE_SCALE = (0.08, 1.0)  # RandomResizedCrop area fraction (fine-tune,
                              # linear probe)
ERASE_PROB = 0.25  # random erasing probability (fine-tune)
ERASE_AREA = (0.02, 1 / 3)  # erased area fraction
ERASE_RATIO = (0.3, 1 / 0.3)  # erased aspect ratio h / w (log-uniform)
TRAIN_AUGMENTS = ('pretrain', 'finetune', 'linprobe', 'none')
_TRIES = 10  # torchvision's number of area/ratio draws before the fallback
_PIL_BITS = 22  # PIL's fixed-point precision of 8-bit resampling weights


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


def _box_sides(k_area, k_ratio, h_img, w_img, scale, ratio, shape):
  """Box sides of `shape` drawn as torchvision's crops and erasing draw
  them: area h_img * w_img * U(scale), aspect r log-uniform in `ratio`.
  Returns float32 (round(sqrt(area * r)), round(sqrt(area / r))), rounding
  half to even as Python's round."""
  area = h_img * w_img * tf.random.stateless_uniform(
      shape, k_area, minval=scale[0], maxval=scale[1])
  aspect = tf.exp(tf.random.stateless_uniform(
      shape, k_ratio, minval=math.log(ratio[0]), maxval=math.log(ratio[1])))
  return tf.round(tf.sqrt(area * aspect)), tf.round(tf.sqrt(area / aspect))


def _box_offsets(key, h_img, w_img, h, w):
  """float32 (top, left), uniform over the floor(...) positions of an
  h x w box in an h_img x w_img image."""
  u_top, u_left = tf.unstack(tf.random.stateless_uniform([2], key))
  return tf.floor(u_top * (h_img - h + 1)), tf.floor(u_left * (w_img - w + 1))


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
  w, h = _box_sides(k_area, k_ratio, h_img, w_img, scale, ratio, [_TRIES])
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


def to_channels(image, channels):
  """uint8 (H, W, 3) RGB -> (H, W, channels): 3 as is; 1 by PIL's 'L'
  conversion, (19595 R + 38470 G + 7471 B + 2**15) >> 16 (a 1-channel
  image is kept)."""
  if channels == 3 or (channels == 1 and image.shape[-1] == 1):
    return image
  if channels != 1:
    raise ConfigError(f'images decode to 1 (grayscale) or 3 (RGB) channels, '
                      f'not {channels}')
  return tf.cast(randaugment.grayscale(image), tf.uint8)


def normalize(image, mean=IMAGENET_MEAN, std=IMAGENET_STD):
  """float (..., C) pixels in [0, 255] -> float32 normalised per channel
  with mean / std (C values each, statistics of [0, 1] pixels)."""
  image = tf.cast(image, tf.float32) / 255.0
  return ((image - tf.constant(mean, tf.float32))
          / tf.constant(std, tf.float32))


def _resize_bicubic(image, height, width):
  """Antialiased bicubic resize (PIL-like), clipped to [0, 255] like uint8."""
  image = tf.image.resize(tf.cast(image, tf.float32), tf.stack([height, width]),
                          method='bicubic', antialias=True)  # f32 in: faster
  return tf.clip_by_value(image, 0.0, 255.0)


def _pil_bicubic_taps(in_size, out_size, start, count):
  """PIL's 8-bit bicubic (a = -0.5) taps for outputs [start, start + count)
  of an in_size -> out_size resize; the kernel is widened by in/out when
  downsampling. Returns int32 (count, K) input indices and int32 (count, K)
  weights in units of 2**-22 (taps past the edge weigh 0)."""
  in_f = tf.cast(in_size, tf.float64)
  scale = in_f / tf.cast(out_size, tf.float64)
  filter_scale = tf.maximum(scale, 1.0)
  support = 2.0 * filter_scale
  taps = 2 * tf.cast(tf.math.ceil(support), tf.int32) + 1
  center = (tf.cast(tf.range(start, start + count), tf.float64) + 0.5) * scale
  lo = tf.maximum(tf.floor(center - support + 0.5), 0.0)
  hi = tf.minimum(tf.floor(center + support + 0.5), in_f)
  pos = lo[:, None] + tf.cast(tf.range(taps), tf.float64)[None]
  x = tf.abs((pos - center[:, None] + 0.5) * (1.0 / filter_scale))
  w = tf.where(x < 1.0, (1.5 * x - 2.5) * x * x + 1.0,
               tf.where(x < 2.0, (((x - 5.0) * x + 8.0) * x - 4.0) * -0.5, 0.0))
  w = tf.where(pos < hi[:, None], w, 0.0)
  w = w / tf.reduce_sum(w, axis=1, keepdims=True) * 2.0**_PIL_BITS
  w = tf.where(w < 0, tf.math.ceil(w - 0.5), tf.floor(w + 0.5))  # as C (int)
  index = tf.cast(tf.minimum(pos, in_f - 1.0), tf.int32)
  return index, tf.cast(w, tf.int32)


def _pil_pass(x, index, weight):
  """One uint8 resampling pass in PIL's fixed point along the rows of int32
  x (N, M), taps from _pil_bicubic_taps -> int32 (n, M) in [0, 255]."""
  total = tf.reduce_sum(tf.gather(x, index) * weight[:, :, None], axis=1)
  return tf.clip_by_value((total + 2**(_PIL_BITS - 1)) // 2**_PIL_BITS, 0, 255)


def resize_bicubic_pil(image, height, width, window=None):
  """PIL `Image.resize((width, height), BICUBIC)` of a uint8 image, exactly:
  horizontal then vertical pass with 22-bit fixed-point weights and uint8
  rounding in between. `window` (top, left, h, w) returns only that part of
  the resized image (computed alone). (H, W, C) -> float32 (h, w, C) whole
  numbers in [0, 255]."""
  image = tf.cast(image, tf.int32)
  shape = tf.shape(image)
  top, left, out_h, out_w = window if window is not None else (
      0, 0, height, width)
  row_index, row_weight = _pil_bicubic_taps(shape[0], height, top, out_h)
  col_index, col_weight = _pil_bicubic_taps(shape[1], width, left, out_w)
  first, last = tf.reduce_min(row_index), tf.reduce_max(row_index)
  image = image[first:last + 1]
  rows = last + 1 - first
  # Passes gather whole rows: columns first as (W, rows * C), then rows.
  x = tf.reshape(tf.transpose(image, [1, 0, 2]), [shape[1], -1])
  x = _pil_pass(x, col_index, col_weight)
  x = tf.reshape(tf.transpose(tf.reshape(x, [out_w, rows, shape[2]]),
                              [1, 0, 2]), [rows, -1])
  x = _pil_pass(x, row_index - first, row_weight)
  return tf.cast(tf.reshape(x, [out_h, out_w, shape[2]]), tf.float32)


def _random_flip(image, key):
  """Horizontal flip of (H, W, C) with probability 0.5."""
  flip = tf.random.stateless_uniform([], key) < 0.5
  return tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)


def _crop(image, box):
  top, left, crop_h, crop_w = box
  return image[top:top + crop_h, left:left + crop_w]


def train_transform(image, key, size, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                    scale=SCALE, ratio=RATIO):
  """'pretrain': RandomResizedCrop(size, bicubic) + horizontal flip (p=0.5) +
  normalise. uint8 (H, W, 3) -> float32 (height, width, len(mean))."""
  image = tf.convert_to_tensor(image)
  k_box, k_flip = tf.unstack(tf.random.experimental.stateless_split(key, 2))
  shape = tf.shape(image)
  crop = _crop(image, sample_crop_box(k_box, shape[0], shape[1], scale, ratio))
  crop = _resize_bicubic(to_channels(crop, len(mean)), *image_hw(size))
  return normalize(_random_flip(crop, k_flip), mean, std)


def train_transform_jpeg(data, key, size, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                         scale=SCALE, ratio=RATIO):
  """train_transform of encoded image bytes (string scalar), with the same
  random draws; a JPEG decodes only the crop window, sampled from its header
  shape. Pixels equal a full decode's except on the window's last column,
  where libjpeg's chroma upsampling lacks the outer neighbour."""
  k_box, k_flip = tf.unstack(tf.random.experimental.stateless_split(key, 2))

  def jpeg():
    shape = tf.io.extract_jpeg_shape(data)
    box = sample_crop_box(k_box, shape[0], shape[1], scale, ratio)
    return tf.io.decode_and_crop_jpeg(data, tf.stack(box), channels=3)

  def other():
    image = decode_image(data)
    shape = tf.shape(image)
    return _crop(image, sample_crop_box(k_box, shape[0], shape[1], scale,
                                        ratio))

  crop = tf.cond(tf.io.is_jpeg(data), jpeg, other)
  crop = _resize_bicubic(to_channels(crop, len(mean)), *image_hw(size))
  return normalize(_random_flip(crop, k_flip), mean, std)


def random_erase(image, key, prob=ERASE_PROB, area=ERASE_AREA,
                 ratio=ERASE_RATIO):
  """Random erasing, 'pixel' mode, one rectangle: with probability `prob`,
  fills a box with per-pixel standard-normal noise. Box: area fraction
  ~ U(area), aspect h / w log-uniform in `ratio`, h and w rounded; the first
  of 10 draws with h < H and w < W is kept (none: no erasing); offsets
  uniform. float32 (H, W, C) normalised -> same."""
  k_apply, k_area, k_ratio, k_offset, k_noise = tf.unstack(
      tf.random.experimental.stateless_split(key, 5))
  shape = tf.shape(image)
  h_img = tf.cast(shape[0], tf.float32)
  w_img = tf.cast(shape[1], tf.float32)
  h, w = _box_sides(k_area, k_ratio, h_img, w_img, area, ratio, [_TRIES])
  fits = (h >= 1) & (h < h_img) & (w >= 1) & (w < w_img)
  first = tf.argmax(tf.cast(fits, tf.int32))
  h, w = h[first], w[first]
  top, left = _box_offsets(k_offset, h_img, w_img, h, w)
  rows = tf.cast(tf.range(shape[0]), tf.float32)[:, None, None]
  cols = tf.cast(tf.range(shape[1]), tf.float32)[None, :, None]
  inside = ((rows >= top) & (rows < top + h) & (cols >= left)
            & (cols < left + w))
  erase = tf.reduce_any(fits) & (
      tf.random.stateless_uniform([], k_apply) < prob)
  noise = tf.random.stateless_normal(shape, k_noise, dtype=image.dtype)
  return tf.where(inside & erase, noise, image)


def finetune_transform(image, key, size, mean=IMAGENET_MEAN, std=IMAGENET_STD):
  """'finetune': RandomResizedCrop(size, scale (0.08, 1), bicubic as PIL) +
  flip + RandAugment rand-m9-mstd0.5-inc1 + normalise + random erasing
  (p=0.25, pixel mode). uint8 (H, W, 3) -> float32 (height, width,
  len(mean))."""
  image = tf.convert_to_tensor(image)
  k_box, k_flip, k_aug, k_erase = tf.unstack(
      tf.random.experimental.stateless_split(key, 4))
  shape = tf.shape(image)
  box = sample_crop_box(k_box, shape[0], shape[1], FINETUNE_SCALE, RATIO)
  crop = resize_bicubic_pil(_crop(image, box), *image_hw(size))
  crop = _random_flip(tf.cast(crop, tf.uint8), k_flip)
  crop = to_channels(randaugment.rand_augment(crop, k_aug), len(mean))
  return random_erase(normalize(crop, mean, std), k_erase)


def sample_crop_box_single(key, height, width, scale=FINETUNE_SCALE,
                           ratio=RATIO):
  """TF-style RandomResizedCrop box from ONE draw (no retries, no fallback).

  Area fraction a ~ U(scale), aspect r log-uniform in `ratio`;
  w = round(sqrt(a H W r)), h = round(sqrt(a H W / r)), each then clipped to
  [1, image side] (so a box that does not fit keeps the full side and loses
  its aspect); top ~ U{0..H-h}, left ~ U{0..W-w}. Returns int32 scalars
  (top, left, crop_height, crop_width).
  """
  h_img = tf.cast(height, tf.float32)
  w_img = tf.cast(width, tf.float32)
  k_area, k_ratio, k_offset = tf.unstack(
      tf.random.experimental.stateless_split(key, 3))
  w, h = _box_sides(k_area, k_ratio, h_img, w_img, scale, ratio, [])
  w = tf.clip_by_value(w, 1.0, w_img)
  h = tf.clip_by_value(h, 1.0, h_img)
  top, left = _box_offsets(k_offset, h_img, w_img, h, w)
  return tuple(tf.cast(v, tf.int32) for v in (top, left, h, w))


def linprobe_transform(image, key, size, mean=IMAGENET_MEAN, std=IMAGENET_STD):
  """'linprobe': single-draw RandomResizedCrop(size, scale (0.08, 1), bicubic
  as PIL) + flip + normalise. uint8 (H, W, 3) -> float32 (height, width,
  len(mean))."""
  image = tf.convert_to_tensor(image)
  k_box, k_flip = tf.unstack(tf.random.experimental.stateless_split(key, 2))
  shape = tf.shape(image)
  box = sample_crop_box_single(k_box, shape[0], shape[1])
  crop = to_channels(_crop(image, box), len(mean))
  crop = resize_bicubic_pil(crop, *image_hw(size))
  return normalize(_random_flip(crop, k_flip), mean, std)


def get_train_transform(name):
  """The training transform fn(uint8 image, key, size, mean, std) named by
  data.augment: one of TRAIN_AUGMENTS."""
  def none(image, key, size, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    del key  # no random draw
    return eval_transform(image, size, mean=mean, std=std)
  transforms = dict(pretrain=train_transform, finetune=finetune_transform,
                    linprobe=linprobe_transform, none=none)
  if name not in transforms:
    raise ConfigError(f'unknown data.augment={name!r}; allowed: '
                      f'{", ".join(map(repr, TRAIN_AUGMENTS))}')
  return transforms[name]


def get_train_bytes_transform(name):
  """The training transform of encoded bytes fn(bytes, key, size, mean, std)
  that decodes only a JPEG's crop window, for the data.augment that has one
  ('pretrain': train_transform_jpeg), else None."""
  get_train_transform(name)  # checks the name
  return {'pretrain': train_transform_jpeg}.get(name)


def eval_transform(image, size, crop_pct=CROP_PCT, mean=IMAGENET_MEAN,
                   std=IMAGENET_STD):
  """Resize (PIL bicubic, aspect kept) so that an int(H / crop_pct) x
  int(W / crop_pct) box fits, center crop (H, W) (top = round((h - H) / 2),
  half to even, as torchvision), normalise. For a square size S this is
  torchvision's Resize(int(S / crop_pct)) of the shorter side, the longer
  side floored as torchvision does. uint8 (h, w, 3) -> float32 (H, W,
  len(mean))."""
  image = to_channels(tf.convert_to_tensor(image), len(mean))
  height, width = image_hw(size)
  fit_h, fit_w = int(height / crop_pct), int(width / crop_pct)
  shape = tf.shape(image)
  h, w = shape[0], shape[1]
  by_height = fit_h * w >= fit_w * h  # the height binds: it gets fit_h
  new_h = tf.where(by_height, fit_h, fit_w * h // w)
  new_w = tf.where(by_height, fit_h * w // h, fit_w)
  top = tf.cast(tf.round(tf.cast(new_h - height, tf.float32) / 2), tf.int32)
  left = tf.cast(tf.round(tf.cast(new_w - width, tf.float32) / 2), tf.int32)
  image = resize_bicubic_pil(image, new_h, new_w, (top, left, height, width))
  image.set_shape([height, width, len(mean)])
  return normalize(image, mean, std)
