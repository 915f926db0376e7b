"""Fault matrix: kills, preemptions and bad images against `train.py`.

  python benchmarks/fault_matrix.py --trials 20          # writes docs/RELIABILITY.md
  python benchmarks/fault_matrix.py --trials 3 --out /tmp/r.md   # CI size

One uninterrupted reference run, then chains of runs of the same command
on fresh workdirs, each SIGKILLed at an event drawn from a seeded RNG:
'step' (a random moment 0-2.5 s into the training loop), 'async_write'
(while an `*.orbax-checkpoint-tmp*` directory exists) or 'after_save' (as
soon as a new checkpoint step appears). Every restart must resume from the
newest complete checkpoint present at the kill, and every chain's final
parameters must equal the reference bitwise. SIGTERM trials must save the
current step, exit 0 and resume there. Exit status 1 if any trial fails.
"""
import argparse
import concurrent.futures
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SMALL = ['--config.batch_size=8', '--config.total_steps=12',
         '--config.warmup_steps=2', '--config.checkpoint_every_steps=2',
         '--config.log_every_steps=1', '--config.figure_every_steps=0']
EVENTS = ('step', 'async_write', 'after_save')
TMP = '.orbax-checkpoint-tmp'
NOTES = """\
## How each fault is handled, and where it is tested

- **SIGKILL** (section 1; `tests/test_reliability.py::test_fault_matrix_ci`
  runs this script with 3 kills and 1 SIGTERM;
  `tests/test_faults_every_task.py::test_sigkill_after_a_checkpoint_resumes_to_the_uninterrupted_state`
  kills a run of each task, pretraining, fine-tuning, linear probing and
  pose estimation, right after a checkpoint and compares every saved array with an uninterrupted
  run's). Checkpoints are written by orbax into
  `STEP.orbax-checkpoint-tmp-*` and renamed when complete; a restart deletes
  such leftovers (`cleanup_tmp_directories`) and resumes from the newest
  complete step, so a partial checkpoint is never read. Lost work: the
  updates after the newest complete checkpoint (at most
  `checkpoint_every_steps`), recomputed bit for bit.
- **SIGTERM** (section 2;
  `tests/test_faults_every_task.py::test_sigterm_saves_the_step_it_reached_and_exits_0`
  for each task). A handler installed when `train()` starts sets a
  flag; at the next step boundary the run saves that step, waits for the
  write and exits 0 (`preempted (SIGTERM): saved step N`). Multi-process
  runs (jax.distributed) leave SIGTERM to JAX's preemption service: the
  notice reaches every process, and
  `multihost_utils.reached_preemption_sync_point(step)` turns True on all
  of them at the same step (the one after the highest step any process had
  reached), so all save that step and stop together; each logs `process I
  of N: preempted, saved step S`.
  `tests/test_multiprocess.py::test_two_processes_match_single_process_across_a_preemption`
  runs 2 processes x 4 CPU devices (gloo), sends SIGTERM to process 1 only,
  as soon as the run is up, and checks that both exit 0 having saved the
  same step (1 or 2 of 3), that the restart resumes there, and that it ends
  equal (atol 1e-5) to an uninterrupted one-process run on 8 devices.
- **NaN / Inf** (`tests/test_faults_every_task.py::test_nonfinite_loss_stops_naming_the_update`
  and `test_nonfinite_loss_is_skipped_with_skip_nonfinite`, for each task:
  train.py run with an all-NaN batch at update 3, injected by wrapping the
  data iterator). Default: the run
  stops with `non-finite loss=nan, grad_norm=nan at update 3; the last good
  checkpoint is step 2` (exit status 1). `--config.skip_nonfinite=True`:
  the step keeps the previous parameters and optimizer state (`jnp.where`
  inside the jitted step), the log says `skipped update 3 ...; 1 updates
  skipped so far`, metrics.jsonl carries `skipped_total`, and the count is
  saved in the checkpoint. Parameters are checked for NaN/Inf before every
  save; non-finite parameters are never written. With `accum_iter > 1`
  the update is skipped whole
  (`tests/test_reliability.py::test_nonfinite_micro_batch_drops_its_whole_accumulated_update`):
  the micro-batches' gradients are summed by a `lax.scan` inside one jitted
  update, so a non-finite micro-batch makes the update's loss or gradient
  norm non-finite and one `jnp.where` keeps the whole state of before the
  update. The optimizer's own schedule counts applied updates, so after k
  skipped updates it runs k updates behind the logged `lr`.
- **Bad images** (section 4, `test_bad_images_are_converted_or_skipped_and_named`,
  `test_bad_tfds_records_are_converted_or_skipped_and_named`).
  Folder files are opened with PIL once, up front, in a thread pool (JPEGs
  decoded DCT-scaled to 1/8 per side, so truncation is found cheaply); the
  example list is fixed before the epoch permutation, so skips keep epochs
  and resumption deterministic. `config.data.on_error='fail'` stops at the
  first bad file, naming it. Images above `config.data.max_pixels` (default
  PIL's 89.5 Mpx) are skipped before any pixel is decoded. A TFDS split is
  streamed, so its records are checked as they are read: each batch of L
  records is decoded by its own small tf.data dataset whose errors are
  dropped (`ignore_errors`), after a header check (the format's magic
  bytes; width x height from the JPEG/PNG/GIF/BMP header against
  `max_pixels`, before decoding). A bad record's slot is filled with a copy
  of the next usable example of the same batch, so every batch still
  consumes exactly L records: epoch length and resumption (batch k of a
  resumed run equals batch k of an uninterrupted one) are unchanged. Each
  bad record is logged by its tfds_id with the reason and a running count;
  `on_error='fail'` raises naming it; evaluation marks it `valid=False`.
- **Workdir in use**
  (`tests/test_faults_every_task.py::test_second_run_on_a_locked_workdir_is_refused_in_one_line`):
  `fcntl.flock` on `WORKDIR/.lock` (`.lock.I` for process I > 0) for the
  run's lifetime; a second run, of any task, prints `error: workdir W is in use by another run (pid P on
  HOST since T; lock file W/.lock)` and exits 2. The kernel drops the lock
  when a run dies, so there is never a stale lock.
- **Checkpoint of another config**
  (`tests/test_faults_every_task.py::test_resume_refuses_a_changed_config_in_one_line`,
  `tests/test_resume.py::test_resume_refuses_a_trajectory_change_naming_the_field`):
  before restoring, the saved config and model description are compared
  with the current ones: every config field must match except those that do not change the
  updates (`mae_jax.resume_rules.NOT_TRAJECTORY`: the log, checkpoint, figure and
  eval intervals, keep_checkpoints, mesh, attention, remat,
  fuse_patch_gather, skip_nonfinite, data.on_error);
  `--config.resume_override=FIELD,...` allows named changes (e.g. a longer
  total_steps). A mismatch is `error: checkpoint .../6 was written by
  another config: blr=0.0015 (checkpoint) != 0.125 (now); ...;
  resuming would change the run. ...`.
- **Full disk** (`tests/test_faults_every_task.py::test_full_disk_stops_in_one_line_and_keeps_older_checkpoints`,
  for each task a tmpfs with room for one checkpoint of its run, not two;
  skipped where mounting needs a root the test lacks): the
  failing save raises `saving checkpoint step 4 in ... failed: ... No space
  left on device; the older checkpoints [2] are intact`, the CLI prints it
  as its last line and exits 1, and step 2 still loads. No traceback is
  printed: while `train()` runs, orbax's error records keep their one-line
  messages without tracebacks, and the `RuntimeError: Event loop is closed`
  that each tensorstore write still in flight reported after orbax closed
  the failed save's event loop (dozens to hundreds, some at exit) is
  dropped by a `sys.unraisablehook` filter
  (`test_writes_finishing_after_their_event_loop_closed_are_silent`).
- **Corrupt checkpoint data** (`tests/test_loop.py::test_a_flipped_bit_is_found_on_resume_which_takes_the_previous_step`,
  `test_a_flipped_bit_makes_load_refuse_naming_the_leaf_unless_asked`,
  `tests/test_checksums.py`). Every save stores a checksum of each saved
  leaf (item `checksums`; two 32-bit position-weighted sums of the leaf's
  bits, computed on device in one pass, so any single flipped bit changes
  it: proof in `mae_jax/checksums.py`). A resumed run verifies every
  restored leaf; a step that does not match is named with the leaf
  (`warning: checkpoint W/checkpoints/4 is corrupt: params leaf
  'blocks_3/attn/qkv/kernel' does not match its saved checksum; moved it to
  W/corrupt_checkpoints/4; resuming from the previous checkpoint 2`), moved
  aside, and the newest intact step is used; if it was the only step the
  run stops instead of starting afresh. `mae_jax.load` refuses a corrupt
  step naming the leaf and the other steps (`load(path, step=N)`).
  Cost (`benchmarks/results/checksum_cost.md`, 2-core CPU): 3.7 s for the
  ViT-B state (1.25 GiB), 10.4 s for ViT-L (3.7 GiB) per checkpoint, more
  than the save itself; not yet measured on an accelerator, where it is a
  memory-bandwidth-bound reduction.
- **Every task**: pretraining, fine-tuning, linear probing and pose
  estimation run the same loop (`mae_jax/train/loop.py`), so each guarantee
  above holds for all four; `tests/test_faults_every_task.py` runs the
  faults for each task through `train.py`.
- **Config and CLI mistakes** (`test_cli_mistakes_are_one_line`,
  `tests/test_train_loop.py::test_bad_config_is_rejected_naming_the_field`):
  invalid values, unknown `--config.x` keys, malformed values and unknown
  config variants print one `error: ...` line naming the field, no
  traceback, exit status 2.
"""
START = re.compile(r'(?:resuming at|starting) step (\d+)/')


