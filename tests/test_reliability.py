"""Reliability: bad images, CLI mistakes, a non-finite micro-batch, failing
writes, and the fault matrix (tests/test_faults_every_task.py has the faults
of every training task: kills, preemption, NaN, a full disk, a busy
workdir, a changed config)."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mae_jax import schema
from mae_jax.train import failure_reports, sharding
from mae_jax.train.pretrain import PretrainTask
from tests.helpers import (MOCK_ID, ROOT, bad_records, cpu_env,
                           make_bad_folder, mock_tfds_split,
                           tiny_pretrain_config, train_command)

pytestmark = pytest.mark.long

def data_config(**fields):
  """The pretraining data config (every field at its default) as a dict,
  with `fields` changed."""
  return dict(schema.config('pretrain').data.to_dict(), **fields)


SKIPPED = ('truncated.jpg', 'huge.png', 'text.jpg', 'broken.jpg',
           'directory.jpg')


@pytest.fixture(scope='module')
def bad_folder(tmp_path_factory):
  """make_bad_folder, made once (the huge PNG takes seconds)."""
  return make_bad_folder(str(tmp_path_factory.mktemp('bad') / 'data'))


def test_bad_images_are_converted_or_skipped_and_named(bad_folder, caplog):
  from mae_jax.data import pipeline, sources
  data_dir, kinds = bad_folder
  cfg = data_config(name='folder', data_dir=data_dir, image_size=16)
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
  cfg = data_config(name='imagenet2012', image_size=16, shuffle_buffer=4)
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


@pytest.mark.parametrize('arg,message', [
    ('--config.nosuch=1', "--config.nosuch: unknown config field 'nosuch'"),
    ('--config.batch_size=abc', 'flag --config.batch_size=abc: invalid'),
    ('--config.data.on_error=maybe', "config.data.on_error='maybe'"),
])
def test_cli_mistakes_are_one_line(tmp_path, arg, message):
  out = subprocess.run(train_command(tmp_path, arg), env=cpu_env(), text=True,
                       capture_output=True, timeout=300)
  assert out.returncode == 2
  lines = [l for l in out.stderr.splitlines() if l.startswith('error: ')]
  assert len(lines) == 1 and message in lines[0], out.stderr[-2000:]
  assert 'Traceback' not in out.stderr


def test_nonfinite_micro_batch_drops_its_whole_accumulated_update():
  """accum_iter=2, skip_nonfinite: a NaN micro-batch (first or second of
  update 1) leaves the state exactly as if update 1 had not been run."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1),
                           ('data', 'fsdp'))
  task = PretrainTask(tiny_pretrain_config(accum_iter=2, skip_nonfinite=True,
                                           batch_size=4), mesh)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(3, 2, 4, 64, 64, 3)).astype(np.float32)
  start = jax.device_get(task.init_state())

  def run(updates):
    state = jax.device_put(start, task.shardings)
    skipped = []
    for step, micro in updates:
      batch = sharding.global_batch(mesh, {'image': micro}, stacked=True)
      state, metrics = task.update(state, batch, jnp.int32(step))
      skipped.append(float(metrics['skipped']))
    return jax.device_get(state), skipped

  expected, _ = run([(0, images[0]), (2, images[2])])  # update 1 left out
  for bad in (0, 1):
    poisoned = images.copy()
    poisoned[1, bad] = np.nan
    state, skipped = run(enumerate(poisoned))
    assert skipped == [0, 1, 0], (bad, skipped)
    jax.tree.map(np.testing.assert_array_equal, state, expected)


def test_monitor_close_on_a_full_disk_warns_once(tmp_path, capsys):
  """A TensorBoard flush failing at close (full disk) is one warning line,
  not an exception that would hide the run's own error, and tensorboardX's
  exit-time retry of the close does nothing."""
  import errno
  from mae_jax.train.monitor import Monitor
  monitor = Monitor(str(tmp_path), 10, tiny_pretrain_config())
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
    original.close()  # the real writer's thread, left open by the fake close


def test_writes_finishing_after_their_event_loop_closed_are_silent(
    monkeypatch):
  """The `Event loop is closed` report of a tensorstore write that finishes
  after orbax closed its loop (a failed save) is dropped; other unraisable
  exceptions still reach the previous hook."""
  seen = []
  monkeypatch.setattr(sys, 'unraisablehook', seen.append)
  remove = failure_reports.install()
  try:
    _report_a_write_finishing_after_its_loop_closed(seen)
  finally:
    remove()


def _report_a_write_finishing_after_its_loop_closed(seen):
  """Checks, with the filters installed, that a write finishing after its
  loop closed is dropped and that another unraisable reaches `seen`."""
  import asyncio
  import tensorstore as ts
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
       str(tmp_path / 'r.md')], env=cpu_env(), text=True, capture_output=True,
      timeout=900)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  doc = (tmp_path / 'r.md').read_text()
  assert doc.count('| ok |') == 4 and 'FAIL' not in doc
