"""A training run's checkpoints: asynchronous saves that are checked before
they start and watched after, and restores that are checked twice.

Layout of WORKDIR/checkpoints/<step>/ (an orbax CheckpointManager root):
the task's state items (`params`, `opt_state`, and e.g. `batch_stats`),
`model` (the module description that mae_jax.load rebuilds), `meta` (step,
skipped updates, the config) and `checksums` (one per saved leaf, see
mae_jax.checksums).

Saving refuses non-finite parameters, computes the checksums on device (one
pass, no host copy) and starts an asynchronous write; `SaveWatch` notices a
failed write (a full disk) at the next update and reports it once
(CheckpointSaveError, naming the older checkpoints, which are intact).
Restoring first compares the saved config with the run's
(resume_rules.check_resume), then verifies every restored leaf against its
checksum; a corrupt step is moved aside to WORKDIR/corrupt_checkpoints/ and
the newest intact one is used instead, with a note saying so.
"""
import contextlib
import json

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from mae_jax import checkpoint, checksums, paths
from mae_jax.errors import (CheckpointSaveError, CorruptCheckpointError,
                            NonFiniteError)
from mae_jax.resume_rules import check_resume
from mae_jax.train.task import all_finite


def manager(directory, keep, items):
  """Async manager of `directory` for state `items` plus model, meta and
  checksums; unfinished (`*.orbax-checkpoint-tmp*`) steps of a killed run are
  deleted on start and never read."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, enable_async_checkpointing=True, create=True,
      cleanup_tmp_directories=True)
  return ocp.CheckpointManager(
      paths.resolve(directory), options=options,
      item_names=tuple(items) + ('model', 'meta', 'checksums'))


@contextlib.contextmanager
def closing(mngr):
  """Closes the checkpoint manager `mngr` on exit. When an error is already
  leaving the block, a failure to close is dropped: the first error is the
  one to report."""
  try:
    yield mngr
  except BaseException:
    try:
      mngr.close()
    except Exception:  # noqa: BLE001
      pass
    raise
  mngr.close()


def _save_failed(mngr, step, error):
  steps = sorted(s for s in mngr.all_steps() if s != step)
  return CheckpointSaveError(
      f'saving checkpoint step {step} in {paths.shown(mngr.directory)} '
      f'failed: {type(error).__name__}: {error}; the older checkpoints '
      f'{steps or "(none)"} are intact'.replace('\n', ' '))


class SaveWatch:
  """Tracks the latest async save, so that its failure ends the run at the
  next update instead of at the next save."""

  def __init__(self, mngr):
    self.mngr, self.step = mngr, None

  def started(self, step):
    """Call before starting the save of `step`: reports a failure of the
    previous one (waiting for it if still in flight)."""
    self.finish()
    self.step = step

  def poll(self):
    """Without blocking: raises CheckpointSaveError if the save in flight
    has failed; forgets it once it has succeeded."""
    if self.step is not None and not self.mngr.is_saving_in_progress():
      self.finish()

  def finish(self):
    """Waits for the save in flight; its failure: CheckpointSaveError."""
    if self.step is not None:
      step, self.step = self.step, None
      try:
        self.mngr.wait_until_finished()
      except Exception as e:  # noqa: BLE001  (orbax wraps errors variously)
        raise _save_failed(self.mngr, step, e) from e


def save(mngr, watch, step, state, items, model, meta):
  """Starts the async save of `state` (its `items`) as step `step`.

  Refuses non-finite parameters (NonFiniteError naming the last good
  step); `watch` first reports a failure of the previous save. `meta` is a
  JSON-able dict stored beside the state.
  """
  if not bool(all_finite(state['params'])):
    raise NonFiniteError(
        f'parameters after update {step} are not finite; not saving them; '
        f'the last good checkpoint is step {mngr.latest_step()}')
  sums = {k: checksums.tree_checksums(state[k]) for k in items}
  watch.started(step)
  args = {k: ocp.args.StandardSave(state[k]) for k in items}
  try:
    mngr.save(step, args=ocp.args.Composite(
        model=ocp.args.JsonSave(checkpoint.model_description(model)),
        meta=ocp.args.JsonSave(meta), checksums=ocp.args.JsonSave(sums),
        **args))
  except Exception as e:  # noqa: BLE001
    raise _save_failed(mngr, step, e) from e


def meta(config, step, **extra):
  """The `meta` item of a training checkpoint."""
  return {'step': step, 'config': json.loads(config.to_json()), **extra}


def check_saved_config(mngr, step, config, model):
  """(meta, overrides) of checkpoint `step`, after resume_rules.check_resume
  compared its saved config and model description with `config` and
  `model` (refusing a run they would change)."""
  saved = mngr.restore(step, args=ocp.args.Composite(
      model=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
  overrides = check_resume(config, saved['meta']['config'],
                           checkpoint.model_description(model),
                           saved['model'],
                           paths.shown(mngr.directory / str(step)))
  return saved['meta'], overrides


def _restore_verified(mngr, step, abstract_state, items):
  """The state items of `step`, verified against its checksums (steps
  written before checksums existed are taken as they are)."""
  restored = mngr.restore(step, args=ocp.args.Composite(**{
      k: ocp.args.StandardRestore(abstract_state[k]) for k in items}))
  state = {k: restored[k] for k in items}
  saved = checkpoint.read_checksums(mngr, step)
  if saved is not None:
    checksums.verify(
        saved, {k: checksums.tree_checksums(state[k]) for k in items},
        f'checkpoint {paths.shown(mngr.directory / str(step))}')
  return state


def set_aside(mngr, step):
  """Moves corrupt step `step` to WORKDIR/corrupt_checkpoints/<step> (out of
  the manager's sight, kept for inspection); returns where it went."""
  source = paths.resolve(mngr.directory) / str(step)
  target = paths.resolve(mngr.directory).parent / 'corrupt_checkpoints'
  target.mkdir(parents=True, exist_ok=True)
  target = target / str(step)
  if jax.process_index() == 0:
    target.rmtree(missing_ok=True)
    source.rename(target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f'set aside step {step}')
  mngr.reload()
  return target


def restore_latest(mngr, abstract_state, items, config, model, note):
  """(state, meta, overrides) of the newest intact checkpoint, or None when
  there is none.

  The saved config is compared first (a changed run is refused, see
  check_saved_config); a step whose data does not match its checksums is
  set aside (`set_aside`) and `note` says so; the previous step is tried.
  If the only step is corrupt, CorruptCheckpointError: the run does not
  silently start afresh.
  """
  while (step := mngr.latest_step()) is not None:
    saved_meta, overrides = check_saved_config(mngr, step, config, model)
    try:
      state = _restore_verified(mngr, step, abstract_state, items)
    except CorruptCheckpointError as e:
      if len(mngr.all_steps()) == 1:
        raise CorruptCheckpointError(
            f'{e}; it is the only checkpoint: remove it (or the workdir) to '
            'start afresh') from None
      moved = set_aside(mngr, step)
      note(f'warning: {e}; moved it to {paths.shown(moved)}; resuming from '
           f'the previous checkpoint {mngr.latest_step()}')
      continue
    return state, saved_meta, overrides
  return None
