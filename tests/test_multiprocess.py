"""Two processes x 4 CPU devices (jax.distributed, gloo) equal one process
with 8 devices."""
import os
import socket
import subprocess

import jax
import numpy as np

from tests.test_train_loop import _env, _params, _train_cmd

THREE = ['--config.total_steps=3', '--config.checkpoint_every_steps=3',
         '--config.figure_every_steps=0', '--config.mesh=(2,4)']


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_match_single_process(tmp_path):
  single, multi = tmp_path / 'single', tmp_path / 'multi'
  out = subprocess.run(_train_cmd(single, *THREE), env=_env(8),
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  port = _free_port()
  procs = [subprocess.Popen(
      _train_cmd(multi, *THREE, f'--coordinator_address=127.0.0.1:{port}',
                 '--num_processes=2', f'--process_id={i}'),
      env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
               _params(multi), _params(single))
