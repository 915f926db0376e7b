"""Input pipeline: sources, augmentation, determinism, resume, sharding."""
import re
import subprocess
import sys

import numpy as np
import pytest

tf = pytest.importorskip('tensorflow')
tfds = pytest.importorskip('tensorflow_datasets')
from PIL import Image  # noqa: E402

from mae_jax import schema  # noqa: E402
from mae_jax.data import augment, pipeline, records, sources  # noqa: E402

SIZE = 32


def _data(**values):
  """A whole data config (pretraining defaults) with `values`."""
  return schema.config('pretrain', data={'image_size': SIZE, **values}).data


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _embedded(repeats):
  return _data(name='embedded', repeats=repeats)


def _map_keys(fn, keys, dtype):
  """fn applied to each stateless key, traced once (eager map_fn is slow)."""
  return tf.function(lambda k: tf.map_fn(fn, k, fn_output_signature=dtype))(
      keys).numpy()


def _denormalize(image):
  return image * np.array(schema.IMAGENET_STD) + np.array(schema.IMAGENET_MEAN)


def test_mae_jax_imports_without_tensorflow():
  code = ('import sys, mae_jax, mae_jax.models; '
          'assert "tensorflow" not in sys.modules, "mae_jax imported TF"')
  subprocess.run([sys.executable, '-c', code], check=True)


def test_pipeline_imports_tensorflow_without_keras_which_stays_importable():
  """TensorFlow imports Keras' optimizers at its import (seconds of every
  run's start-up); the input pipeline's import of TensorFlow does not, and
  Keras and tf.keras import normally afterwards."""
  code = ('import sys\n'
          'from mae_jax.data import pipeline\n'
          'assert "tensorflow" in sys.modules\n'
          'assert "keras" not in sys.modules, "keras was imported"\n'
          'import tensorflow as tf\n'
          'print(tf.keras.optimizers.Adam.__name__)\n')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True,
                       text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.split() == ['Adam']


def test_embedded_source_loads_offline():
  src = sources.embedded(repeats=1, split='all')
  assert src.num_examples == src.num_classes == len(sources.EMBEDDED_FILES)
  assert src.num_examples >= 10
  labels = []
  for i in range(src.num_examples):
    image, label = src.load(tf.constant(i, tf.int64))
    assert image.dtype == tf.uint8 and image.shape[-1] == 3
    assert min(image.shape[:2]) >= 100
    labels.append(int(label))
  assert labels == list(range(src.num_examples))
  cfg = _data(name='embedded', split='all')
  assert pipeline.num_examples(cfg) >= 256
  assert pipeline.num_classes(cfg) == src.num_classes


def test_batches_shape_dtype_and_normalisation():
  batch = next(pipeline.make_iterator(_embedded(4), 16, seed=0))
  assert batch['image'].shape == (16, SIZE, SIZE, 3)
  assert batch['image'].dtype == np.float32
  assert batch['label'].shape == (16,) and batch['label'].dtype == np.int32
  assert abs(batch['image'].mean()) < 0.5
  assert 0.5 < batch['image'].std() < 1.5
  pixels = _denormalize(batch['image'])
  assert pixels.min() > -1e-5 and pixels.max() < 1 + 1e-5


def test_determinism_and_resume_across_epochs():
  cfg = _embedded(2)  # 40 examples, batch 16: 2 steps per epoch
  assert pipeline.steps_per_epoch(cfg, 16) == 2
  run = _take(pipeline.make_iterator(cfg, 16, seed=3, with_index=True), 7)
  again = _take(pipeline.make_iterator(cfg, 16, seed=3, with_index=True), 7)
  other = _take(pipeline.make_iterator(cfg, 16, seed=4, with_index=True), 1)
  for a, b in zip(run, again):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(run[0]['index'], other[0]['index'])
  assert not np.array_equal(run[0]['image'], other[0]['image'])
  # Epochs differ in order and crops.
  assert not np.array_equal(run[0]['index'], run[2]['index'])
  for start in (2, 3):  # an epoch boundary, and mid-epoch
    resumed = _take(pipeline.make_iterator(cfg, 16, seed=3, start_step=start,
                                           with_index=True), 7 - start)
    for a, b in zip(run[start:], resumed):
      for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_process_shards_are_disjoint_and_form_the_global_batch():
  cfg = _embedded(4)  # 80 examples, batch 16: 5 steps per epoch
  steps = pipeline.steps_per_epoch(cfg, 16, process_count=2)
  assert steps == 5
  shards = [_take(pipeline.make_iterator(cfg, 16, seed=1, process_index=p,
                                         process_count=2, with_index=True),
                  steps) for p in range(2)]
  seen = [np.concatenate([b['index'] for b in s]) for s in shards]
  assert len(seen[0]) == len(seen[1]) == 40
  assert not set(seen[0]) & set(seen[1])
  assert set(seen[0]) | set(seen[1]) == set(range(80))
  single = _take(pipeline.make_iterator(cfg, 16, seed=1, with_index=True), 2)
  for step, whole in enumerate(single):
    for k in whole:
      np.testing.assert_array_equal(
          whole[k], np.concatenate([shards[0][step][k], shards[1][step][k]]))
  with pytest.raises(ValueError, match='16.*3'):
    pipeline.make_iterator(cfg, 16, seed=1, process_count=3)


