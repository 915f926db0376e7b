"""tf.data input pipeline: per-process shards of deterministic global batches.

Training order: epoch e visits a permutation of the examples drawn from
(seed, e); global batch b of the epoch holds permutation entries
[b*G, (b+1)*G) and process p gets the slice [b*G + p*L, b*G + (p+1)*L)
(G global, L = G / process_count local batch). The global batch therefore
does not depend on the number of processes, and the augmentation of an
example is keyed by (seed, e, example index). Each epoch drops the last
n % G examples. TFDS splits are read sequentially: each process streams its
own tfds.even_splits share through a shuffle buffer seeded from (seed, e).

Unusable TFDS records are handled per batch, without changing the batches
of a resumed iterator or the epoch length: see mae_jax.data.records.

`data_cfg` is a data config (`config.data`, a ConfigDict, or a dict of it:
mae_jax.schema.config(task).data holds every field, documented there):
  name: 'embedded' | 'digits' | 'folder' | a TFDS dataset name (e.g.
    'imagenet2012').
  image_size: output size in pixels, an int (square) or an (H, W) pair.
  channels: 3 (RGB) or 1 (grayscale: PIL's 'L' conversion of the RGB decode,
    see augment.to_channels).
  mean, std: per-channel statistics of [0, 1] pixels, `channels` values
    each; the batches are (pixels / 255 - mean) / std.
  data_dir: image folder root ('folder') or TFDS data_dir.
  split: folder sub-directory, TFDS split, or embedded or digits split
    ('all', 'train', 'validation': see sources.embedded, sources.digits).
  repeats: copies of each embedded photo per epoch; None gives an epoch of
    at least 256 examples.
  shuffle_buffer: TFDS examples held in the shuffle buffer.
  image_key, label_key: TFDS feature names.
  augment: training transform, one of augment.TRAIN_AUGMENTS: 'pretrain',
    'finetune', 'linprobe' or 'none' (see mae_jax.data.augment). With
    'pretrain', folder files and TFDS records go through augment.train_transform_jpeg: a
    JPEG decodes only its crop window.
  on_error: an unusable folder image or TFDS record is skipped (and named in
    the log) or, with 'fail', stops the run (see sources.folder and above).
  max_pixels: images with more pixels are unusable (TFDS: read from the
    JPEG/PNG/GIF/BMP header before decoding; WebP and JPEG XL are checked
    after decoding).
"""
import math

import tensorflow as tf

from mae_jax.data import augment, records, sources
from mae_jax.errors import ConfigError
from mae_jax.config_values import check_image_fields
_SHUFFLE_INDEX = -1  # example_key index reserved for the epoch's shuffle
_AUTOTUNE = tf.data.AUTOTUNE
# Dataset functions here are plain TF ops: traced without autograph's source
# conversion (which takes a noticeable part of start-up).
_plain = tf.autograph.experimental.do_not_convert


def _field(data_cfg, name):
  """One field of the data config; a missing one is a ConfigError."""
  try:
    return data_cfg[name]
  except KeyError:
    raise ConfigError(f'the data config lacks the field {name!r}; build it '
                      'with mae_jax.schema.config(task).data') from None


def _local_batch(global_batch_size, process_count):
  if global_batch_size % process_count:
    raise ConfigError(f'global batch size {global_batch_size} is not divisible '
                      f'by the process count {process_count}')
  return global_batch_size // process_count


def _source(data_cfg, process_index, process_count, drop_remainder):
  """IndexedSource, or (dataset, share size) of this process's TFDS share."""
  name = _field(data_cfg, 'name')
  if name == 'embedded':
    return sources.embedded(_field(data_cfg, 'repeats'),
                            _field(data_cfg, 'split'))
  if name == 'digits':
    return sources.digits(_field(data_cfg, 'split'))
  if name == 'folder':
    return sources.folder(_field(data_cfg, 'data_dir'),
                          _field(data_cfg, 'split'),
                          _field(data_cfg, 'on_error'),
                          _field(data_cfg, 'max_pixels'))
  builder = sources.tfds_builder(name, _field(data_cfg, 'data_dir'))
  return sources.tfds_share(
      builder, _field(data_cfg, 'split'), process_index, process_count,
      drop_remainder=drop_remainder, image_key=_field(data_cfg, 'image_key'),
      label_key=_field(data_cfg, 'label_key'))


