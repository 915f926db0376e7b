"""Reliability: kills, preemption, NaN, bad images, workdir safety, CLI."""
import contextlib
import json
import os
import struct
import subprocess
import sys
import zlib

import jax
import numpy as np
import pytest

from configs import pretrain
from mae_jax import checkpoint, failed_saves, trainer
from mae_jax.config_check import ConfigError
from mae_jax.monitor import NonFiniteError
from mae_jax.workdir import WorkdirLock, WorkdirLocked
from tests.test_train_loop import ROOT, _env, _train_cmd

HUGE = 20000  # pixels per side of the decompression-bomb PNG


def _png(path, width, height):
  """Valid 8-bit grayscale PNG of zeros, written without holding it."""
  def chunk(kind, data):
    body = kind + data
    return struct.pack('>I', len(data)) + body + struct.pack(
        '>I', zlib.crc32(body))
  z = zlib.compressobj(9)
  row = bytes(width + 1)
  idat = b''.join(z.compress(row) for _ in range(height)) + z.flush()
  with open(path, 'wb') as f:
    f.write(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack(
        '>IIBBBBB', width, height, 8, 0, 0, 0, 0)) + chunk(b'IDAT', idat)
            + chunk(b'IEND', b''))


def make_bad_folder(root):
  """DIR/train/a/ with good and bad files; returns (DIR, {name: kind})."""
  from PIL import Image
  d = os.path.join(root, 'train', 'a')
  os.makedirs(d, exist_ok=True)
  rgb = np.random.default_rng(0).integers(0, 255, (40, 50, 3), np.uint8)
  Image.fromarray(rgb).save(os.path.join(d, 'good.jpg'))
  data = open(os.path.join(d, 'good.jpg'), 'rb').read()
  open(os.path.join(d, 'truncated.jpg'), 'wb').write(data[:len(data) // 2])
  Image.fromarray(rgb).convert('CMYK').save(os.path.join(d, 'cmyk.jpg'))
  Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(
      os.path.join(d, 'gray16.png'))
  Image.fromarray(rgb[..., 1]).save(os.path.join(d, 'gray.jpg'))
  Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(
      os.path.join(d, 'rgba.png'))
  Image.fromarray(rgb[:1, :1]).save(os.path.join(d, 'pixel.png'))
  _png(os.path.join(d, 'huge.png'), HUGE, HUGE)
  with open(os.path.join(d, 'text.jpg'), 'w') as f:
    f.write('not an image\n')
  os.symlink(os.path.join(root, 'missing.jpg'), os.path.join(d, 'broken.jpg'))
  os.makedirs(os.path.join(d, 'directory.jpg'))
  kinds = {'good.jpg': 'RGB JPEG', 'truncated.jpg': 'truncated JPEG',
           'cmyk.jpg': 'CMYK JPEG', 'gray16.png': '16-bit grayscale PNG',
           'gray.jpg': 'grayscale JPEG', 'rgba.png': 'RGBA PNG',
           'pixel.png': '1x1 pixel', 'huge.png': f'{HUGE}x{HUGE} PNG',
           'text.jpg': 'text file named .jpg',
           'broken.jpg': 'unreadable (broken symlink)',
           'directory.jpg': 'unreadable (a directory)'}
  return root, kinds


SKIPPED = ('truncated.jpg', 'huge.png', 'text.jpg', 'broken.jpg',
           'directory.jpg')


@pytest.fixture(scope='module')
def bad_folder(tmp_path_factory):
  """make_bad_folder, made once (the huge PNG takes seconds)."""
  return make_bad_folder(str(tmp_path_factory.mktemp('bad') / 'data'))


def test_bad_images_are_converted_or_skipped_and_named(bad_folder, caplog):
  from mae_jax.data import pipeline, sources
  data_dir, kinds = bad_folder
  cfg = dict(name='folder', data_dir=data_dir, image_size=16)
  with caplog.at_level('WARNING'):
    n = pipeline.num_examples(cfg)
  assert n == len(kinds) - len(SKIPPED)
  for name in SKIPPED:
    assert name in caplog.text
  assert f'skipped {len(SKIPPED)} of {len(kinds)} image files' in caplog.text
  assert 'huge.png: too large' in caplog.text
  run = [next(pipeline.make_iterator(cfg, n, seed=0, start_step=s,
                                     with_index=True)) for s in (0, 1)]
  again = next(pipeline.make_iterator(cfg, n, seed=0, start_step=1,
                                      with_index=True))
  assert run[0]['image'].shape == (n, 16, 16, 3)
  assert np.isfinite(run[0]['image']).all()
  np.testing.assert_array_equal(run[1]['image'], again['image'])
  sources._folder_files.cache_clear()
  with pytest.raises(ValueError, match='broken.jpg: unusable image'):
    pipeline.num_examples(dict(cfg, on_error='fail'))


MOCK_ID = 'mock-train.tfrecord-00000-of-00001__{}'


def bad_records(data_dir, kinds):
  """The bytes of make_bad_folder's files as TFDS records (the unreadable
  ones as empty records)."""
  records = []
  for name in kinds:
    path = os.path.join(data_dir, 'train', 'a', name)
    records.append(open(path, 'rb').read() if os.path.isfile(path) else b'')
  return records


@contextlib.contextmanager
def mock_tfds_split(records):
  """tfds.testing.mock_data where every split holds `records` as 'image'
  bytes, label i and tfds_id MOCK_ID.format(i)."""
  import tensorflow as tf
  import tensorflow_datasets as tfds

  def as_dataset(self, split, **kwargs):
    del self, split, kwargs
    return tf.data.Dataset.from_tensor_slices({
        'image': records, 'label': np.arange(len(records)),
        'tfds_id': [MOCK_ID.format(i) for i in range(len(records))]})

  with tfds.testing.mock_data(as_dataset_fn=as_dataset):
    yield


TFDS_SKIPPED = {'truncated.jpg': 'does not decode (truncated or corrupt)',
                'huge.png': 'more than data.max_pixels=89478485 pixels',
                'text.jpg': 'not a BMP, GIF, JPEG, PNG, WebP or JPEG XL image',
                'broken.jpg': 'not a BMP', 'directory.jpg': 'not a BMP'}


def test_bad_tfds_records_are_converted_or_skipped_and_named(bad_folder,
                                                             caplog):
  import tensorflow as tf
  from mae_jax.data import pipeline
  kinds = bad_folder[1]
  records = bad_records(*bad_folder)
  names = list(kinds)
  bad = [names.index(n) for n in TFDS_SKIPPED]
  good = [i for i in range(len(names)) if i not in bad]
  uids = tf.strings.to_hash_bucket_fast(
      [MOCK_ID.format(i) for i in range(len(names))], 2**62).numpy()
  n = len(records)
  cfg = dict(name='imagenet2012', image_size=16, shuffle_buffer=4)
  with mock_tfds_split(records):
    # One batch holds the whole split: every record is read in every epoch.
    with caplog.at_level('WARNING'):
      it = pipeline.make_iterator(cfg, n, seed=0, with_index=True)
      run = [next(it), next(it)]
    for name, reason in TFDS_SKIPPED.items():  # named, with the reason
      assert (f'{MOCK_ID.format(names.index(name))} of imagenet2012 split '
              f"'train' (process 0): {reason}") in caplog.text, name
    assert f'{2 * len(bad)} skipped so far' in caplog.text
    for batch in run:  # bad slots hold copies of good examples
      assert batch['image'].shape == (n, 16, 16, 3)
      assert np.isfinite(batch['image']).all()
      assert set(batch['index']) == set(uids[good])
      assert set(batch['label']) == set(good)
    # Batches of 4 (2 per epoch, 8 of the 11 records): resuming mid-epoch
    # and at an epoch boundary gives the same batches.
    four = pipeline.make_iterator(cfg, 4, seed=1, with_index=True)
    whole = [next(four) for _ in range(4)]
    for start in (1, 2):  # mid-epoch, an epoch boundary
      again = pipeline.make_iterator(cfg, 4, seed=1, start_step=start,
                                     with_index=True)
      for a in whole[start:]:
        b = next(again)
        for k in a:
          np.testing.assert_array_equal(a[k], b[k])
    assert set(np.concatenate([b['index'] for b in whole])) <= set(uids[good])
    # Evaluation marks bad records invalid instead.
    evals = list(pipeline.make_iterator(cfg, n, seed=0, train=False))
    assert len(evals) == 1
    np.testing.assert_array_equal(np.flatnonzero(evals[0]['valid']), good)
    np.testing.assert_array_equal(evals[0]['label'][good], good)
    with pytest.raises(ValueError, match=r'TFDS record mock-train.tfrecord-'
                       r'00000-of-00001__\d+ of imagenet2012 .*: unusable '
                       r'image \((does not decode|more than|not a BMP)'):
      next(pipeline.make_iterator(dict(cfg, on_error='fail'), n, seed=0))
  with mock_tfds_split([b'', b'not an image']):
    with pytest.raises(ValueError, match='all 2 records of a batch'):
      next(pipeline.make_iterator(cfg, 2, seed=0))


def test_workdir_lock_refuses_a_second_run(tmp_path):
  with WorkdirLock(str(tmp_path)):
    with pytest.raises(WorkdirLocked, match=f'pid {os.getpid()}'):
      WorkdirLock(str(tmp_path))
    out = subprocess.run(_train_cmd(tmp_path), env=_env(), text=True,
                         capture_output=True, timeout=300)
  assert out.returncode == 2
  assert out.stderr.strip().splitlines()[-1].startswith(
      f'error: workdir {tmp_path} is in use by another run')
  WorkdirLock(str(tmp_path)).release()  # free again


@pytest.mark.parametrize('arg,message', [
    ('--config.nosuch=1', "--config.nosuch: unknown config field 'nosuch'"),
    ('--config.batch_size=abc', 'flag --config.batch_size=abc: invalid'),
    ('--config.data.on_error=maybe', "config.data.on_error='maybe'"),
])
def test_cli_mistakes_are_one_line(tmp_path, arg, message):
  out = subprocess.run(_train_cmd(tmp_path, arg), env=_env(), text=True,
                       capture_output=True, timeout=300)
  assert out.returncode == 2
  lines = [l for l in out.stderr.splitlines() if l.startswith('error: ')]
  assert len(lines) == 1 and message in lines[0], out.stderr[-2000:]
  assert 'Traceback' not in out.stderr


def _config(**fields):
  config = pretrain.get_config('tiny')
  config.update_from_flattened_dict({
      'batch_size': 8, 'total_steps': 6, 'warmup_steps': 2,
      'checkpoint_every_steps': 2, 'log_every_steps': 1,
      'figure_every_steps': 0, 'mesh': (1, 1), **fields})
  return config


def _poison(monkeypatch, at_batch):
  """Makes batch `at_batch` of every training iterator all NaN."""
  from mae_jax.data import pipeline
  real = pipeline.make_iterator

  def make_iterator(*args, start_step=0, **kwargs):
    it = real(*args, start_step=start_step, **kwargs)
    for i, batch in enumerate(it, start=start_step):
      if i == at_batch:
        batch = dict(batch, image=np.full_like(batch['image'], np.nan))
      yield batch
  monkeypatch.setattr(pipeline, 'make_iterator', make_iterator)


def test_nan_batch_stops_or_is_skipped(tmp_path, monkeypatch, capsys):
  _poison(monkeypatch, at_batch=3)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1),
                           ('data', 'fsdp'))
  with pytest.raises(NonFiniteError,
                     match='at update 3; the last good checkpoint is step 2'):
    trainer.train(_config(), str(tmp_path / 'stop'), mesh)
  assert sorted(os.listdir(tmp_path / 'stop' / 'checkpoints')) == ['2']

  state = trainer.train(_config(skip_nonfinite=True), str(tmp_path / 'skip'),
                        mesh)
  out = capsys.readouterr().out
  assert 'skipped update 3: non-finite loss=nan' in out
  assert '1 non-finite updates skipped' in out
  params = checkpoint.load(tmp_path / 'skip')[1]['params']
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state['params']))
  records = [json.loads(l) for l in open(tmp_path / 'skip' / 'metrics.jsonl')]
  assert records[-1]['skipped_total'] == 1

  # A checkpoint of another config is refused, naming the fields.
  other = _config(skip_nonfinite=True, **{'data.image_size': 32,
                                          'batch_size': 4})
  with pytest.raises(ConfigError, match=r'data.image_size=64 \(checkpoint\) '
                     r'!= 32 \(now\); batch_size=8'):
    trainer.train(other, str(tmp_path / 'skip'), mesh)