@pytest.fixture(name='folder_root')
def _folder_root(tmp_path):
  """train/{ant,bee,cat,dog}: RGB JPEG, gray PNG, RGBA PNG, RGB PNG."""
  files = {
      'ant/a.jpg': Image.new('RGB', (40, 30), (250, 0, 0)),
      'bee/b.png': Image.new('L', (30, 40), 90),
      'cat/c.PNG': Image.new('RGBA', (36, 36), (10, 200, 30, 0)),
      'dog/d.png': Image.new('RGB', (50, 20), (0, 0, 240)),
  }
  for name, image in files.items():
    path = tmp_path / 'train' / name
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
  (tmp_path / 'train' / 'dog' / 'notes.txt').write_text('not an image')
  return tmp_path


def test_image_folder(folder_root):
  cfg = _data(name='folder', data_dir=str(folder_root), split='train')
  assert pipeline.num_examples(cfg) == pipeline.num_classes(cfg) == 4
  batches = list(pipeline.make_iterator(cfg, 4, seed=0, train=False))
  assert len(batches) == 1
  batch = batches[0]
  np.testing.assert_array_equal(batch['label'], [0, 1, 2, 3])
  assert batch['valid'].all()
  colours = _denormalize(batch['image']).mean(axis=(1, 2)) * 255
  expected = [(250, 0, 0), (90, 90, 90), (10, 200, 30), (0, 0, 240)]
  np.testing.assert_allclose(colours, expected, atol=4)  # JPEG error
  train = next(pipeline.make_iterator(cfg, 4, seed=0))
  assert sorted(train['label']) == [0, 1, 2, 3]
  padded = list(pipeline.make_iterator(cfg, 6, seed=0, train=False,
                                       process_index=1, process_count=2))
  np.testing.assert_array_equal(padded[0]['valid'], [True, False, False])


def test_image_folder_pretraining_reads_bytes(folder_root, monkeypatch):
  """Pretraining on a folder transforms the file bytes
  (train_transform_jpeg: a JPEG decodes only its crop window, other formats
  fully), with the example's own key."""
  cfg = _data(name='folder', data_dir=str(folder_root), split='train')
  calls = []
  real = augment.train_transform_jpeg
  monkeypatch.setattr(augment, 'train_transform_jpeg',
                      lambda *a: calls.append(1) or real(*a))
  batch = next(pipeline.make_iterator(cfg, 4, seed=3, with_index=True))
  assert calls
  monkeypatch.setattr(augment, 'train_transform_jpeg', real)
  paths = sorted(str(p) for p in (folder_root / 'train').glob('*/*')
                 if p.suffix != '.txt')
  for image, index in zip(batch['image'], batch['index']):
    data = tf.io.read_file(paths[index])
    expected = augment.train_transform_jpeg(
        data, augment.example_key(3, 0, index), SIZE)
    np.testing.assert_allclose(image, expected, atol=1e-6)


def test_image_folder_errors(folder_root, tmp_path):
  with pytest.raises(FileNotFoundError, match='missing'):
    pipeline.num_examples(_data(name='folder', split='train',
                                data_dir=str(tmp_path / 'missing')))
  (tmp_path / 'empty' / 'train').mkdir(parents=True)
  with pytest.raises(ValueError, match='empty'):
    pipeline.num_examples(_data(name='folder',
                                data_dir=str(tmp_path / 'empty')))
  with pytest.raises(ValueError, match='data_dir'):
    pipeline.num_examples(_data(name='folder'))
  with pytest.raises(ValueError, match='16.*4'):
    pipeline.steps_per_epoch(_data(name='folder',
                                   data_dir=str(folder_root)), 16)