def _size(src):
  return src.num_examples if isinstance(src, sources.IndexedSource) else src[1]


def num_examples(data_cfg):
  """Examples in the configured split (embedded: photos x repeats)."""
  return _size(_source(data_cfg, 0, 1, drop_remainder=False))


def num_classes(data_cfg):
  """Number of labels: photos ('embedded'), 10 ('digits'), class directories
  ('folder') or the TFDS label feature's num_classes."""
  name = _field(data_cfg, 'name')
  if name in ('embedded', 'digits', 'folder'):
    return _source(data_cfg, 0, 1, drop_remainder=False).num_classes
  builder = sources.tfds_builder(name, _field(data_cfg, 'data_dir'))
  return builder.info.features[_field(data_cfg, 'label_key')].num_classes


def _train_steps(src, global_batch_size, process_count):
  local = _local_batch(global_batch_size, process_count)
  if isinstance(src, sources.IndexedSource):
    steps = src.num_examples // global_batch_size
  else:  # equal even_splits shares of the sequentially read TFDS split
    steps = src[1] // local
  if steps == 0:
    where = 'the split' if isinstance(src, sources.IndexedSource) else 'a share'
    raise ConfigError(f'global batch size {global_batch_size} leaves no full '
                      f'batch in the {_size(src)} examples of {where}')
  return steps


def steps_per_epoch(data_cfg, global_batch_size, process_count=1):
  """Training steps per epoch, the same on every process."""
  src = _source(data_cfg, 0, process_count, drop_remainder=True)
  return _train_steps(src, global_batch_size, process_count)


def _train_refs(src, seed, steps, global_batch_size, process_index,
                process_count, start_step, shuffle_buffer):
  """Infinite dataset of (reference, epoch) from start_step on. A reference
  is an int64 index (IndexedSource) or a TFDS record (encoded bytes, int32
  label, int64 uid, tfds_id string).

  The skip to start_step happens here, before any decoding.
  """
  local = global_batch_size // process_count
  start_epoch, offset = divmod(start_step, steps)

  def skip(epoch):
    return tf.where(epoch == start_epoch, tf.cast(offset * local, tf.int64), 0)

  if isinstance(src, sources.IndexedSource):
    def epoch_refs(epoch):
      key = augment.example_key(seed, epoch, _SHUFFLE_INDEX)
      perm = tf.random.experimental.stateless_shuffle(
          tf.range(src.num_examples, dtype=tf.int64), key)
      mine = tf.reshape(perm[:steps * global_batch_size],
                        [steps, process_count, local])[:, process_index]
      mine = tf.reshape(mine, [-1])[skip(epoch):]
      return tf.data.Dataset.from_tensor_slices(mine).map(
          _plain(lambda i: (i, epoch)))
  else:
    stream = src[0]

    def epoch_refs(epoch):
      key = augment.example_key(seed, epoch, _SHUFFLE_INDEX)
      refs = stream.shuffle(shuffle_buffer, seed=tf.cast(key[0], tf.int64))
      refs = refs.take(steps * local).skip(skip(epoch))
      return refs.map(_plain(lambda *ref: (ref, epoch)))

  return tf.data.Dataset.range(start_epoch, 2**62).flat_map(_plain(epoch_refs))


