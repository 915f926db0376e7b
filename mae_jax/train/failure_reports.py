"""Quiets the repeated reports of one failed checkpoint save, for a command
line.

When one write of an asynchronous save fails (e.g. a full disk), orbax,
tensorstore, asyncio and tensorboardX each report the same failure again,
some of them at interpreter exit, with tracebacks; the run itself reports it
once (mae_jax.errors.CheckpointSaveError, which chains the cause). `install`
adds narrow filters for those repeats and returns a function that removes
them; `quiet` is the same as a context manager. Library code never installs
them: a command-line entry point does, for the life of its process (the
stranded writes can report up to interpreter exit).

The filters:
- orbax's log records (through absl) keep their one-line message but lose
  their tracebacks;
- sys.unraisablehook drops the `RuntimeError: Event loop is closed` that each
  tensorstore write still in flight reports when it finishes after orbax
  closed the save's asyncio loop; every other unraisable exception goes to
  the previous hook;
- threading.excepthook drops the full-disk OSError of tensorboardX's writer
  thread (Monitor.close reports it in one line);
- asyncio's 'exception was never retrieved' report of a write that failed
  for lack of space is dropped.
"""
import contextlib
import errno
import logging
import os
import sys
import threading


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


def _is_tensorboard_full_disk(args):
  return (isinstance(args.exc_value, OSError)
          and args.exc_value.errno == errno.ENOSPC
          and type(args.thread).__name__ == '_EventLoggerThread')


def install():
  """Installs the filters (see the module docstring); returns a function
  that removes them again. The unraisable hook counts what it dropped in
  its `dropped` attribute."""
  previous_hook = sys.unraisablehook
  previous_thread_hook = threading.excepthook

  def hook(unraisable):
    if _closed_loop_callback(unraisable):
      hook.dropped += 1
    else:
      previous_hook(unraisable)

  def thread_hook(args):
    if not _is_tensorboard_full_disk(args):
      previous_thread_hook(args)

  hook.dropped = 0
  sys.unraisablehook, threading.excepthook = hook, thread_hook
  stranded, tracebacks = _NoStrandedWriteReports(), _NoOrbaxTracebacks()
  logging.getLogger('asyncio').addFilter(stranded)
  logging.getLogger('absl').addFilter(tracebacks)  # orbax logs through absl

  def remove():
    sys.unraisablehook = previous_hook
    threading.excepthook = previous_thread_hook
    logging.getLogger('asyncio').removeFilter(stranded)
    logging.getLogger('absl').removeFilter(tracebacks)
  return remove


@contextlib.contextmanager
def quiet():
  """`install` for the duration of a with block."""
  remove = install()
  try:
    yield
  finally:
    remove()
