"""Workdir guards: an exclusive lock for the run's lifetime and a preemption
flag that every process agrees on at step boundaries.

The lock is `fcntl.flock` on WORKDIR/.lock (process i > 0 of a multi-process
run: WORKDIR/.lock.i), so a crashed run never leaves a stale lock: the kernel
drops it with the process. flock is advisory and may not work across hosts
on some network file systems.
"""
import datetime
import fcntl
import os
import signal
import socket


class WorkdirLocked(RuntimeError):
  """Another run holds the workdir."""


class WorkdirLock:
  """Holds WORKDIR/.lock (or .lock.<process>) until `release` or exit."""

  def __init__(self, workdir, process_index=0):
    os.makedirs(workdir, exist_ok=True)
    name = '.lock' if process_index == 0 else f'.lock.{process_index}'
    self.path = os.path.join(workdir, name)
    self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      owner = os.read(self.fd, 200).decode(errors='replace').strip()
      os.close(self.fd)
      raise WorkdirLocked(
          f'workdir {workdir} is in use by another run ({owner or "unknown"}; '
          f'lock file {self.path}); wait for it to end or choose another '
          '--workdir') from None
    os.ftruncate(self.fd, 0)
    now = datetime.datetime.now().isoformat(timespec='seconds')
    os.write(self.fd, f'pid {os.getpid()} on {socket.gethostname()} since '
             f'{now}'.encode())

  def release(self):
    if self.fd is not None:
      fcntl.flock(self.fd, fcntl.LOCK_UN)
      os.close(self.fd)
      self.fd = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.release()


class Preemption:
  """SIGTERM -> checkpoint at the next step boundary, on every process.

  Single process: a SIGTERM handler sets a flag. Multi-process
  (jax.distributed): JAX's preemption service already catches SIGTERM on any
  process and `reached_preemption_sync_point` turns True on all processes at
  the same step, so they save the same step and stop together.
  """

  def __init__(self):
    import jax
    self.requested = False
    self.multi = jax.process_count() > 1
    self.previous = None
    if not self.multi:
      self.previous = signal.signal(signal.SIGTERM, self._handler)

  def _handler(self, signum, frame):
    del signum, frame
    self.requested = True

  def reached(self, step):
    """True when the run should save `step` (updates done) and stop."""
    if not self.multi:
      return self.requested
    from jax.experimental import multihost_utils
    try:
      return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # preemption service disabled
      return False

  def restore(self):
    """Puts back the previous SIGTERM handler."""
    if self.previous is not None:
      signal.signal(signal.SIGTERM, self.previous)
      self.previous = None
