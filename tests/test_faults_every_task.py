"""The fault guarantees of every training task (pretraining, fine-tuning,
linear probing, pose estimation), through `train.py` as a user runs it: SIGKILL and SIGTERM
resume to the uninterrupted state, a non-finite loss stops or is skipped, a
full disk, a changed config and a busy workdir each stop in one line, and
`mae_jax.load` reads every task's workdir.

A task's runs share a JAX compilation cache: the uninterrupted run goes
first and fills it, the others then go two at a time; the tests check what
each run showed."""
import concurrent.futures
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import mae_jax
from mae_jax.train.workdir import WorkdirLock, WorkdirLocked
from tests.helpers import ROOT, checkpoint_steps, cpu_env

pytestmark = pytest.mark.long

TASKS = ('pretrain', 'finetune', 'linprobe', 'pose')
TOTAL = 6  # updates; a checkpoint every 2
TINY = [f'--config.total_steps={TOTAL}', '--config.warmup_steps=2',
        '--config.checkpoint_every_steps=2', '--config.batch_size=8',
        '--config.log_every_steps=1', '--config.data.image_size=32']
PER_TASK = {'pretrain': ['--config.figure_every_steps=0'],
            'finetune': [f'--config.eval_every_steps={TOTAL}'],
            'linprobe': [f'--config.eval_every_steps={TOTAL}'],
            'pose': [f'--config.eval_every_steps={TOTAL}',
                     '--config.figure_every_steps=0']}
STARTED = re.compile(r'(?:starting|resuming at) step (\d+)/')
PREEMPTED = re.compile(r'preempted \(SIGTERM\): saved step (\d+)/')
# train.py with batch 3 of every training iterator all NaN: sys.argv[1:]
# is train.py's command line.
POISON_BATCH_3 = f"""
import runpy, sys
import numpy as np
sys.path.insert(0, {ROOT!r})
from mae_jax.data import pipeline
from mae_jax.pose import data as pose_data
def nan_at_3(batches, start):
  for i, batch in enumerate(batches, start=start):
    if i == 3:
      batch = dict(batch, image=np.full_like(batch['image'], np.nan))
    yield batch
real = pipeline.make_iterator
def make_iterator(*args, start_step=0, train=True, **kwargs):
  it = real(*args, start_step=start_step, train=train, **kwargs)
  return nan_at_3(it, start_step) if train else it
pipeline.make_iterator = make_iterator
real_pose = pose_data.train_batches
def pose_batches(*args):  # (..., start_micro, process_index, process_count)
  return nan_at_3(real_pose(*args), args[7])
pose_data.train_batches = pose_batches
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


@pytest.fixture(scope='module', params=TASKS)
def task(request):
  """The task every test of this module is run for."""
  return request.param


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  """A one-device CPU environment with a compilation cache shared by all
  runs of this module."""
  cache = tmp_path_factory.mktemp('jax_cache')
  return cpu_env(JAX_COMPILATION_CACHE_DIR=str(cache),
                 JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
                 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')


def command(task, workdir, *overrides):
  """`python train.py --config configs/TASK.py:tiny --workdir WORKDIR` with
  the TINY overrides, then `overrides`."""
  return [os.path.join(ROOT, 'train.py'), '--config',
          os.path.join(ROOT, 'configs', f'{task}.py') + ':tiny', '--workdir',
          str(workdir), *TINY, *PER_TASK[task], *overrides]


def run(args, env):
  """Runs `python ARGS` to the end; returns the CompletedProcess."""
  return subprocess.run([sys.executable, *args], env=env, text=True,
                        capture_output=True, timeout=600, check=False)


class Background:
  """`python ARGS` running, its stdout and stderr collected by a thread."""

  def __init__(self, args, env):
    self.proc = subprocess.Popen([sys.executable, *args], env=env,
                                 stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
    self.lines = []
    self.reader = threading.Thread(target=self._read, daemon=True)
    self.reader.start()

  def _read(self):
    for line in self.proc.stdout:
      self.lines.append(line)

  def wait_for(self, predicate, timeout=600):
    """Polls `predicate` every 10 ms; False if the process ended first."""
    deadline = time.time() + timeout
    while not predicate():
      if self.proc.poll() is not None or time.time() > deadline:
        return False
      time.sleep(0.01)
    return True

  def started_at(self):
    """The step the run said it starts or resumes at, or None."""
    found = STARTED.search(''.join(self.lines))
    return int(found.group(1)) if found else None

  def finish(self):
    """Waits for the end; returns (exit status, the whole output)."""
    self.proc.wait(timeout=600)
    self.reader.join(timeout=30)
    return self.proc.returncode, ''.join(self.lines)


def error_lines(stderr):
  return [l for l in stderr.splitlines() if l.startswith('error:')]


def metrics_steps(workdir):
  """The steps of the records of WORKDIR/metrics.jsonl."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(l)['step'] for l in f if l.strip()]