def test_nonfinite_micro_batch_drops_its_whole_accumulated_update():
  """accum_iter=2, skip_nonfinite: a NaN micro-batch (first or second of
  update 1) leaves the state exactly as if update 1 had not been run."""
  import optax
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1),
                           ('data', 'fsdp'))
  t = trainer.Trainer(_config(accum_iter=2, skip_nonfinite=True,
                              batch_size=4), '/nonexistent', mesh)
  t.model = t.model.clone(depth=1, decoder_depth=1)  # compiles faster
  t.setup(steps_per_epoch=10)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(3, 2, 4, 64, 64, 3)).astype(np.float32)
  abstract = t.abstract_state['params']  # random parameters: init_state
  params = jax.tree.map(                  # compiles slowly on CPU
      lambda x: rng.normal(0, 0.02, x.shape).astype(x.dtype), abstract)
  start = {'params': params, 'opt_state': jax.device_get(t.tx.init(params))}

  def run(updates):
    state = jax.device_put(start, t.state_shardings)
    skipped = []
    for step, micro in updates:
      state, metrics = t.run_update(state, list(micro), step)
      skipped.append(float(metrics['skipped']))
    return state, skipped

  expected, _ = run([(0, images[0]), (2, images[2])])  # update 1 left out
  for bad in (0, 1):
    poisoned = images.copy()
    poisoned[1, bad] = np.nan
    state, skipped = run(enumerate(poisoned))
    assert skipped == [0, 1, 0], (bad, skipped)
    opt = state['opt_state']
    assert isinstance(opt, optax.MultiStepsState)
    assert int(opt.mini_step) == 0 and int(opt.gradient_step) == 2
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state),
                 jax.device_get(expected))


