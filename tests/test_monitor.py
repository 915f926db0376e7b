"""Monitor: interval means, throughput without compile time, strict JSON,
restarts without duplicate records, TensorBoard images and config, a
writer that does not import torch."""
import glob
import json
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import pretrain
from mae_jax.train import monitor as monitor_lib
from mae_jax.train import sharding
from mae_jax.train.monitor import Monitor
from tests.helpers import ROOT, cpu_env


class Clock:
  def __init__(self):
    self.now = 1000.0

  def __call__(self):
    return self.now


@pytest.fixture
def clock(monkeypatch):
  c = Clock()
  monkeypatch.setattr(monitor_lib.time, 'time', c)
  return c


def _config():
  config = pretrain.get_config('tiny')
  config.batch_size = 8
  return config


def _metrics(loss, grad_norm=1.0, lr=0.1):
  return {'loss': jnp.float32(loss), 'grad_norm': jnp.float32(grad_norm),
          'lr': jnp.float32(lr)}


def _records(workdir):
  def no_constants(name):
    raise AssertionError(f'{name} is not JSON')
  with open(workdir / 'metrics.jsonl') as f:
    return [json.loads(line, parse_constant=no_constants) for line in f]


def test_logged_loss_is_the_mean_over_the_log_interval(tmp_path, clock):
  m = Monitor(tmp_path, 10, _config())
  for i, loss in enumerate([1.0, 2.0, 6.0]):
    m.add(_metrics(loss, grad_norm=loss * 10, lr=0.1 * (i + 1)))
  record = m.log(3)
  assert record['loss'] == pytest.approx(3.0)
  assert record['grad_norm'] == pytest.approx(30.0)
  assert record['lr'] == pytest.approx(0.3)  # the latest, not a mean
  m.add(_metrics(5.0))
  assert m.log(4)['loss'] == pytest.approx(5.0)  # the sums start again
  m.close()
  assert [r['loss'] for r in _records(tmp_path)] == pytest.approx([3.0, 5.0])


def test_rate_and_eta_exclude_compiling_restored_steps_and_figures(
    tmp_path, clock, capsys):
  m = Monitor(tmp_path, 100, _config(), start_step=40)  # resumed at 40
  clock.now += 300.0  # the first update: compiling
  m.add(_metrics(1.0))
  m.started(41)
  first = m.log(41)
  line = capsys.readouterr().out
  assert 'img_per_s' not in first and 'nan' not in line.lower()
  for step in range(42, 51):  # 9 updates, 2 s each
    clock.now += 2.0
    m.add(_metrics(1.0))
    if step == 45:
      with m.paused():  # a figure or an evaluation
        clock.now += 60.0
  record = m.log(50)
  line = capsys.readouterr().out
  assert record['img_per_s'] == pytest.approx(8 / 2.0)
  assert '4.0 img/s' in line
  # 50 updates left at 0.5 updates/s: 100 s; elapsed counts from update 41.
  assert '00:18<01:40' in line, line
  m.close()


def test_metrics_are_strict_json_and_a_restart_drops_later_records(
    tmp_path, clock):
  m = Monitor(tmp_path, 10, _config())
  for step in range(1, 5):
    m.add(_metrics(float('nan') if step == 3 else 1.0))
    m.log(step)
  m.log_eval(4, {'top1': 50.0, 'top5': 90.0, 'count': 4}, 'top-1 50.00%')
  m.close()
  records = _records(tmp_path)
  assert records[2]['loss'] is None
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 5, "lo')  # a line cut by a kill
  Monitor(tmp_path, 10, _config(), start_step=2).close()  # resumed at 2
  assert [r['step'] for r in _records(tmp_path)] == [1, 2]


def _events(workdir):
  """Event protos of the TensorBoard files under WORKDIR/tb."""
  from tensorboardX.proto import event_pb2
  events = []
  for path in glob.glob(str(workdir / 'tb' / 'events.*')):
    data = open(path, 'rb').read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack('<Q', data[pos:pos + 8])
      event = event_pb2.Event()
      event.ParseFromString(data[pos + 12:pos + 12 + length])
      events.append(event)
      pos += 12 + length + 4
  return events


def test_tensorboard_gets_the_figure_as_an_image_and_the_config(tmp_path):
  config = _config()
  m = Monitor(tmp_path, 10, config)
  rng = np.random.default_rng(0)
  imgs = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)
  pred = rng.normal(size=(2, 4, 8 * 8 * 3)).astype(np.float32)
  mask = np.array([[1, 0, 1, 0], [0, 1, 0, 1]], np.float32)
  path = m.figure(7, imgs, pred, mask, 8, False)
  m.close()
  assert path.exists()
  values = [(e.step, v) for e in _events(tmp_path) for v in e.summary.value]
  images = [(s, v) for s, v in values if v.HasField('image')]
  assert [(s, v.tag) for s, v in images] == [(7, 'reconstruction')]
  assert images[0][1].image.encoded_image_string.startswith(b'\x89PNG')
  texts = [v for _, v in values if v.tag.startswith('config')]
  assert texts and config.model in texts[0].tensor.string_val[0].decode()


def test_mesh_prints_as_axis_sizes():
  mesh = sharding.make_mesh((1, 2), jax.devices()[:2])
  assert monitor_lib.mesh_text(mesh) == 'data=1 fsdp=2'


def test_tensorboard_writer_leaves_torch_unimported_and_importable(tmp_path):
  """tensorboardX imports torch when it is installed (seconds of every
  run's start-up); the monitor's writer does not, and torch imports
  normally afterwards."""
  script = f"""
import sys
from configs import pretrain
from mae_jax.train.monitor import Monitor
config = pretrain.get_config('tiny')
m = Monitor({str(tmp_path)!r}, 10, config)
m.close()
assert 'tensorboardX' in sys.modules
assert 'torch' not in sys.modules, 'torch was imported'
import torch
print(torch.tensor([1.0]).sum().item())
"""
  out = subprocess.run([sys.executable, '-c', script], cwd=ROOT,
                       env=cpu_env(), capture_output=True, text=True,
                       timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.split() == ['1.0']