def saved_state(workdir, step):
  """Every array item (params, opt_state, ...) of checkpoint `step`, as
  NumPy arrays, read with orbax."""
  directory = os.path.join(workdir, 'checkpoints', str(step))
  state = {}
  for item in sorted(os.listdir(directory)):
    if os.path.exists(os.path.join(directory, item, '_METADATA')):
      with warnings.catch_warnings():  # sharding read from the checkpoint
        warnings.simplefilter('ignore', UserWarning)
        tree = ocp.PyTreeCheckpointer().restore(
            os.path.join(directory, item))
      state[item] = jax.tree.map(np.asarray, tree)
  return state


def assert_bitwise_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def interrupted_runs(task, workdir, env):
  """The task's command run three times on one workdir: SIGTERM as soon as
  the first run has started, SIGKILL as soon as the second has written a
  new checkpoint, then to the end. Returns what each run showed."""
  seen = {'workdir': workdir}
  first = Background(command(task, workdir), env)
  seen['first_started'] = first.wait_for(
      lambda: first.started_at() is not None)
  first.proc.send_signal(signal.SIGTERM)
  seen['first_rc'], seen['first_out'] = first.finish()
  seen['after_sigterm'] = checkpoint_steps(workdir)
  seen['metrics_after_sigterm'] = (
      metrics_steps(workdir) if (workdir / 'metrics.jsonl').exists() else [])

  second = Background(command(task, workdir), env)
  before = set(checkpoint_steps(workdir))
  seen['killed'] = second.wait_for(
      lambda: set(checkpoint_steps(workdir)) - before)
  second.proc.send_signal(signal.SIGKILL)
  seen['second_rc'], seen['second_out'] = second.finish()
  seen['second_started_at'] = second.started_at()
  seen['at_kill'] = checkpoint_steps(workdir)

  third = Background(command(task, workdir), env)
  seen['third_rc'], seen['third_out'] = third.finish()
  seen['third_started_at'] = third.started_at()
  return seen


def nonfinite_runs(task, root, env):
  """The command with batch 3 all NaN, as is and with skip_nonfinite:
  {'stop' | 'skip': (workdir, CompletedProcess)}."""
  stop, skip = root / 'stop', root / 'skip'
  return {
      'stop': (stop, run(['-c', POISON_BATCH_3, *command(task, stop)], env)),
      'skip': (skip, run(['-c', POISON_BATCH_3, *command(
          task, skip, '--config.skip_nonfinite=True')], env))}


def full_disk_run(task, disk, reference, env):
  """The command on a tmpfs `disk` with room for one checkpoint of the
  `reference` workdir (its step 2) and the logs, not for two: (workdir,
  CompletedProcess), or None where no tmpfs can be mounted."""
  directory = reference / 'checkpoints' / '2'
  size = sum(f.stat().st_size for f in directory.rglob('*') if f.is_file())
  kib = (size * 3 // 2 + (1 << 20)) // 1024
  if subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={kib}k', 'tmpfs',
                     str(disk)], capture_output=True).returncode:
    return None
  return disk / 'w', run(command(task, disk / 'w'), env)