def test_folder_skips_formats_the_pipeline_does_not_decode(tmp_path, caplog):
  """A TIFF (here named .png) is an image PIL reads but tf.io.decode_image
  does not: it is skipped up front, named with the reason, not met mid-run;
  a WebP file is read."""
  (tmp_path / 'train' / 'x').mkdir(parents=True)
  for name, fmt in (('a.png', 'PNG'), ('b.png', 'TIFF'), ('c.webp', 'WEBP')):
    Image.new('RGB', (20, 20), (9, 9, 9)).save(tmp_path / 'train' / 'x' / name,
                                               fmt)
  cfg = _data(name='folder', data_dir=str(tmp_path))
  with caplog.at_level('WARNING'):
    assert pipeline.num_examples(cfg) == 2
  assert 'b.png: TIFF files are not decoded by the input pipeline' in (
      caplog.text)
  batch = next(pipeline.make_iterator(cfg, 2, seed=0, train=False))
  assert batch['valid'].all()


def test_unknown_dataset_name():
  with pytest.raises(ValueError, match='no_such_dataset_xyz'):
    pipeline.num_examples(_data(name='no_such_dataset_xyz'))


def test_tfds_mock_imagenet():
  cfg = _data(name='imagenet2012', shuffle_buffer=8)
  with tfds.testing.mock_data(num_examples=12,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    # The mock yields 12 examples for every split string, so each process's
    # share holds 12 examples whose tfds_ids name the share.
    assert pipeline.steps_per_epoch(cfg, 8, process_count=2) == 3
    assert pipeline.num_classes(cfg) == 1000
    run = _take(pipeline.make_iterator(cfg, 8, seed=0, process_count=2,
                                       with_index=True), 4)
    batch = run[0]
    assert batch['image'].shape == (4, SIZE, SIZE, 3)
    assert batch['label'].dtype == np.int32
    assert ((batch['label'] >= 0) & (batch['label'] < 1000)).all()
    epoch0 = np.concatenate([b['index'] for b in run[:3]])
    assert len(set(epoch0)) == 12
    other = _take(pipeline.make_iterator(cfg, 8, seed=0, process_index=1,
                                         process_count=2, with_index=True), 3)
    assert not set(epoch0) & set(np.concatenate([b['index'] for b in other]))
    resumed = _take(pipeline.make_iterator(cfg, 8, seed=0, start_step=2,
                                           process_count=2,
                                           with_index=True), 2)
    for a, b in zip(run[2:], resumed):
      for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    evals = list(pipeline.make_iterator(cfg, 8, seed=0, train=False))
    assert len(evals) == 2 and evals[1]['valid'].sum() == 4


def test_tfds_jpeg_records_decode_only_the_crop_window(monkeypatch):
  """Pretraining on TFDS records: a JPEG goes through train_transform_jpeg
  (same draws, only the crop window decoded), other formats through a full
  decode; the header's size check still applies."""
  rng = np.random.default_rng(0)
  image = np.repeat(np.repeat(rng.integers(0, 256, (12, 17, 3), np.uint8),
                              8, 0), 8, 1)  # (96, 136, 3), JPEG-friendly
  jpeg = tf.io.encode_jpeg(image, quality=95)
  png = tf.io.encode_png(image)
  key = augment.example_key(0, 1, 5)
  full = lambda im: augment.train_transform(im, key, SIZE)  # noqa: E731
  window = lambda d: augment.train_transform_jpeg(d, key, SIZE)  # noqa: E731
  shape = (SIZE, SIZE, 3)
  got, status = records.read_checked(jpeg, full, shape, 10**6, window)
  assert int(status) == records.OK
  np.testing.assert_array_equal(got, window(jpeg))
  got, status = records.read_checked(png, full, shape, 10**6, window)
  np.testing.assert_array_equal(got, full(augment.decode_image(png)))
  got, status = records.read_checked(jpeg, full, shape, 1000, window)
  assert int(status) == records.TOO_LARGE and not np.any(got)

  calls = []
  real = augment.train_transform_jpeg
  monkeypatch.setattr(augment, 'train_transform_jpeg',
                      lambda *a: calls.append(1) or real(*a))
  cfg = _data(name='imagenet2012', shuffle_buffer=8)
  with tfds.testing.mock_data(num_examples=8,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    batch = next(pipeline.make_iterator(cfg, 8, seed=0))
    assert calls  # the mock's JPEG records took the crop-window path
    assert batch['image'].shape == (8, SIZE, SIZE, 3)
    calls.clear()
    next(pipeline.make_iterator(dict(cfg, augment='linprobe'), 8, seed=0))
    assert not calls  # no bytes transform for the other augments


def test_crop_boxes_follow_torchvision_ranges():
  keys = tf.random.experimental.stateless_split(tf.constant([0, 7]), 2000)
  height, width = 375, 500
  boxes = _map_keys(
      lambda k: tf.stack(augment.sample_crop_box(k, height, width)), keys,
      tf.int32)
  top, left, h, w = boxes.T
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + h <= height).all() and (left + w <= width).all()
  area = h * w / (height * width)
  assert area.min() > 0.2 - 0.01 and area.max() <= 1
  assert area.min() < 0.25 and area.max() > 0.9
  aspect = w / h
  assert aspect.min() > 3 / 4 - 0.01 and aspect.max() < 4 / 3 + 0.01
  # No try fits a 2 x 100 strip: center crop with the aspect clamped.
  box = [int(v) for v in augment.sample_crop_box(keys[0], 2, 100)]
  assert box == [0, 48, 2, 3]


def test_flip_rate_and_eval_transform():
  image = np.zeros((40, 40, 3), np.uint8)
  image[:, 20:] = 255
  keys = tf.random.experimental.stateless_split(tf.constant([1, 2]), 400)
  left = _map_keys(
      lambda k: augment.train_transform(image, k, 8, scale=(1, 1),
                                        ratio=(1, 1))[0, 0, 0],
      keys, tf.float32)
  flipped = (left > 0).mean()
  assert 0.4 < flipped < 0.6
  out = augment.eval_transform(np.full((300, 400, 3), 128, np.uint8), 224)
  assert out.shape == (224, 224, 3)
  np.testing.assert_allclose(_denormalize(out.numpy()), 128 / 255, atol=1e-4)


@pytest.mark.parametrize('name', ['pretrain', 'finetune', 'linprobe'])
def test_documented_data_fields_are_config_fields_that_are_honoured(name):
  import importlib
  config = importlib.import_module(f'configs.{name}').get_config('tiny')
  documented = {f for names in re.findall(r'^  (\w+(?:, \w+)*):',
                                          pipeline.__doc__, re.M)
                for f in names.split(', ')}
  # eval_split is read by the training loop, which passes it as split.
  assert documented == set(config.data) - {'eval_split'}
  config.update_from_flattened_dict({'data.repeats': 2,
                                     'data.shuffle_buffer': 16,
                                     'data.image_key': 'photo'})
  photos = len(sources.EMBEDDED_FILES)
  assert pipeline.num_examples(config.data) == 2 * photos
  tfds_cfg = dict(config.data.to_dict(), name='imagenet2012')
  with tfds.testing.mock_data(num_examples=4):
    with pytest.raises((KeyError, ValueError), match='photo'):  # it is read
      next(pipeline.make_iterator(tfds_cfg, 4, seed=0))


def test_tfds_records_give_non_square_grayscale_batches():
  """(H, W) image_size and one channel through the TFDS record path: the
  batches and the zero image of an unusable record have the (H, W, 1)
  shape."""
  got, status = records.read_checked(
      tf.io.encode_png(np.zeros((40, 40, 3), np.uint8)),
      lambda im: augment.train_transform(im, augment.example_key(0, 0, 0),
                                         (32, 24), (0.5,), (0.5,)),
      (32, 24, 1), 1000)
  assert int(status) == records.TOO_LARGE and got.shape == (32, 24, 1)
  cfg = _data(name='imagenet2012', image_size=(32, 24), channels=1,
              mean=(0.5,), std=(0.25,), shuffle_buffer=8)
  with tfds.testing.mock_data(num_examples=8,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    for train in (True, False):
      batch = next(pipeline.make_iterator(cfg, 8, seed=0, train=train))
      assert batch['image'].shape == (8, 32, 24, 1)