def _eval_refs(src, data_cfg, global_batch_size, process_index, process_count):
  """One pass over this process's share, padded with valid=False examples to
  the same number of batches on every process: dataset of (reference,
  valid), references as in _train_refs."""
  local = global_batch_size // process_count
  if isinstance(src, sources.IndexedSource):
    n = src.num_examples
    steps = math.ceil(n / global_batch_size)
    mine = tf.reshape(tf.range(steps * global_batch_size, dtype=tf.int64),
                      [steps, process_count, local])[:, process_index]
    mine = tf.reshape(mine, [-1])
    return tf.data.Dataset.from_tensor_slices((tf.minimum(mine, n - 1),
                                               mine < n))
  stream = src[0]
  steps = math.ceil(math.ceil(num_examples(data_cfg) / process_count) / local)
  pad = stream.take(1).map(_plain(lambda *ref: (ref, False))).repeat()
  refs = stream.map(_plain(lambda *ref: (ref, True))).concatenate(pad)
  return refs.take(steps * local)


def make_iterator(data_cfg, global_batch_size, *, seed, start_step=0,
                  process_index=0, process_count=1, train=True,
                  with_index=False):
  """Iterator of this process's batches, as dicts of numpy arrays.

  'image': float32 (L, H, W, C) NHWC (data.image_size, data.channels),
  normalised with data.mean / data.std; 'label': int32
  (L,); with `with_index`, 'index': int64 (L,) example identity (TFDS: hash
  of tfds_id). Training is infinite; batch k of an iterator started at
  `start_step` is batch start_step + k of an uninterrupted one. Evaluation
  (train=False) is one in-order pass with the eval transform and an extra
  bool 'valid' (L,) that is False on padding; start_step is ignored there.
  """
  local = _local_batch(global_batch_size, process_count)
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} is not in '
                     f'[0, process_count={process_count})')
  if start_step < 0:
    raise ValueError(f'start_step must be >= 0, got {start_step}')
  size, channels, mean, std = check_image_fields(
      *(_field(data_cfg, f) for f in ('image_size', 'channels', 'mean',
                                      'std')))
  train_transform = augment.get_train_transform(_field(data_cfg, 'augment'))
  src = _source(data_cfg, process_index, process_count, drop_remainder=train)

  if train:
    steps = _train_steps(src, global_batch_size, process_count)
    refs = _train_refs(src, seed, steps, global_batch_size, process_index,
                       process_count, start_step,
                       int(_field(data_cfg, 'shuffle_buffer')))

    def transform(image, epoch, index):
      return train_transform(image, augment.example_key(seed, epoch, index),
                             size, mean, std)

    bytes_transform = augment.get_train_bytes_transform(
        _field(data_cfg, 'augment'))

    def decode_crop(data, epoch, index):  # same draws, crop window decoded
      return bytes_transform(data, augment.example_key(seed, epoch, index),
                             size, mean, std)
    jpeg_transform = decode_crop if bytes_transform is not None else None
  else:
    refs = _eval_refs(src, data_cfg, global_batch_size, process_index,
                      process_count)
    jpeg_transform = None

    def transform(image, valid, index):
      del valid, index
      return augment.eval_transform(image, size, mean=mean, std=std)

  indexed = isinstance(src, sources.IndexedSource)
  if indexed:
    load_bytes = src.load_bytes if jpeg_transform else None

    def example(index, extra):
      if load_bytes is not None:  # a JPEG file decodes its crop window only
        data, label = load_bytes(index)
        out = {'image': jpeg_transform(data, extra, index), 'label': label}
      else:
        image, label = src.load(index)
        out = {'image': transform(image, extra, index), 'label': label}
      if not train:
        out['valid'] = extra
      if with_index:
        out['index'] = index
      return out
    ds = refs.map(_plain(example), num_parallel_calls=_AUTOTUNE,
                  deterministic=True)
    ds = ds.batch(local, drop_remainder=True)
  else:
    max_pixels = int(_field(data_cfg, 'max_pixels'))
    ds = records.tfds_batches(refs, local, transform, size + (channels,),
                              max_pixels, train, with_index, jpeg_transform)
  options = tf.data.Options()
  options.deterministic = True
  batches = ds.prefetch(_AUTOTUNE).with_options(options).as_numpy_iterator()
  if indexed:
    return batches
  where = (f'{_field(data_cfg, "name")} split {_field(data_cfg, "split")!r} '
           f'(process {process_index})')
  return records.reported(batches, _field(data_cfg, 'on_error'), max_pixels,
                          train, where)