@pytest.fixture(scope='module')
def runs(task, env, tmp_path_factory):
  """The task's runs: 'reference' (an uninterrupted run: (workdir,
  CompletedProcess)) first and alone, so that it fills the compilation
  cache and no later run compiles the task's programs again; then
  'interrupted', 'nonfinite' and 'full_disk' (see the functions above), two
  at a time (each mostly waits on one core), as futures."""
  root = tmp_path_factory.mktemp(task)
  disk = root / 'disk'
  disk.mkdir()
  reference = root / 'reference'
  results = {'reference': (reference, run(command(task, reference), env))}
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    results['interrupted'] = pool.submit(interrupted_runs, task,
                                         root / 'interrupted', env)
    results['nonfinite'] = pool.submit(nonfinite_runs, task, root, env)
    results['full_disk'] = pool.submit(full_disk_run, task, disk,
                                       reference, env)
  try:
    yield results
  finally:
    subprocess.run(['umount', '-l', str(disk)], capture_output=True,
                   check=False)
    shutil.rmtree(root, ignore_errors=True)  # ~250 MB of checkpoints


@pytest.fixture
def reference(runs):
  """The workdir of the task's uninterrupted run."""
  workdir, out = runs['reference']
  assert out.returncode == 0, out.stderr[-3000:]
  return workdir


def test_sigterm_saves_the_step_it_reached_and_exits_0(runs):
  """SIGTERM during the first update: the run saves the step it reached
  (exactly one `preempted` line naming it), trains no further and exits 0;
  the next run resumes there."""
  seen = runs['interrupted'].result()
  assert seen['first_started'], seen['first_out'][-3000:]
  assert seen['first_rc'] == 0, seen['first_out'][-3000:]
  saved = PREEMPTED.findall(seen['first_out'])
  assert len(saved) == 1, seen['first_out'][-3000:]
  step = int(saved[0])
  assert 1 <= step < TOTAL, step
  assert seen['after_sigterm'][-1] == step, seen['after_sigterm']
  assert max(seen['metrics_after_sigterm']) == step
  assert seen['second_started_at'] == step, seen['second_out'][-3000:]


def test_sigkill_after_a_checkpoint_resumes_to_the_uninterrupted_state(
    runs, reference):
  """SIGKILL right after a checkpoint appears: the same command resumes
  from the newest complete checkpoint and ends with parameters (as
  `mae_jax.load` reads them) and every saved array (optimizer state
  included) bitwise equal to an uninterrupted run's."""
  seen = runs['interrupted'].result()
  assert seen['killed'], seen['second_out'][-3000:]
  assert seen['second_rc'] == -signal.SIGKILL
  newest = seen['at_kill'][-1]
  assert newest < TOTAL, seen['at_kill']
  assert seen['third_rc'] == 0, seen['third_out'][-3000:]
  assert seen['third_started_at'] == newest, seen['third_out'][-3000:]
  workdir = seen['workdir']
  assert checkpoint_steps(workdir)[-1] == TOTAL
  assert_bitwise_equal(mae_jax.load(workdir)[1]['params'],
                       mae_jax.load(reference)[1]['params'])
  assert_bitwise_equal(saved_state(workdir, TOTAL),
                       saved_state(reference, TOTAL))


def test_nonfinite_loss_stops_naming_the_update(runs):
  """An all-NaN batch at update 3 stops the run: exit 1, one `error:` line
  naming update 3 and checkpoint 2, which is kept; no traceback."""
  workdir, out = runs['nonfinite'].result()['stop']
  assert out.returncode == 1, out.stderr[-3000:]
  errors = error_lines(out.stderr)
  assert len(errors) == 1, out.stderr[-3000:]
  assert ('at update 3; the last good checkpoint is step 2' in errors[0]
          and 'non-finite' in errors[0]), errors[0]
  assert 'Traceback' not in out.stderr, out.stderr[-3000:]
  assert checkpoint_steps(workdir) == [2]