@pytest.fixture
def small_disk(tmp_path):
  """A 40 MiB tmpfs (room for one tiny checkpoint, not two), else skip."""
  path = tmp_path / 'disk'
  path.mkdir()
  if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=40m', 'tmpfs',
                     str(path)], capture_output=True).returncode:
    pytest.skip('cannot mount a tmpfs here (needs root)')
  yield path
  subprocess.run(['umount', '-l', str(path)], check=False)


def test_full_disk_fails_the_save_and_keeps_older_checkpoints(small_disk):
  workdir = str(small_disk / 'w')
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1),
                           ('data', 'fsdp'))
  with pytest.raises(trainer.CheckpointSaveError) as e:
    trainer.train(_config(), workdir, mesh)
  message = str(e.value)
  assert 'saving checkpoint step 4' in message and '[2] are intact' in message
  assert '\n' not in message
  assert 'No space left on device' in message
  assert checkpoint.load(workdir)[0] is not None
  out = subprocess.run(  # the CLI reports it in one line, exit status 1
      [sys.executable, os.path.join(ROOT, 'train.py'), '--config',
       os.path.join(ROOT, 'configs/pretrain.py') + ':tiny', '--workdir',
       workdir, '--config.batch_size=8', '--config.total_steps=6',
       '--config.warmup_steps=2', '--config.mesh=(1,1)',
       '--config.checkpoint_every_steps=2', '--config.figure_every_steps=0'],
      env=_env(), text=True, capture_output=True, timeout=600)
  assert out.returncode == 1, out.stderr[-2000:]
  lines = out.stderr.strip().splitlines()
  assert lines[-1].startswith('error: saving checkpoint step 4'), lines[-5:]
  assert 'No space left on device' in lines[-1]
  assert 'Traceback' not in out.stderr, out.stderr[-3000:]


