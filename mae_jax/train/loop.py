"""The training loop, the same for every task (mae_jax.train.task.Task).

`run(task, workdir)` owns everything around the task's update:
- the workdir lock (a second run on the same workdir is refused) and
  preemption (SIGTERM saves the current step and returns normally);
- checkpoints: resume from the newest intact one after checking that the
  run's config matches the saved one (mae_jax.train.checkpoints), periodic
  asynchronous saves, a failed save reported once at the next update;
- cadences: log, checkpoint, evaluation and figure intervals;
- the non-finite policy: stop naming the update and the last good
  checkpoint, or (config.skip_nonfinite) skip the update and count it;
- progress lines and metrics (mae_jax.train.monitor).

Data order is a function of (seed, step): update `step` consumes
micro-batches [step * accum_iter, (step + 1) * accum_iter) of the task's
stream, so a resumed run sees exactly the batches an uninterrupted one
would have.
"""
import collections
import logging

import jax
import jax.numpy as jnp
import numpy as np

from mae_jax import paths
from mae_jax.train import checkpoints, sharding
from mae_jax.train.monitor import Monitor, mesh_text
from mae_jax.train.workdir import Preemption, WorkdirLock


def run(task, workdir):
  """Runs (or resumes) `task` in `workdir`; returns (state, result), the
  final state and the task's last evaluation result (None if none ran).

  Holds WORKDIR/.lock while running. SIGTERM saves the current step and
  returns normally (see mae_jax.train.workdir.Preemption).
  """
  workdir = paths.resolve(workdir)
  preemption = Preemption()  # from here on SIGTERM saves at a step boundary
  try:
    with WorkdirLock(workdir, jax.process_index()):
      mngr = checkpoints.manager(workdir / 'checkpoints',
                                 task.config.keep_checkpoints, task.items)
      with checkpoints.closing(mngr):
        return _run(task, workdir, mngr, preemption)
  finally:
    preemption.restore()


def _every(interval, done, total):
  return interval > 0 and (done % interval == 0 or done == total)


def _micro_batches(task, start, stop, ahead=2):
  """Global (accum_iter, batch, ...) arrays of the updates [start, stop),
  each put on the devices `ahead` updates before it is consumed (the copies
  run while earlier updates compute); nothing is read past update stop - 1."""
  data = task.batches(start * task.config.accum_iter)
  queue, filled = collections.deque(), start
  while queue or filled < stop:
    while len(queue) < ahead and filled < stop:
      micro = [next(data) for _ in range(task.config.accum_iter)]
      queue.append(sharding.global_batch(
          task.mesh, {k: np.stack([m[k] for m in micro])
                      for k in task.batch_keys}, stacked=True))
      filled += 1
    yield queue.popleft()


def _run(task, workdir, mngr, preemption):
  config, total = task.config, task.total_steps
  active = jax.process_index() == 0
  note = lambda text: print(text, flush=True) if active else None
  restored = checkpoints.restore_latest(mngr, task.abstract_state,
                                        task.items, config, task.model, note)
  if restored is None:
    state, start, skipped, overrides = task.init_state(), 0, 0, []
  else:
    state, meta, overrides = restored
    start, skipped = meta['step'], meta.get('skipped', 0)
  monitor = Monitor(workdir, total, config, active=active, start_step=start)
  try:
    if task.eval_only:
      result = task.evaluate(state, start)
      monitor.log_eval(start, result, task.summary(result))
      return state, result
    monitor.note(f'{"resuming at" if start else "starting"} step {start}/'
                 f'{total} in {paths.shown(workdir)} on mesh '
                 f'{mesh_text(task.mesh)}')
    if overrides:
      monitor.note('resuming with changed fields (config.resume_override): '
                   + '; '.join(overrides))
    for line in task.notes(start):
      monitor.note(line)
    return _steps(task, mngr, monitor, preemption, state, start, skipped)
  finally:
    monitor.close()


def _steps(task, mngr, monitor, preemption, state, start, skipped):
  config, total = task.config, task.total_steps
  batches = _micro_batches(task, start, total)
  watch = checkpoints.SaveWatch(mngr)
  pending, result = [], None  # (step, metrics) not yet checked

  def check():
    """Checks the metrics of the updates since the last check, in one
    transfer: the host waits for the device only where it needs results
    anyway (logs, checkpoints, evaluations, figures, the end). Returns the
    updates skipped so far."""
    nonlocal pending, skipped
    steps, metrics = [s for s, _ in pending], [m for _, m in pending]
    pending = []
    for step, values in zip(steps, jax.device_get(metrics)):
      skipped += monitor.check_finite(
          step, values, last_good=mngr.latest_step(),
          skip=config.skip_nonfinite, skipped=skipped)
    return skipped

  for step in range(start, total):
    state, metrics = task.update(state, next(batches), jnp.int32(step))
    monitor.add(metrics)
    if step == start:
      monitor.started(step + 1)
    pending.append((step, {k: metrics[k] for k in ('loss', 'grad_norm')}))
    watch.poll()
    done = step + 1
    stop = preemption.reached(done)
    if stop or any(_every(n, done, total) for n in (
        config.log_every_steps, config.checkpoint_every_steps,
        config.figure_every_steps, config.eval_every_steps)):
      skipped = check()
    if _every(config.log_every_steps, done, total):
      monitor.log(done, skipped)
    if _every(config.checkpoint_every_steps, done, total) or stop:
      checkpoints.save(mngr, watch, done, state, task.items, task.model,
                       checkpoints.meta(config, done, skipped=skipped))
    if _every(config.figure_every_steps, done, total):
      with monitor.paused():
        task.figure(state, done, monitor)
    if _every(config.eval_every_steps, done, total):
      with monitor.paused():
        result = task.evaluate(state, done)
        monitor.log_eval(done, result, task.summary(result))
    if stop:
      watch.finish()
      monitor.note(f'preempted (SIGTERM): saved step {done}/{total} in '
                   f'{paths.shown(mngr.directory)}; run the same command to '
                   'resume')
      if jax.process_count() > 1:  # every process says where it stopped
        logging.getLogger('absl').warning(
            'process %d of %d: preempted, saved step %d',
            jax.process_index(), jax.process_count(), done)
      return state, result
  skipped = check()
  watch.finish()
  summary = task.summary(result)
  monitor.note(
      f'done: {config.task} step {total}/{total}'
      + (f'; {summary}' if summary else '')
      + f'; checkpoints in {paths.shown(mngr.directory)}, metrics in '
      f'{paths.shown(monitor.workdir / "metrics.jsonl")} and '
      f'{paths.shown(monitor.workdir / "tb")}'
      + ''.join(f'; {line}' for line in task.outputs(monitor.workdir))
      + (f'; {skipped} non-finite updates skipped' if skipped else ''))
  return state, result