class Run:
  """One train.py process whose stdout is collected by a thread."""

  def __init__(self, workdir, env):
    self.workdir, self.t0 = workdir, time.time()
    self.proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, 'train.py'), '--config',
         os.path.join(ROOT, 'configs/pretrain.py') + ':tiny', '--workdir',
         workdir, *SMALL], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    self.lines = []
    threading.Thread(target=self._read, daemon=True).start()

  def _read(self):
    for line in self.proc.stdout:
      self.lines.append(line)

  def start_step(self):
    for line in self.lines:
      m = START.search(line)
      if m:
        return int(m.group(1))
    return None

  def wait_for(self, predicate, timeout=600):
    """Polls every 5 ms; False if the process ended first."""
    deadline = time.time() + timeout
    while not predicate():
      if self.proc.poll() is not None or time.time() > deadline:
        return False
      time.sleep(0.005)
    return True

  def finish(self, timeout=600):
    self.proc.wait(timeout)
    time.sleep(0.1)  # let the reader thread drain
    return self.proc.returncode

  def tail(self):
    return ''.join(self.lines[-5:]).strip().replace('\n', ' | ')[-300:]


def ckpt_dir(workdir):
  return os.path.join(workdir, 'checkpoints')


def steps(workdir):
  """Complete (finalized) checkpoint steps."""
  d = ckpt_dir(workdir)
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if (
      os.path.isdir(d)) else []


