"""Training recipes' augmentation: RandAugment ops, random erasing, the
single-draw crop, the PIL-exact eval resize and the pipeline's data.augment."""
import importlib.resources
import io

import numpy as np
import pytest

tf = pytest.importorskip('tensorflow')
from PIL import Image, ImageEnhance, ImageOps  # noqa: E402

from mae_jax import images, schema  # noqa: E402
from mae_jax.data import augment, pipeline  # noqa: E402
from mae_jax.data import randaugment as ra  # noqa: E402

KEY = tf.constant([3, 4])


def _noise(h, w, seed=0, low=0, high=256):
  return np.random.RandomState(seed).randint(low, high, (h, w, 3)).astype(
      np.uint8)


def _keys(n, seed=0):
  return tf.random.experimental.stateless_split(tf.constant([seed, 11]), n)


def _map_keys(fn, keys, dtype):
  """fn applied to each stateless key, traced once (eager map_fn is slow)."""
  return tf.function(lambda k: tf.map_fn(fn, k, fn_output_signature=dtype))(
      keys).numpy()


def _photo(name):
  path = importlib.resources.files('skimage') / 'data' / name
  return np.asarray(Image.open(path).convert('RGB'))


@pytest.mark.parametrize('name', ra.OP_NAMES)
def test_op_shape_dtype_determinism(name):
  image = _noise(24, 30, low=20, high=230)
  for magnitude in (0.0, 9.0, 10.0):
    out = ra.apply_op(image, name, magnitude, KEY).numpy()
    assert out.shape == image.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(
        out, ra.apply_op(image, name, magnitude, KEY).numpy())


def test_unknown_op():
  with pytest.raises(ValueError, match='NoSuchOp.*Invert'):
    ra.apply_op(_noise(4, 4), 'NoSuchOp', 9.0, KEY)


def test_pixel_ops_match_pil():
  image = _noise(31, 45, seed=1, low=30, high=200)
  pil = Image.fromarray(image)
  x = image.astype(np.int32)
  np.testing.assert_array_equal(ra.invert(image), 255 - image)
  # Magnitude 9: 4 - int(3.6) = 1 bit kept.
  np.testing.assert_array_equal(
      ra.apply_op(image, 'PosterizeIncreasing', 9.0, KEY), x & 128)
  np.testing.assert_array_equal(ra.posterize(image, 3), ImageOps.posterize(
      pil, 3))
  # Magnitude 5: threshold 256 - 128 = 128.
  np.testing.assert_array_equal(
      ra.apply_op(image, 'SolarizeIncreasing', 5.0, KEY),
      np.where(x >= 128, 255 - x, x))
  np.testing.assert_array_equal(
      ra.apply_op(image, 'SolarizeAdd', 10.0, KEY),
      np.where(x < 128, np.minimum(x + 110, 255), x))
  stretched = ra.autocontrast(image).numpy()
  assert (stretched.min(axis=(0, 1)) == 0).all()
  assert (stretched.max(axis=(0, 1)) == 255).all()
  np.testing.assert_allclose(stretched, ImageOps.autocontrast(pil), atol=1)
  np.testing.assert_array_equal(ra.equalize(image), ImageOps.equalize(pil))
  for op, enhance in ((ra.color, ImageEnhance.Color),
                      (ra.contrast, ImageEnhance.Contrast),
                      (ra.brightness, ImageEnhance.Brightness),
                      (ra.sharpness, ImageEnhance.Sharpness)):
    for factor in (0.19, 1.81):
      ours = op(image, factor).numpy().astype(int)
      ref = np.asarray(enhance(pil).enhance(factor), int)
      assert np.abs(ours - ref).max() <= 1, (op.__name__, factor)


def test_equalize_flattens_histogram():
  image = np.clip(np.random.RandomState(2).normal(100, 10, (64, 64, 3)), 0,
                  255).astype(np.uint8)
  out = ra.equalize(image).numpy()
  for q in (0.25, 0.5, 0.75):  # quantiles of a flat histogram on 0..255
    assert abs(np.quantile(out, q) - 255 * q) < 20


