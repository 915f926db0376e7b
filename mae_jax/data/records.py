"""Encoded TFDS records: header checks, decoding with a status, and batches
whose bad records are filled, named and counted.

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
"""
import numpy as np
import tensorflow as tf
from absl import logging

from mae_jax.data import augment
from mae_jax.errors import DataError

_AUTOTUNE = tf.data.AUTOTUNE
# Status of a record (read_checked).
OK, NOT_AN_IMAGE, TOO_LARGE, UNDECODABLE = 0, 1, 2, 3
_HEADER = 32  # bytes of an encoded image read for its format and size


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


def read_checked(data, transform, shape, max_pixels, jpeg_transform=None):
  """(transform(uint8 image), status) of encoded bytes; status OK, or
  NOT_AN_IMAGE / TOO_LARGE with a zero image of `shape` (H, W, C). Raises
  where the bytes do not decode (the caller drops those: UNDECODABLE). With
  `jpeg_transform` (fn of the bytes) a JPEG goes through it instead: its
  header already gave the true size, and it decodes only what it needs (the
  crop window)."""
  known, pixels, is_jpeg = _header_pixels(data)
  status = tf.where(known, tf.where(pixels > max_pixels, TOO_LARGE, OK),
                    NOT_AN_IMAGE)
  zeros = tf.zeros(shape)

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


def tfds_batches(refs, local, transform, shape, max_pixels, train,
                 with_index, jpeg_transform=None):
  """Batches of TFDS (reference, extra) pairs (extra: epoch, or valid in
  evaluation) whose bad records are filled as the module docstring says.

  Each batch of L references is decoded by its own small dataset whose
  errors are dropped (ignore_errors), so a record that fails to decode costs
  only its own slot. Besides 'image', 'label' ('index': uid, with
  with_index; 'valid' in evaluation) a batch holds '_status' (L,) int32 and
  '_id' (L,) tfds_id strings for reported. `jpeg_transform`, if given,
  fn(bytes, extra, uid), replaces decode + transform for JPEG records.
  """
  @tf.autograph.experimental.do_not_convert  # plain TF ops: trace faster
  def example(ref, extra, slot):
    data, label, uid, _ = ref
    image, status = read_checked(
        data, lambda im: transform(im, extra, uid), shape, max_pixels,
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


def reported(batches, on_error, max_pixels, train, where):
  """Logs (and counts) or, with on_error='fail', raises on the bad records
  of each batch; yields the batches without '_status' and '_id'."""
  skipped = 0
  for batch in batches:
    status, ids = batch.pop('_status'), batch.pop('_id')
    bad = [(ids[i].decode(errors='replace'), _reason(status[i], max_pixels))
           for i in np.flatnonzero(status != OK)]
    if bad and on_error == 'fail':
      raise DataError(f'TFDS record {bad[0][0]} of {where}: unusable image '
                      f"({bad[0][1]}); set config.data.on_error='skip' to "
                      'skip such records')
    for name, reason in bad:
      skipped += 1
      logging.warning('skipping TFDS record %s of %s: %s; %d skipped so far '
                      "(config.data.on_error='skip')", name, where, reason,
                      skipped)
    if train and bad and len(bad) == len(status):
      raise DataError(f'all {len(bad)} records of a batch of {where} are '
                      f'unusable ({", ".join(n for n, _ in bad[:3])}, ...)')
    yield batch