def test_nonfinite_loss_is_skipped_with_skip_nonfinite(runs):
  """With --config.skip_nonfinite=True the NaN update 3 is skipped and
  counted, and the run ends with finite parameters."""
  workdir, out = runs['nonfinite'].result()['skip']
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'skipped update 3: non-finite loss=nan' in out.stdout
  with open(workdir / 'metrics.jsonl') as f:
    updates = [r for r in map(json.loads, f) if 'eval' not in r]
  assert updates[-1]['step'] == TOTAL and updates[-1]['skipped_total'] == 1
  params = mae_jax.load(workdir)[1]['params']
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_full_disk_stops_in_one_line_and_keeps_older_checkpoints(runs):
  """Checkpoint 4 does not fit: exit 1, one `error:` line naming the step,
  the cause and the intact older checkpoint, no traceback; step 2 still
  loads."""
  if runs['full_disk'].result() is None:
    pytest.skip('cannot mount a tmpfs here (needs root)')
  workdir, out = runs['full_disk'].result()
  assert out.returncode == 1, out.stderr[-3000:]
  errors = error_lines(out.stderr)
  assert len(errors) == 1, out.stderr[-3000:]
  assert errors[0].startswith('error: saving checkpoint step 4'), errors
  assert 'No space left on device' in errors[0], errors
  assert '[2] are intact' in errors[0], errors
  assert 'Traceback' not in out.stderr, out.stderr[-3000:]
  assert checkpoint_steps(workdir) == [2]
  model, variables = mae_jax.load(workdir)
  assert model is not None and jax.tree.leaves(variables['params'])


def test_resume_refuses_a_changed_config_in_one_line(task, env, reference,
                                                     tmp_path):
  """A finished workdir rerun with another base learning rate: exit 2, one
  `error:` line naming blr with both values; nothing is written."""
  workdir = tmp_path / 'w'
  shutil.copytree(reference, workdir)
  before = sorted(p.name for p in workdir.rglob('*'))
  out = run(command(task, workdir, '--config.blr=0.125'), env)
  assert out.returncode == 2, out.stderr[-3000:]
  errors = error_lines(out.stderr)
  assert len(errors) == 1, out.stderr[-3000:]
  assert errors[0].startswith('error: checkpoint'), errors
  assert re.search(r'blr=\S+ \(checkpoint\) != 0\.125 \(now\)', errors[0])
  assert 'Traceback' not in out.stderr
  assert sorted(p.name for p in workdir.rglob('*')) == before


def test_second_run_on_a_locked_workdir_is_refused_in_one_line(task, env,
                                                               tmp_path):
  """While another holder has the workdir, a run exits 2 with one line
  naming the workdir, before training starts or anything is written."""
  workdir = tmp_path / 'w'
  workdir.mkdir()
  with WorkdirLock(str(workdir)):
    with pytest.raises(WorkdirLocked, match=f'pid {os.getpid()}'):
      WorkdirLock(str(workdir))
    out = run(command(task, workdir), env)
  assert out.returncode == 2, out.stderr[-3000:]
  errors = error_lines(out.stderr)
  assert len(errors) == 1, out.stderr[-3000:]
  assert errors[0].startswith(
      f'error: workdir {workdir} is in use by another run'), errors
  assert not STARTED.search(out.stdout), out.stdout[-2000:]
  assert [p.name for p in workdir.iterdir()] == ['.lock']
  WorkdirLock(str(workdir)).release()  # free again


def test_load_reads_the_workdir_of_every_task(task, reference):
  """`mae_jax.load(WORKDIR)` gives the task's model with the parameters of
  the final checkpoint, and the model runs on a batch."""
  model, variables = mae_jax.load(reference)
  assert_bitwise_equal(variables['params'],
                       saved_state(reference, TOTAL)['params'])
  images = np.random.default_rng(0).normal(size=(2, 32, 32, 3))
  images = images.astype(np.float32)
  if task == 'pretrain':
    loss, pred, mask = model.apply(variables, images, mask_ratio=0.75,
                                   rngs={'mask': jax.random.key(0)})
    assert np.isfinite(loss) and pred.shape[:2] == mask.shape == (2, 16)
  else:
    logits = model.apply(variables, images)
    assert logits.shape[0] == 2 and np.isfinite(logits).all()
