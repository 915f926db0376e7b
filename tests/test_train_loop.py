"""End-to-end pretraining runs of the `tiny` config through train.py."""
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mae_jax import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ['--config.batch_size=8', '--config.total_steps=12',
         '--config.warmup_steps=2', '--config.checkpoint_every_steps=3',
         '--config.log_every_steps=3', '--config.figure_every_steps=6',
         '--config.keep_checkpoints=10']


def _env(devices=1):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  return env


def _train_cmd(workdir, *extra):
  return [sys.executable, os.path.join(ROOT, 'train.py'),
          '--config', os.path.join(ROOT, 'configs/pretrain.py') + ':tiny',
          '--workdir', str(workdir), *SMALL, *extra]


def _params(workdir):
  return checkpoint.load(workdir)[1]['params']


def _steps(workdir):
  root = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(root):
    return []
  return sorted(int(d) for d in os.listdir(root) if d.isdigit())


def test_killed_run_resumes_to_bitwise_equal_parameters(tmp_path):
  full, killed = tmp_path / 'full', tmp_path / 'killed'
  out = subprocess.run(_train_cmd(full), env=_env(), capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'loss' in out.stdout and (full / 'metrics.jsonl').exists()
  assert (full / 'figures' / 'step_0000012.png').exists()

  proc = subprocess.Popen(_train_cmd(killed), env=_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.time() + 600
  while len(_steps(killed)) < 2 and proc.poll() is None:
    assert time.time() < deadline
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  reached = _steps(killed)
  assert 2 <= len(reached) and reached[-1] < 12, reached
  out = subprocess.run(_train_cmd(killed), env=_env(), capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f'resuming at step {reached[-1]}' in out.stdout
  jax.tree.map(np.testing.assert_array_equal, _params(killed), _params(full))


@pytest.mark.parametrize('override,message', [
    ('--config.data.image_size=60', 'config.data.image_size=60'),
    ('--config.mask_ratio=1.0', 'config.mask_ratio=1.0'),
    ('--config.batch_size=7', 'config.batch_size=7'),
    ('--config.model=mae_vit_small', "config.model='mae_vit_small'"),
    ('--config.data.name=folder', 'config.data.data_dir is required'),
    ('--config.data.name=no_such_dataset', 'config.data.data_dir is required'),
])
def test_bad_config_stops_before_compiling_with_one_line(tmp_path, override,
                                                         message):
  out = subprocess.run(_train_cmd(tmp_path / 'w', override), env=_env(8),
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 2, out.stderr[-2000:]
  assert message in out.stderr
  assert 'Traceback' not in out.stderr
