"""Workdir guards: an exclusive lock for the run's lifetime and a preemption
flag that every process agrees on at step boundaries.

The workdir may be relative, absolute or an object-store URI
(mae_jax.paths.resolve). Two lock schemes:

- local workdirs: `fcntl.flock` on WORKDIR/.lock (process i > 0 of a
  multi-process run: WORKDIR/.lock.i), so a crashed run never leaves a stale
  lock: the kernel drops it with the process. flock is advisory and may not
  work across hosts on some network file systems.
- object stores (gs://...), where nothing like flock exists: a heartbeat
  lock file. It holds the owner, a random token and the time of its last
  heartbeat, which a thread of the lock rewrites every `stale_after / 4`
  seconds. A lock whose heartbeat is younger than `stale_after` refuses the
  run; an older one (its run died) is taken over with a warning on stderr.
  Release deletes the file. Not a true mutex: the store offers no atomic
  create here, so two runs starting within about a second of each other
  can both read "free" and both write; each reads the file back after
  `settle` seconds and only the one whose token is there keeps the lock,
  but a write delayed past that check can still leave both running. A
  crashed run blocks the workdir for up to `stale_after` seconds. Ages are
  measured against the writer's wall clock, so the hosts' clocks must agree
  to well within `stale_after`.
"""
import datetime
import fcntl
import json
import os
import signal
import socket
import sys
import threading
import time
import uuid

from mae_jax import paths
from mae_jax.errors import WorkdirLocked

STALE_AFTER_S = 60.0  # a heartbeat lock older than this is taken over


def _owner():
  now = datetime.datetime.now().isoformat(timespec='seconds')
  return f'pid {os.getpid()} on {socket.gethostname()} since {now}'


class WorkdirLock:
  """Holds WORKDIR/.lock (or .lock.<process>) until `release` or exit.

  scheme: 'flock' (local), 'heartbeat' (object stores) or 'auto' (the
  right one for the path); see the module docstring. A heartbeat lock is
  kept fresh by its own thread (the training loop does nothing for it);
  `stale_after` is the age at which it may be taken over, `settle` the
  seconds waited before reading a new lock file back.
  """

  def __init__(self, workdir, process_index=0, scheme='auto',
               stale_after=STALE_AFTER_S, settle=1.0):
    self.shown = os.fspath(workdir)
    workdir = paths.resolve(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    name = '.lock' if process_index == 0 else f'.lock.{process_index}'
    self.path = workdir / name
    if scheme == 'auto':
      scheme = 'heartbeat' if paths.is_uri(workdir) else 'flock'
    if scheme not in ('flock', 'heartbeat'):
      raise ValueError(f"unknown lock scheme {scheme!r}; 'auto', 'flock' or "
                       "'heartbeat'")
    self.fd = self.token = self._thread = None
    self.stale_after = stale_after
    if scheme == 'flock':
      self._flock()
    else:
      self._heartbeat_lock(settle)

  def _refused(self, owner):
    return WorkdirLocked(
        f'workdir {self.shown} is in use by another run ({owner or "unknown"}; '
        f'lock file {self.path}); wait for it to end or choose another '
        '--workdir')

  def _flock(self):
    self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      owner = os.read(self.fd, 200).decode(errors='replace').strip()
      os.close(self.fd)
      self.fd = None
      raise self._refused(owner) from None
    os.ftruncate(self.fd, 0)
    os.write(self.fd, _owner().encode())

  def _read(self):
    """The lock file's {'owner', 'token', 'heartbeat'}, or None if absent.
    A file that is not such a record counts as written at its modification
    time by the owner its text names."""
    try:
      text = self.path.read_text()
    except FileNotFoundError:
      return None
    try:
      held = json.loads(text)
      float(held['heartbeat'])
      return held
    except (ValueError, TypeError, KeyError):
      return {'owner': ' '.join(text.split())[:200], 'token': None,
              'heartbeat': self.path.stat().mtime}

  def _heartbeat_lock(self, settle):
    held = self._read()
    if held is not None:
      age = time.time() - float(held['heartbeat'])
      if age < self.stale_after:
        raise self._refused(held.get('owner'))
      print(f'warning: taking over the lock of workdir {self.shown} from '
            f'{held.get("owner") or "an unknown run"}: no heartbeat for '
            f'{age:.0f} s (lock file {self.path})', file=sys.stderr)
    self.token = uuid.uuid4().hex
    self.owner = _owner()
    self._refresh()
    time.sleep(settle)
    held = self._read()
    if not held or held.get('token') != self.token:
      self.token = None
      raise self._refused(held and held.get('owner'))
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._beat, daemon=True,
                                    name='workdir-lock-heartbeat')
    self._thread.start()

  def _refresh(self):
    """Rewrites the heartbeat lock file with the current time."""
    self.path.write_text(json.dumps({'owner': self.owner, 'token': self.token,
                                     'heartbeat': time.time()}))

  def _beat(self):
    while not self._stop.wait(self.stale_after / 4):
      try:
        held = self._read()
        if held is not None and held.get('token') != self.token:
          print(f'warning: the lock of workdir {self.shown} was taken over '
                f'by {held.get("owner") or "another run"}', file=sys.stderr)
          return
        self._refresh()
      except OSError as e:  # retried at the next beat
        print(f'warning: cannot refresh the lock file {self.path}: {e}',
              file=sys.stderr)

  def release(self):
    if self.fd is not None:
      fcntl.flock(self.fd, fcntl.LOCK_UN)
      os.close(self.fd)
      self.fd = None
    if self.token is not None:
      self._stop.set()
      self._thread.join()
      try:
        held = self._read()
        if held is not None and held.get('token') == self.token:
          self.path.unlink(missing_ok=True)
      except OSError as e:  # the file goes stale and is taken over later
        print(f'warning: cannot remove the lock file {self.path}: {e}',
              file=sys.stderr)
      self.token = None

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