def test_geometric_ops():
  image = _noise(40, 40, seed=3)
  np.testing.assert_array_equal(ra.rotate(image, 0.0), image)
  assert np.abs(ra.rotate(image, 90.0).numpy().astype(int)
                - np.rot90(image)).max() <= 1  # counter-clockwise
  moved = ra.translate_x(image, 10.0).numpy()
  np.testing.assert_array_equal(moved[:, :30], image[:, 10:])
  assert (moved[:, 30:] == ra.FILL).all()
  moved = ra.translate_y(image, -5.0).numpy()
  np.testing.assert_array_equal(moved[5:], image[:35])
  assert (ra.shear_x(image, 0.25).numpy()[-1, -5:] == ra.FILL).all()
  # PIL's bilinear affine; they differ only on the ~1-pixel seam to the fill.
  pil = Image.fromarray(image)
  for ours, matrix in ((ra.shear_x(image, 0.25), (1, 0.25, 0, 0, 1, 0)),
                       (ra.shear_y(image, -0.2), (1, 0, 0, -0.2, 1, 0)),
                       (ra.translate_x(image, 3.3), (1, 0, 3.3, 0, 1, 0))):
    ref = pil.transform(pil.size, Image.AFFINE, matrix, Image.BILINEAR,
                        fillcolor=ra.FILL)
    close = np.abs(ours.numpy().astype(int) - np.asarray(ref, int)) <= 1
    assert close.mean() > 0.95
  ref = pil.rotate(17.0, Image.BILINEAR, fillcolor=ra.FILL)
  close = np.abs(ra.rotate(image, 17.0).numpy().astype(int)
                 - np.asarray(ref, int)) <= 1
  assert close.mean() > 0.95


def test_rand_augment_determinism():
  image = _noise(32, 32, seed=4)
  outs = [ra.rand_augment(image, k).numpy() for k in _keys(6)]
  again = ra.rand_augment(image, _keys(6)[0]).numpy()
  np.testing.assert_array_equal(outs[0], again)
  assert all(o.shape == image.shape and o.dtype == np.uint8 for o in outs)
  assert len({o.tobytes() for o in outs}) > 1


def test_finetune_transform():
  image = _photo('chelsea.png')
  out = augment.finetune_transform(image, KEY, 48)
  assert out.shape == (48, 48, 3) and out.dtype == tf.float32
  np.testing.assert_array_equal(out, augment.finetune_transform(image, KEY,
                                                                48))
  other = augment.finetune_transform(image, tf.constant([3, 5]), 48)
  assert not np.array_equal(out, other)


def test_random_erase_rate_and_area():
  zeros = tf.zeros([40, 50, 3])
  erased = _map_keys(lambda k: augment.random_erase(zeros, k), _keys(1000),
                     tf.float32) != 0
  hit = erased.any(axis=(1, 2, 3))
  assert 0.21 < hit.mean() < 0.29
  area = erased[hit].all(axis=3).mean(axis=(1, 2))
  assert area.min() > 0.02 * 0.9 and area.max() < 1 / 3 * 1.1
  assert area.max() > 0.25 and area.min() < 0.05
  for mask in erased[hit][:20, :, :, 0]:  # one filled rectangle
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(0))[0]
    assert mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()
    assert mask.sum() == len(rows) * len(cols)


def test_linprobe_single_draw_crop():
  height, width = 375, 500
  boxes = _map_keys(
      lambda k: tf.stack(augment.sample_crop_box_single(k, height, width)),
      _keys(2000), tf.int32)
  top, left, h, w = boxes.T
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + h <= height).all() and (left + w <= width).all()
  area = h * w / (height * width)
  assert area.min() > 0.08 - 0.005 and area.max() <= 1
  assert area.min() < 0.1 and area.max() > 0.95
  aspect = w / h
  assert aspect.min() > 3 / 4 - 0.01 and aspect.max() < 4 / 3 + 0.01
  box = [int(v) for v in augment.sample_crop_box_single(KEY, height, width)]
  assert box == [int(v) for v in augment.sample_crop_box_single(
      KEY, height, width)]
  # One draw, clipped: on a 4 x 400 strip the height is clipped to 4 while
  # the width keeps its draw (torchvision would fall back to a center crop).
  strip = _map_keys(lambda k: tf.stack(augment.sample_crop_box_single(
      k, 4, 400)), _keys(200, seed=1), tf.int32)
  assert (strip[:, 2] == 4).all() and (strip[:, 3] > 4).all()
  assert len(set(strip[:, 3])) > 20
  out = augment.linprobe_transform(_photo('coffee.png'), KEY, 40)
  assert out.shape == (40, 40, 3) and out.dtype == tf.float32


