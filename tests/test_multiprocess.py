"""Two processes x 4 CPU devices (jax.distributed, gloo) equal one process
with 8 devices, also across a preemption that only one process sees."""
import os
import re
import signal
import socket
import subprocess
import time

import jax
import numpy as np
import pytest

from tests.helpers import (checkpoint_steps, cpu_env, final_params,
                           train_command)

pytestmark = pytest.mark.long

THREE = ['--config.total_steps=3', '--config.checkpoint_every_steps=3',
         '--config.figure_every_steps=0', '--config.mesh=(2,4)']
PREEMPTED = re.compile(r'process (\d) of 2: preempted, saved step (\d+)')


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _launch(workdir, logs, cache):
  """Both processes of a run; stdout and stderr go to logs/{out,err}{i}.
  `cache`: JAX's persistent compilation cache, so a restart does not
  compile again."""
  os.makedirs(logs)
  port = _free_port()
  env = dict(cpu_env(4), JAX_COMPILATION_CACHE_DIR=str(cache),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  return [subprocess.Popen(
      train_command(workdir, *THREE,
                    f'--coordinator_address=127.0.0.1:{port}',
                    '--num_processes=2', f'--process_id={i}'),
      env=env, stdout=open(os.path.join(logs, f'out{i}'), 'w'),
      stderr=open(os.path.join(logs, f'err{i}'), 'w')) for i in range(2)]


def _finish(procs, logs):
  """(stdout, stderr) texts per process; each must have exited 0."""
  texts = []
  for i, p in enumerate(procs):
    p.wait(timeout=600)
    texts.append(tuple(open(os.path.join(logs, f'{k}{i}')).read()
                       for k in ('out', 'err')))
    assert p.returncode == 0, texts[-1][1][-3000:]
  return texts


def test_two_processes_match_single_process_across_a_preemption(tmp_path):
  """SIGTERM to process 1 alone: JAX's preemption sync makes both processes
  save the same step and exit 0; the restart resumes there and ends equal
  to an uninterrupted single-process run."""
  single, multi = tmp_path / 'single', tmp_path / 'multi'
  out = subprocess.run(train_command(single, *THREE), env=cpu_env(8),
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]

  logs = str(tmp_path / 'first')
  procs = _launch(multi, logs, tmp_path / 'cache')
  deadline = time.time() + 600  # process 0 prints this once both are up
  while 'starting step 0/3' not in open(os.path.join(logs, 'out0')).read():
    assert procs[0].poll() is None and time.time() < deadline
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGTERM)
  texts = _finish(procs, logs)
  saved = sorted(PREEMPTED.findall(texts[0][1] + texts[1][1]))
  assert [p for p, _ in saved] == ['0', '1'], saved
  step = int(saved[0][1])
  assert saved[1][1] == saved[0][1] and 1 <= step < 3, saved
  assert f'preempted (SIGTERM): saved step {step}/3' in texts[0][0]
  assert checkpoint_steps(multi) == [step]

  logs = str(tmp_path / 'second')
  texts = _finish(_launch(multi, logs, tmp_path / 'cache'), logs)
  assert f'resuming at step {step}/3' in texts[0][0]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
               final_params(multi), final_params(single))