def partial(workdir):
  d = ckpt_dir(workdir)
  return [n for n in os.listdir(d) if TMP in n] if os.path.isdir(d) else []


def params_equal(a, b):
  import jax
  import numpy as np
  from mae_jax import checkpoint
  pa, pb = (checkpoint.load(w)[1]['params'] for w in (a, b))
  return all(np.array_equal(x, y) for x, y in
             zip(jax.tree.leaves(pa), jax.tree.leaves(pb)))


def kill_at(run, event, rng):
  """Waits for `event`, SIGKILLs; returns a description or None if the run
  ended first."""
  if not run.wait_for(lambda: run.start_step() is not None):
    return None
  if event == 'step':
    delay = rng.uniform(0.0, 2.5)
    if not run.wait_for(lambda: time.time() > run.t_loop + delay):
      return None
    what = f'{delay:.2f} s into the loop'
  elif event == 'async_write':
    if not run.wait_for(lambda: partial(run.workdir)):
      return None
    what = 'during an async write'
  else:
    before = set(steps(run.workdir))
    if not run.wait_for(lambda: set(steps(run.workdir)) - before):
      return None
    what = f'right after step {max(set(steps(run.workdir)) - before)} saved'
  run.proc.send_signal(signal.SIGKILL)
  run.finish()
  left = partial(run.workdir)
  return what + (f' ({len(left)} partial dir left)' if left else '')


def launch(workdir, env):
  run = Run(workdir, env)
  run.wait_for(lambda: run.start_step() is not None)
  run.t_loop = time.time()
  return run


def kill_chain(name, kills, first, work, env, rng):
  """`kills` SIGKILLs numbered from `first`; a workdir is killed again until
  one of its runs ends by itself, then a fresh one is used. Returns (rows of
  [trial, event, killed when, newest complete, resumed at, outcome],
  [(workdir, finished with rc 0)])."""
  rows, chains = [], []
  while len(rows) < kills:
    workdir = os.path.join(work, f'{name}_{len(chains)}')
    last, expected = None, 0
    while True:
      run = launch(workdir, env)
      if last is not None:
        last[4] = run.start_step()
        if last[4] != expected:
          last[5] = f'FAIL: expected {expected}; {run.tail()}'
      trial = first + len(rows)
      event = EVENTS[trial % len(EVENTS)]
      what = kill_at(run, event, rng) if len(rows) < kills else None
      if what is None:  # the run ended by itself
        chains.append((workdir, run.finish() == 0))
        break
      expected = (steps(workdir) or [0])[-1]
      last = [trial + 1, event, what, expected, None, 'ok']
      rows.append(last)
  return rows, chains