def test_monitor_close_on_a_full_disk_warns_once(tmp_path, capsys):
  """A TensorBoard flush failing at close (full disk) is one warning line,
  not an exception that would hide the run's own error, and tensorboardX's
  exit-time retry of the close does nothing."""
  import errno
  from mae_jax.monitor import Monitor
  monitor = Monitor(str(tmp_path), 10, _config())
  writers = list(monitor.tb.all_writers.values())
  originals = [writer.event_writer for writer in writers]
  full = OSError(errno.ENOSPC, 'No space left on device')

  def close():
    raise full
  monitor.tb.close = close
  monitor.close()  # does not raise
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and 'No space left on device' in err
  assert str(tmp_path) in err
  for writer, original in zip(writers, originals):
    assert writer.event_writer is not original  # the exit retry is a no-op
    writer.event_writer.close()  # what the atexit cleanup calls


def test_writes_finishing_after_their_event_loop_closed_are_silent(
    monkeypatch):
  """The `Event loop is closed` report of a tensorstore write that finishes
  after orbax closed its loop (a failed save) is dropped; other unraisable
  exceptions still reach the previous hook."""
  import asyncio
  import tensorstore as ts
  seen = []
  monkeypatch.setattr(sys, 'unraisablehook', seen.append)
  failed_saves.drop_closed_loop_callbacks()
  promise, future = ts.Promise.new()  # a write in flight ...
  loop = asyncio.new_event_loop()
  loop.set_exception_handler(lambda *_: None)  # its task stays pending

  async def wait_for_write():
    asyncio.ensure_future(future)
    await asyncio.sleep(0)
  loop.run_until_complete(wait_for_write())
  loop.close()  # ... when its loop is closed
  promise.set_result(None)  # reports through sys.unraisablehook
  assert sys.unraisablehook.dropped == 1 and not seen

  class Boom:
    def __del__(self):
      raise ValueError('boom')
  Boom()
  assert [type(u.exc_value) for u in seen] == [ValueError]


def test_fault_matrix_ci(tmp_path):
  """benchmarks/fault_matrix.py in its CI size: 3 kills (one at each kind
  of event), 1 SIGTERM."""
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'benchmarks', 'fault_matrix.py'),
       '--trials', '3', '--sigterm', '1', '--no-bad-images', '--out',
       str(tmp_path / 'r.md')], env=_env(), text=True, capture_output=True,
      timeout=900)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  doc = (tmp_path / 'r.md').read_text()
  assert doc.count('| ok |') == 4 and 'FAIL' not in doc
