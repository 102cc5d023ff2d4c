"""A run's workdir: the lock that keeps two trainings out of one workdir, and write checks.

`WorkdirLock` holds an advisory lock (`fcntl.flock`) on `WORKDIR/run.lock` for as long as a
training runs, and writes who holds it (host, pid, start time, command line) into the file.
A second training on the same workdir stops at once with a message naming the first. The
kernel releases the lock when its process ends, however it ends (SIGKILL, a crash, a reboot),
so a lock file left behind by a dead run is stale by construction: the next run takes it over
and says whose it was. On filesystems without working `flock` (some network mounts) the lock
falls back to the file's content: the lock is stale if it names a process of this host that is
no longer alive; another host's lock cannot be checked and must be removed by hand.

Evaluation and prediction do not lock: they only read the checkpoints and write their results
under names of their own (atomically, see `affectjax.files`).
"""
import fcntl
import json
import os
import socket
import sys
import time

from affectjax import files

LOCK_FILE = 'run.lock'


class WorkdirLocked(RuntimeError):
  """Another process trains in this workdir."""


def _process_started(pid: int) -> str | None:
  """The start time of `pid` in clock ticks since boot (Linux), to tell a reused pid apart."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _alive(holder: dict) -> bool:
  """Whether the process a lock file names still runs (same pid, same start time)."""
  pid = int(holder.get('pid', -1))
  if pid <= 0 or not files.process_alive(pid):
    return False
  started = _process_started(pid)
  return started is None or holder.get('process_started') in (None, started)


def describe(holder: dict) -> str:
  if not holder.get('pid'):  # read while its holder was writing it
    return 'another process'
  when = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.get('time', 0)))
  return (f"pid {holder.get('pid')} on host {holder.get('host')}, started {when}: "
          f"{holder.get('command', '?')}")


class WorkdirLock:
  """`with WorkdirLock(workdir):` trains with the workdir to itself (see the module doc)."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
    self.enabled = enabled
    self._file = None

  def _read_holder(self) -> dict:
    try:
      with open(self.path) as f:
        return json.load(f)
    except (OSError, ValueError):
      return {}

  def acquire(self) -> None:
    if not self.enabled:
      return
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    for _ in range(100):
      self._try_acquire()
      try:  # the path still names the locked file (not one removed by its previous holder)
        if os.stat(self.path).st_ino == os.fstat(self._file.fileno()).st_ino:
          return
      except FileNotFoundError:
        pass
      self._file.close()
      self._file = None
    raise WorkdirLocked(f'{self.path}: could not take the lock (it keeps changing)')

  def _try_acquire(self) -> None:
    previous = self._read_holder()
    f = open(self.path, 'a+')
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.close()
      raise WorkdirLocked(
          f'{os.path.dirname(self.path)} is in use by another training run ({describe(previous)}). '
          'Wait for it to finish or stop it, or choose another --workdir.') from None
    except OSError as e:
      if e.errno not in files.LOCK_UNSUPPORTED:
        f.close()
        raise
      # No flock here: judge by the content (see the module doc).
      if previous and _alive(previous) or previous.get('host') not in (
          None, socket.gethostname()):
        f.close()
        raise WorkdirLocked(
            f'{self.path} names another training run ({describe(previous)}) and this '
            'filesystem cannot lock files: if that run has ended, delete the file.') from None
    if previous:
      print(f'Taking over the lock of an earlier run that ended without releasing it '
            f'({describe(previous)})', flush=True)
    holder = {'host': socket.gethostname(), 'pid': os.getpid(), 'time': time.time(),
              'process_started': _process_started(os.getpid()),
              'command': ' '.join([os.path.basename(sys.executable)] + sys.argv)}
    f.seek(0)
    f.truncate()
    json.dump(holder, f)
    f.flush()
    self._file = f

  def release(self) -> None:
    if self._file is None:
      return
    try:
      os.remove(self.path)  # an orderly end leaves nothing behind
    except OSError:
      pass
    self._file.close()  # closing releases the flock
    self._file = None

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()