def sigterm_trial(work, env, rng, index):
  """SIGTERM at a random moment; the run must save, exit 0 and resume."""
  workdir = os.path.join(work, f'sigterm{index}')
  run = launch(workdir, env)
  delay = rng.uniform(0.5, 3.0)
  run.wait_for(lambda: time.time() > run.t_loop + delay)
  run.proc.send_signal(signal.SIGTERM)
  rc = run.finish()
  m = re.search(r'preempted \(SIGTERM\): saved step (\d+)', ''.join(run.lines))
  saved = int(m.group(1)) if m else None
  newest = (steps(workdir) or [None])[-1]
  again = Run(workdir, env)
  rc2 = again.finish()
  ok = (rc == 0 and saved is not None and newest == saved
        and again.start_step() == saved and rc2 == 0)
  return [index + 1, f'{delay:.2f} s', rc, saved, newest, again.start_step(),
          'ok' if ok else f'FAIL {run.tail()}'], workdir


def bad_images_table(work):
  """(file, kind, folder outcome, TFDS outcome) for each kind of bad file,
  read by the folder source and, as the records of a mocked TFDS split (an
  unreadable file as an empty record), by the TFDS path."""
  import logging
  from tests.helpers import (MOCK_ID, bad_records, make_bad_folder,
                             mock_tfds_split)
  from mae_jax import schema
  from mae_jax.data import pipeline, sources
  data_dir, kinds = make_bad_folder(os.path.join(work, 'bad_images'))
  defaults = schema.config('pretrain').data.to_dict()
  cfg = dict(defaults, name='folder', data_dir=data_dir, image_size=32)
  t0 = time.time()
  n = pipeline.num_examples(cfg)
  took = time.time() - t0
  batch = next(pipeline.make_iterator(cfg, n, seed=0))

  class Skips(logging.Handler):  # 'skipping TFDS record ID of ...: WHY; ...'
    reasons = {}

    def emit(self, record):
      m = re.match(r'skipping TFDS record (\S+) of .*?: (.*?); \d+ skipped',
                   record.getMessage())
      if m:
        self.reasons[m.group(1)] = m.group(2)

  skips = Skips()
  logging.getLogger('absl').addHandler(skips)
  try:
    with mock_tfds_split(bad_records(data_dir, kinds)):
      tfds_cfg = dict(defaults, name='imagenet2012', image_size=32)
      tfds_batch = next(pipeline.make_iterator(tfds_cfg, len(kinds), seed=0))
  finally:
    logging.getLogger('absl').removeHandler(skips)
  rows = []
  for i, (name, kind) in enumerate(kinds.items()):
    reason = sources.check_image(os.path.join(data_dir, 'train', 'a', name))
    tfds_reason = skips.reasons.get(MOCK_ID.format(i))
    rows.append((name, kind, 'converted to RGB' if reason is None
                 else f'skipped: {reason[:90]}',
                 'converted to RGB' if tfds_reason is None
                 else f'skipped: {tfds_reason}'))
  return rows, n, took, batch['image'].shape, tfds_batch['image'].shape


def bad_images_section(rows, n, took, shape, tfds_shape):
  """Section 4 of the document (lines), from bad_images_table."""
  lines = ['## 4. Bad image files (folder source and TFDS records)', '',
           f'The folder below held {len(rows)} files; {n} examples remain '
           f'after the up-front check ({took:.1f} s, including the '
           f'TensorFlow start); a batch of all of them decodes to {shape}. '
           f'The same bytes as the {len(rows)} records of a mocked TFDS '
           '(`tfds.testing.mock_data`) split, an unreadable file as an '
           f'empty record, make one training batch of {tfds_shape}: each '
           "skipped record's slot holds a copy of a usable example of the "
           'batch.', '',
           '| file | kind | folder source | TFDS record |',
           '|---|---|---|---|']
  lines += [f'| {" | ".join(r)} |' for r in rows]
  return lines + ['']


