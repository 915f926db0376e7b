"""tf.data input pipeline: per-process shards of deterministic global batches.

Training order: epoch e visits a permutation of the examples drawn from
(seed, e); global batch b of the epoch holds permutation entries
[b*G, (b+1)*G) and process p gets the slice [b*G + p*L, b*G + (p+1)*L)
(G global, L = G / process_count local batch). The global batch therefore
does not depend on the number of processes, and the augmentation of an
example is keyed by (seed, e, example index). Each epoch drops the last
n % G examples. TFDS splits are read sequentially: each process streams its
own tfds.even_splits share through a shuffle buffer seeded from (seed, e).

Unusable TFDS records (bytes that are no BMP/GIF/JPEG/PNG/WebP/JPEG XL
image, that fail to decode, e.g. truncated, or with more than max_pixels
pixels) cannot be removed up front from a streamed split, so they are
handled per batch: every batch still consumes exactly its L records of the
share, and a bad record's slot is filled with a copy of the first usable
example at or after it in the same batch (the last usable one before it if
none follows). Batch k of a resumed iterator therefore still equals batch k
of an uninterrupted one, and the epoch length is unchanged. Each bad record
is named (tfds_id) and counted in the log, or with on_error='fail' stops the
iterator with a ValueError naming it. Evaluation marks a bad record's slot
valid=False instead. A training batch whose L records are all unusable is a
ValueError either way.

`data_cfg` (a dict, ConfigDict or any object with attributes) fields:
  name: 'embedded' | 'folder' | a TFDS dataset name (e.g. 'imagenet2012').
  image_size: output height = width, in pixels.
  data_dir (None): image folder root ('folder') or TFDS data_dir.
  split ('train'): folder sub-directory or TFDS split; ignored by 'embedded'.
  repeats (None): copies of each embedded photo per epoch; None gives an
    epoch of at least 256 examples.
  shuffle_buffer (10_000): TFDS examples held in the shuffle buffer.
  image_key ('image'), label_key ('label'): TFDS feature names.
  augment ('pretrain'): training transform, one of augment.TRAIN_AUGMENTS:
    'pretrain', 'finetune' or 'linprobe' (see mae_jax.data.augment). With
    'pretrain', folder files and TFDS records go through
    augment.train_transform_jpeg: a JPEG decodes only its crop window.
  on_error ('skip'): an unusable folder image or TFDS record is skipped (and
    named in the log) or, with 'fail', stops the run (see sources.folder and
    above).
  max_pixels (89_478_485): images with more pixels are unusable (TFDS: read
    from the JPEG/PNG/GIF/BMP header before decoding; WebP and JPEG XL are
    checked after decoding).
"""
import math

import numpy as np
import tensorflow as tf
from absl import logging

from mae_jax.data import augment, sources

_DEFAULTS = dict(data_dir=None, split='train', repeats=None,
                 shuffle_buffer=10_000, image_key='image', label_key='label',
                 augment='pretrain', on_error='skip',
                 max_pixels=sources.MAX_PIXELS)
_SHUFFLE_INDEX = -1  # example_key index reserved for the epoch's shuffle
_AUTOTUNE = tf.data.AUTOTUNE
# Status of a TFDS record (_read_checked).
OK, NOT_AN_IMAGE, TOO_LARGE, UNDECODABLE = 0, 1, 2, 3
_HEADER = 32  # bytes of an encoded image read for its format and size


def _field(data_cfg, name):
  """Reads one data config field, falling back to _DEFAULTS."""
  if hasattr(data_cfg, 'get'):
    value = data_cfg.get(name, None)
  else:
    value = getattr(data_cfg, name, None)
  if value is not None:
    return value
  if name in _DEFAULTS:
    return _DEFAULTS[name]
  raise ValueError(f'data config lacks the required field {name!r}')


def _local_batch(global_batch_size, process_count):
  if global_batch_size % process_count:
    raise ValueError(f'global batch size {global_batch_size} is not divisible '
                     f'by the process count {process_count}')
  return global_batch_size // process_count