def _pil_eval(image, size, crop_pct=0.875):
  """Reference: PIL bicubic resize of the shorter side + center crop."""
  pil = Image.fromarray(image)
  w, h = pil.size
  short = int(size / crop_pct)
  new_w, new_h = ((short, int(short * h / w)) if w <= h
                  else (int(short * w / h), short))
  out = np.asarray(pil.resize((new_w, new_h), Image.BICUBIC))
  top, left = int(round((new_h - size) / 2)), int(round((new_w - size) / 2))
  return out[top:top + size, left:left + size] / 255.0


@pytest.mark.parametrize('image_name', ['astronaut.png', 'chelsea.png',
                                        'coffee.png', 'rocket.jpg',
                                        'noise_37x53', 'stripes_301x457'])
def test_eval_transform_matches_pil(image_name):
  if image_name == 'noise_37x53':
    image = _noise(37, 53, seed=5)
  elif image_name == 'stripes_301x457':
    image = np.zeros((301, 457, 3), np.uint8)
    image[:, ::3] = 255  # hard edges: overshoot clipped between passes
    image[::7, :, 1] = 200
  else:
    image = _photo(image_name)
  for size in (224, 97, 33):
    out = augment.eval_transform(image, size).numpy()
    pixels = (out * np.array(images.IMAGENET_STD)
              + np.array(images.IMAGENET_MEAN))
    assert np.abs(pixels - _pil_eval(image, size)).max() <= 1 / 255


def test_resize_window_and_upsampling():
  image = _noise(23, 17, seed=6)
  full = augment.resize_bicubic_pil(image, 50, 61).numpy()
  ref = np.asarray(Image.fromarray(image).resize((61, 50), Image.BICUBIC))
  np.testing.assert_array_equal(full, ref)
  part = augment.resize_bicubic_pil(image, 50, 61, (7, 9, 20, 30)).numpy()
  np.testing.assert_array_equal(part, full[7:27, 9:39])


@pytest.mark.parametrize('size, mean, std', [
    (32, images.IMAGENET_MEAN, images.IMAGENET_STD),
    ((32, 24), (0.5,), (0.25,)),  # (H, W), grayscale
])
def test_pretrain_jpeg_path_matches_decoded(size, mean, std):
  buf = io.BytesIO()
  Image.fromarray(_photo('coffee.png')[:, :450]).save(buf, 'JPEG', quality=90)
  for data in (buf.getvalue(), tf.io.encode_png(_noise(60, 80)).numpy()):
    for key in _keys(3):
      expected = augment.train_transform(augment.decode_image(data), key,
                                         size, mean, std)
      got = augment.train_transform_jpeg(tf.constant(data), key, size, mean,
                                         std)
      assert got.shape == expected.shape == augment.image_hw(size) + (
          len(mean),)
      # libjpeg upsamples chroma differently on the crop's last column only.
      far = np.abs(got - expected) * 255 * max(std) > 1
      assert far.mean() < 0.05


def _data(**values):
  """The data config of the embedded photos, one copy each, with `values`."""
  return schema.config('pretrain', data=dict(name='embedded', split='all',
                                             repeats=1, **values)).data


@pytest.mark.parametrize('name', ['finetune', 'linprobe'])
@pytest.mark.parametrize('size, channels, shape', [
    (32, 3, (32, 32, 3)), ((32, 48), 1, (32, 48, 1))])
def test_pipeline_augment_field(name, size, channels, shape):
  cfg = _data(image_size=size, augment=name, channels=channels,
               mean=(0.5,) * channels, std=(0.5,) * channels)
  batch = next(pipeline.make_iterator(cfg, 8, seed=0))
  assert batch['image'].shape == (8, *shape)
  assert batch['image'].dtype == np.float32
  assert np.isfinite(batch['image']).all()


def test_unknown_augment_name():
  cfg = _data(image_size=32, augment='mixup')
  with pytest.raises(ValueError, match="'mixup'.*'pretrain'.*'linprobe'"):
    pipeline.make_iterator(cfg, 8, seed=0)


def test_augment_none_trains_on_the_eval_transform_whatever_the_key():
  image = np.random.default_rng(4).integers(0, 256, (28, 28, 1), np.uint8)
  none = augment.get_train_transform('none')
  want = augment.eval_transform(image, 28, mean=(0.13,), std=(0.31,))
  for index in range(3):
    out = none(image, augment.example_key(0, 1, index), 28, (0.13,), (0.31,))
    np.testing.assert_array_equal(out.numpy(), want.numpy())