def write_doc(path, args, rows, chains, sig, bad, elapsed):
  kills_ok = all(r[-1] == 'ok' for r in rows) and all(
      ok and eq for _, ok, eq in chains)
  lines = [
      '# Reliability: fault matrix', '',
      f'Produced by `python benchmarks/fault_matrix.py --trials {args.trials}'
      f' --sigterm {args.sigterm} --jobs {args.jobs} --seed {args.seed}` in '
      f'{elapsed:.0f} s on {os.cpu_count()} shared CPU cores (JAX CPU, one '
      'device, runs of different workdirs in parallel). Each run is '
      f'`train.py --config configs/pretrain.py:tiny {" ".join(SMALL)}`, '
      'compared with one uninterrupted reference run.', '',
      '## 1. SIGKILL at random moments', '',
      f'{len(rows)} kills over {len(chains)} workdirs (a workdir is killed '
      'again and again until a run finishes). "resumed at" is the step the '
      'next run of the same command started from; it must equal the newest '
      'complete checkpoint at the kill.', '',
      '| trial | event | killed | newest complete | resumed at | outcome |',
      '|---|---|---|---|---|---|']
  lines += [f'| {" | ".join(str(c) for c in r)} |' for r in rows]
  lines += ['', '| workdir | finished (rc 0) | parameters bitwise equal to '
            'the reference |', '|---|---|---|']
  lines += [f'| {w} | {ok} | {eq} |' for w, ok, eq in chains]
  lines += ['', f'Result: {"all trials passed" if kills_ok else "FAILURES"}'
            '; nothing was lost beyond the steps after the newest complete '
            'checkpoint, which were recomputed identically.', '']
  if sig:
    lines += ['## 2. SIGTERM (preemption)', '',
              '| trial | sent | rc | saved step | newest checkpoint | '
              'resumed at | outcome |', '|---|---|---|---|---|---|---|']
    lines += [f'| {" | ".join(str(c) for c in r)} |' for r in sig]
    lines += ['', 'Resumed runs end bitwise equal to the reference.', '']
  if bad:
    lines += bad_images_section(*bad)
  lines += NOTES.splitlines()
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  return kills_ok and all(r[-1] == 'ok' for r in sig)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--trials', type=int, default=20, help='SIGKILLs')
  parser.add_argument('--sigterm', type=int, default=2, help='SIGTERM trials')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--jobs', type=int, default=2,
                      help='workdirs run at the same time')
  parser.add_argument('--bad-images', action=argparse.BooleanOptionalAction,
                      default=True)
  parser.add_argument('--out', default=os.path.join(ROOT, 'docs',
                                                    'RELIABILITY.md'))
  args = parser.parse_args()
  t0 = time.time()
  work = tempfile.mkdtemp(prefix='fault_matrix_')
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1',
             XLA_FLAGS='--xla_force_host_platform_device_count=1',
             JAX_COMPILATION_CACHE_DIR=os.path.join(work, 'jax_cache'),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  try:
    reference = os.path.join(work, 'reference')
    quotas = [min(4, args.trials - k) for k in range(0, args.trials, 4)]
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
      ref = pool.submit(lambda: Run(reference, env).finish())
      chains = [pool.submit(kill_chain, f'chain{c}', q, 4 * c, work, env,
                            random.Random(f'{args.seed}-{c}'))
                for c, q in enumerate(quotas)]
      sigs = [pool.submit(sigterm_trial, work, env,
                          random.Random(f'{args.seed}-sigterm{i}'), i)
              for i in range(args.sigterm)]
      if ref.result() != 0:
        sys.exit('reference run failed')
      rows = [r for c in chains for r in c.result()[0]]
      finished = [w for c in chains for w in c.result()[1]]
      sig = [s.result() for s in sigs]
    results = [(os.path.basename(w), ok, ok and params_equal(w, reference))
               for w, ok in finished]
    for row, workdir in sig:
      if row[-1] == 'ok' and not params_equal(workdir, reference):
        row[-1] = 'FAIL: parameters differ from the reference'
    sig = [row for row, _ in sig]
    for r in rows:
      print('kill', *r, flush=True)
    print('workdirs', results, flush=True)
    for r in sig:
      print('sigterm', *r, flush=True)
    bad = bad_images_table(work) if args.bad_images else None
    ok = write_doc(args.out, args, rows, results, sig, bad, time.time() - t0)
  finally:
    shutil.rmtree(work, ignore_errors=True)
  print(f'{"all trials passed" if ok else "FAILURES"}; wrote {args.out} in '
        f'{time.time() - t0:.0f} s', flush=True)
  sys.exit(0 if ok else 1)


if __name__ == '__main__':
  main()