def _source(data_cfg, process_index, process_count, drop_remainder):
  """IndexedSource, or (dataset, share size) of this process's TFDS share."""
  name = _field(data_cfg, 'name')
  if name == 'embedded':
    return sources.embedded(_field(data_cfg, 'repeats'))
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
  """Number of labels: photos ('embedded'), class directories ('folder') or
  the TFDS label feature's num_classes."""
  name = _field(data_cfg, 'name')
  if name in ('embedded', 'folder'):
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
    raise ValueError(f'global batch size {global_batch_size} leaves no full '
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
      return tf.data.Dataset.from_tensor_slices(mine).map(lambda i: (i, epoch))
  else:
    stream = src[0]

    def epoch_refs(epoch):
      key = augment.example_key(seed, epoch, _SHUFFLE_INDEX)
      refs = stream.shuffle(shuffle_buffer, seed=tf.cast(key[0], tf.int64))
      refs = refs.take(steps * local).skip(skip(epoch))
      return refs.map(lambda *ref: (ref, epoch))

  return tf.data.Dataset.range(start_epoch, 2**62).flat_map(epoch_refs)


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
  pad = stream.take(1).map(lambda *ref: (ref, False)).repeat()
  refs = stream.map(lambda *ref: (ref, True)).concatenate(pad)
  return refs.take(steps * local)


def _bytes_int(header, start, count, big_endian=False):
  """Unsigned integer (int64) in bytes [start, start + count) of `header`."""
  digits = tf.cast(tf.io.decode_raw(tf.strings.substr(header, start, count),
                                    tf.uint8), tf.int64)
  if big_endian:
    digits = tf.reverse(digits, [0])
  return tf.reduce_sum(digits * 256 ** tf.range(count, dtype=tf.int64))


def _header_pixels(data):
  """(known, pixels, is_jpeg) of encoded image bytes, without decoding: known
  says tf.io.decode_image recognises the format; pixels is width x height
  from a JPEG, PNG, GIF or BMP header, else -1. A JPEG whose header is
  corrupt raises (tf.io.extract_jpeg_shape)."""
  header = tf.strings.substr(tf.strings.join(
      [tf.strings.substr(data, 0, _HEADER), tf.constant(b'\0' * _HEADER)]),
                             0, _HEADER)
  starts = lambda magic, at=0: tf.equal(
      tf.strings.substr(header, at, len(magic)), magic)
  is_jpeg = starts(b'\xff\xd8\xff')
  is_png = starts(b'\x89PNG\r\n\x1a\n')
  is_gif = starts(b'GIF8')
  is_bmp = starts(b'BM')
  other = ((starts(b'RIFF') & starts(b'WEBP', 8)) | starts(b'\xff\x0a')
           | starts(b'\x00\x00\x00\x0cJXL \r\n\x87\n'))

  def jpeg():
    shape = tf.io.extract_jpeg_shape(data, output_type=tf.int64)
    return shape[0] * shape[1]

  def png():
    return (_bytes_int(header, 16, 4, big_endian=True)
            * _bytes_int(header, 20, 4, big_endian=True))

  def gif():
    return _bytes_int(header, 6, 2) * _bytes_int(header, 8, 2)

  def bmp():  # int32 width and height; a negative height is top-down
    signed = lambda x: tf.where(x >= 2**31, x - 2**32, x)
    return (tf.abs(signed(_bytes_int(header, 18, 4)))
            * tf.abs(signed(_bytes_int(header, 22, 4))))

  pixels = tf.case([(is_jpeg, jpeg), (is_png, png), (is_gif, gif),
                    (is_bmp, bmp)],
                   default=lambda: tf.constant(-1, tf.int64))
  return is_jpeg | is_png | is_gif | is_bmp | other, pixels, is_jpeg


def _read_checked(data, transform, size, max_pixels, jpeg_transform=None):
  """(transform(uint8 image), status) of encoded bytes; status OK, or
  NOT_AN_IMAGE / TOO_LARGE with a zero image. Raises where the bytes do not
  decode (the caller drops those: UNDECODABLE). With `jpeg_transform` (fn of
  the bytes) a JPEG goes through it instead: its header already gave the
  true size, and it decodes only what it needs (the crop window)."""
  known, pixels, is_jpeg = _header_pixels(data)
  status = tf.where(known, tf.where(pixels > max_pixels, TOO_LARGE, OK),
                    NOT_AN_IMAGE)
  zeros = tf.zeros([size, size, 3])

  def decode():
    image = augment.decode_image(data)
    shape = tf.shape(image, out_type=tf.int64)
    return tf.cond(shape[0] * shape[1] > max_pixels,
                   lambda: (zeros, tf.constant(TOO_LARGE)),
                   lambda: (transform(image), tf.constant(OK)))

  if jpeg_transform is not None:
    decode_image = decode
    decode = lambda: tf.cond(  # noqa: E731
        is_jpeg, lambda: (jpeg_transform(data), tf.constant(OK)),
        decode_image)
  return tf.cond(tf.equal(status, OK), decode, lambda: (zeros, status))


def _tfds_batches(refs, local, transform, size, max_pixels, train,
                  with_index, jpeg_transform=None):
  """Batches of TFDS (reference, extra) pairs (extra: epoch, or valid in
  evaluation) whose bad records are filled as the module docstring says.

  Each batch of L references is decoded by its own small dataset whose
  errors are dropped (ignore_errors), so a record that fails to decode costs
  only its own slot. Besides 'image', 'label' ('index': uid, with
  with_index; 'valid' in evaluation) a batch holds '_status' (L,) int32 and
  '_id' (L,) tfds_id strings for _reported. `jpeg_transform`, if given,
  fn(bytes, extra, uid), replaces decode + transform for JPEG records.
  """
  @tf.autograph.experimental.do_not_convert  # plain TF ops: trace faster
  def example(ref, extra, slot):
    data, label, uid, _ = ref
    image, status = _read_checked(
        data, lambda im: transform(im, extra, uid), size, max_pixels,
        jpeg_transform and (lambda d: jpeg_transform(d, extra, uid)))
    return {'image': image, 'label': label, 'index': uid, 'status': status,
            'slot': slot}

  @tf.autograph.experimental.do_not_convert
  def batch(ref, extra):
    slots = tf.range(local, dtype=tf.int32)
    got = tf.data.Dataset.from_tensor_slices((ref, extra, slots)).map(
        example, num_parallel_calls=_AUTOTUNE, deterministic=True)
    got = got.ignore_errors().batch(local)
    none = tf.nest.map_structure(  # the batch if every record failed
        lambda spec: tf.zeros([0, *spec.shape[1:]], spec.dtype),
        got.element_spec)
    got = got.concatenate(tf.data.Dataset.from_tensors(none)).take(1)
    return got.map(tf.autograph.experimental.do_not_convert(
        lambda g: _fill(g, ref[3], extra, local, train, with_index)))

  return refs.batch(local, drop_remainder=True).interleave(
      batch, cycle_length=2, num_parallel_calls=2, deterministic=True)


def _fill(got, ids, extra, local, train, with_index):
  """Full batch of `local` slots from the `got` examples (the records that
  decoded, in slot order, with their status)."""
  status = tf.tensor_scatter_nd_update(
      tf.fill([local], UNDECODABLE), got['slot'][:, None], got['status'])
  if not train:  # padding references are not reported
    status = tf.where(extra, status, OK)
  good = tf.equal(got['status'], OK)
  good_slots = tf.boolean_mask(got['slot'], good)
  good_rows = tf.where(good)[:, 0]
  count = tf.size(good_slots)
  fields = {k: got[k] for k in ('image', 'label', 'index')}

  def filled():  # first usable slot at or after each slot, else the last
    pick = tf.minimum(tf.searchsorted(good_slots, tf.range(local)), count - 1)
    rows = tf.gather(good_rows, pick)
    return {k: tf.gather(v, rows) for k, v in fields.items()}

  def nothing():
    return {k: tf.zeros([local, *v.shape[1:]], v.dtype)
            for k, v in fields.items()}

  out = tf.cond(tf.equal(count, local), lambda: fields,
                lambda: tf.cond(count > 0, filled, nothing))
  for k, v in out.items():
    v.set_shape([local, *fields[k].shape[1:]])
  out.update(_status=status, _id=ids)
  if not with_index:
    del out['index']
  if not train:
    out['valid'] = extra & tf.equal(status, OK)
  return out


def _reason(status, max_pixels):
  return {NOT_AN_IMAGE: 'not a BMP, GIF, JPEG, PNG, WebP or JPEG XL image',
          TOO_LARGE: f'more than data.max_pixels={max_pixels} pixels',
          UNDECODABLE: 'does not decode (truncated or corrupt)'}[int(status)]


def _reported(batches, on_error, max_pixels, train, where):
  """Logs (and counts) or, with on_error='fail', raises on the bad records
  of each batch; yields the batches without '_status' and '_id'."""
  skipped = 0
  for batch in batches:
    status, ids = batch.pop('_status'), batch.pop('_id')
    bad = [(ids[i].decode(errors='replace'), _reason(status[i], max_pixels))
           for i in np.flatnonzero(status != OK)]
    if bad and on_error == 'fail':
      raise ValueError(f'TFDS record {bad[0][0]} of {where}: unusable image '
                       f"({bad[0][1]}); set config.data.on_error='skip' to "
                       'skip such records')
    for name, reason in bad:
      skipped += 1
      logging.warning('skipping TFDS record %s of %s: %s; %d skipped so far '
                      "(config.data.on_error='skip')", name, where, reason,
                      skipped)
    if train and bad and len(bad) == len(status):
      raise ValueError(f'all {len(bad)} records of a batch of {where} are '
                       f'unusable ({", ".join(n for n, _ in bad[:3])}, ...)')
    yield batch


def make_iterator(data_cfg, global_batch_size, *, seed, start_step=0,
                  process_index=0, process_count=1, train=True,
                  with_index=False):
  """Iterator of this process's batches, as dicts of numpy arrays.

  'image': float32 (L, S, S, 3) NHWC, ImageNet-normalised; 'label': int32
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
  size = int(_field(data_cfg, 'image_size'))
  train_transform = augment.get_train_transform(_field(data_cfg, 'augment'))
  src = _source(data_cfg, process_index, process_count, drop_remainder=train)

  if train:
    steps = _train_steps(src, global_batch_size, process_count)
    refs = _train_refs(src, seed, steps, global_batch_size, process_index,
                       process_count, start_step,
                       int(_field(data_cfg, 'shuffle_buffer')))

    def transform(image, epoch, index):
      return train_transform(image, augment.example_key(seed, epoch, index),
                             size)

    jpeg_transform = None
    bytes_transform = augment.get_train_bytes_transform(
        _field(data_cfg, 'augment'))
    if bytes_transform is not None:  # same draws, crop window decoded only
      def jpeg_transform(data, epoch, index):
        return bytes_transform(data, augment.example_key(seed, epoch, index),
                               size)
  else:
    refs = _eval_refs(src, data_cfg, global_batch_size, process_index,
                      process_count)
    jpeg_transform = None

    def transform(image, valid, index):
      del valid, index
      return augment.eval_transform(image, size)

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
    ds = refs.map(example, num_parallel_calls=_AUTOTUNE, deterministic=True)
    ds = ds.batch(local, drop_remainder=True)
  else:
    max_pixels = int(_field(data_cfg, 'max_pixels'))
    ds = _tfds_batches(refs, local, transform, size, max_pixels, train,
                       with_index, jpeg_transform)
  options = tf.data.Options()
  options.deterministic = True
  batches = ds.prefetch(_AUTOTUNE).with_options(options).as_numpy_iterator()
  if indexed:
    return batches
  where = (f'{_field(data_cfg, "name")} split {_field(data_cfg, "split")!r} '
           f'(process {process_index})')
  return _reported(batches, _field(data_cfg, 'on_error'), max_pixels, train,
                   where)
