"""Reliability: kills, preemption, NaN, bad images, workdir safety, CLI."""
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
from mae_jax import checkpoint, trainer
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


def test_bad_images_are_converted_or_skipped_and_named(tmp_path, caplog):
  from mae_jax.data import pipeline, sources
  data_dir, kinds = make_bad_folder(str(tmp_path / 'data'))
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
  assert 'error: saving checkpoint step' in out.stderr


def test_fault_matrix_ci(tmp_path):
  """benchmarks/fault_matrix.py in its CI size: 5 kills, 1 SIGTERM."""
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'benchmarks', 'fault_matrix.py'),
       '--trials', '5', '--sigterm', '1', '--no-bad-images', '--out',
       str(tmp_path / 'r.md')], env=_env(), text=True, capture_output=True,
      timeout=900)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  doc = (tmp_path / 'r.md').read_text()
  assert doc.count('| ok |') == 6 and 'FAIL' not in doc
