"""End-to-end pretraining runs of the `tiny` config through train.py."""
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import pretrain
from mae_jax import checkpoint, sharding, trainer
from mae_jax.config_check import ConfigError

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


@pytest.mark.parametrize('field,value,message', [
    ('data.image_size', 60, 'config.data.image_size=60'),
    ('mask_ratio', 1.0, 'config.mask_ratio=1.0'),
    ('mask_ratio', 0.0, 'config.mask_ratio=0.0'),
    ('batch_size', 7, 'config.batch_size=7'),
    ('model', 'mae_vit_small', "config.model='mae_vit_small'"),
    ('data.name', 'folder', 'config.data.data_dir is required'),
    ('data.name', 'no_such_dataset', 'config.data.data_dir is required'),
])
def test_bad_config_is_rejected_naming_the_field(field, value, message):
  config = pretrain.get_config('tiny')
  config.update_from_flattened_dict({field: value})
  with pytest.raises(ConfigError, match=re.escape(message)):
    trainer.Trainer(config, '/nonexistent',
                    sharding.make_mesh((-1, 1), jax.devices()[:8]))


def test_unknown_tfds_name_is_named(tmp_path):
  config = pretrain.get_config('tiny')
  config.update_from_flattened_dict({'data.name': 'no_such_dataset',
                                     'data.data_dir': str(tmp_path)})
  with pytest.raises(ValueError, match='no_such_dataset'):
    trainer.train(config, str(tmp_path / 'w'))


def test_cli_prints_one_line_error_without_traceback(tmp_path):
  out = subprocess.run(_train_cmd(tmp_path / 'w', '--config.mask_ratio=1.5'),
                       env=_env(8), capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 2, out.stderr[-2000:]
  assert 'config.mask_ratio=1.5 must lie in the open interval (0, 1)' in (
      out.stderr)
  assert 'Traceback' not in out.stderr
