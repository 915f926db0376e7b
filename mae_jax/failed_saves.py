"""A failed checkpoint save (e.g. a full disk) ends the run with one message.

SaveWatch notices the failure of an asynchronous save at the first update
after it (CheckpointSaveError, naming the step and the older checkpoints).
After one write of an async save fails, orbax, tensorstore, asyncio and
tensorboardX each report the same failure again, some of them at
interpreter exit, with tracebacks. The filters below drop those reports
narrowly; the run reports the failure once (CheckpointSaveError).
"""
import contextlib
import errno
import logging
import os
import sys
import threading

from mae_jax.errors import CheckpointSaveError
from mae_jax.monitor import shown


def _save_failed(mngr, step, error):
  steps = sorted(s for s in mngr.all_steps() if s != step)
  return CheckpointSaveError(
      f'saving checkpoint step {step} in {shown(mngr.directory)} failed: '
      f'{type(error).__name__}: {error}; the older checkpoints '
      f'{steps or "(none)"} are intact'.replace('\n', ' '))


def save_step(mngr, step, args):
  """mngr.save that names the step when it fails."""
  try:
    mngr.save(step, args=args)
  except Exception as e:  # noqa: BLE001  (orbax wraps errors variously)
    raise _save_failed(mngr, step, e) from e


def finish_saves(mngr, step):
  """Waits for the async save of `step`; failure: CheckpointSaveError."""
  try:
    mngr.wait_until_finished()
  except Exception as e:  # noqa: BLE001
    raise _save_failed(mngr, step, e) from e


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
      finish_saves(self.mngr, step)



class _NoOrbaxTracebacks(logging.Filter):
  """Keeps the one-line message of an orbax log record, not its traceback."""

  def filter(self, record):
    if record.exc_info and f'{os.sep}orbax{os.sep}' in record.pathname:
      record.exc_info = record.exc_text = None
    return True


class _NoStrandedWriteReports(logging.Filter):
  """Drops asyncio's 'exception was never retrieved' report of an orbax
  write that failed for lack of space (CheckpointSaveError reports it)."""

  def filter(self, record):
    error = record.exc_info[1] if record.exc_info else None
    return not (record.getMessage().split('\n', 1)[0].endswith(
        'exception was never retrieved') and error is not None
                and 'RESOURCE_EXHAUSTED' in str(error))


def _closed_loop_callback(unraisable):
  """True for the RuntimeError('Event loop is closed') that a write
  finishing after its asyncio loop was closed reports."""
  error, tb = unraisable.exc_value, unraisable.exc_traceback
  names = []
  while tb is not None:
    names.append(tb.tb_frame.f_code.co_name)
    tb = tb.tb_next
  return (isinstance(error, RuntimeError)
          and str(error) == 'Event loop is closed'
          and 'call_soon_threadsafe' in names)


def drop_closed_loop_callbacks():
  """Installs (once) a sys.unraisablehook filter for _closed_loop_callback,
  a threading.excepthook filter for the full-disk error of tensorboardX's
  writer thread (Monitor.close reports it in one line), and an asyncio log
  filter for the stranded write tasks of a failed save.

  When one write of an async save fails (e.g. a full disk), orbax closes
  the save's asyncio loop while the other tensorstore writes are still in
  flight; each of them, finishing later (up to interpreter exit), reports
  `RuntimeError: Event loop is closed` with a traceback. They carry nothing
  beyond the failure the run already reports (CheckpointSaveError), so they
  are dropped; every other unraisable exception goes to the previous hook.
  """
  previous = sys.unraisablehook
  if getattr(previous, 'drops_closed_loop_callbacks', False):
    return

  def hook(unraisable):
    if _closed_loop_callback(unraisable):
      hook.dropped += 1
    else:
      previous(unraisable)

  hook.drops_closed_loop_callbacks = True
  hook.dropped = 0
  sys.unraisablehook = hook
  previous_thread_hook = threading.excepthook

  def thread_hook(args):  # tensorboardX's writer thread on a full disk
    if not (isinstance(args.exc_value, OSError)
            and args.exc_value.errno == errno.ENOSPC
            and type(args.thread).__name__ == '_EventLoggerThread'):
      previous_thread_hook(args)
  threading.excepthook = thread_hook
  logging.getLogger('asyncio').addFilter(_NoStrandedWriteReports())


@contextlib.contextmanager
def quiet_failed_saves():
  """A failed save ends the run with one message (CheckpointSaveError,
  which chains the cause) instead of a page of tracebacks: orbax's log
  records lose their tracebacks while this is active, and
  drop_closed_loop_callbacks is installed."""
  drop_closed_loop_callbacks()
  quiet = _NoOrbaxTracebacks()
  logger = logging.getLogger('absl')  # orbax logs through absl.logging
  logger.addFilter(quiet)
  try:
    yield
  finally:
    logger.removeFilter(quiet)
