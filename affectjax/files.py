"""Files and folders written whole or not at all, advisory locks, and what dead writers leave.

A file or folder is written under a temporary name next to its final one,
`<path>.tmp-<host>-<pid>`, and renamed into place when complete (`atomic_path`,
`atomic_write`, `atomic_dir`). Any failure inside (a full disk, Ctrl-C, a bug) removes the
temporary and re-raises, so readers see the previous version or the new one, never a partial
one. Two writers of the same path in one process must not overlap (the temporary name is per
process). A process killed outright (SIGKILL, SIGBUS, power loss) leaves its temporary behind:
`leftovers(folder)` finds them by their name and `remove_dead_leftovers(folder)` removes those
of this host whose process is gone (of another host, nobody here can tell whether it still
runs). `exclusive_lock` serialises processes (on any host sharing the filesystem, where it
supports `flock`) around work such as building a cache; `reserve` allocates a file's blocks
before it is written through a memory map. `DiskFullError`: an OSError (errno ENOSPC) whose
text is one line: what needed how much where, what is free, and what to do.
"""
import contextlib
import dataclasses
import errno
import fcntl
import os
import re
import shutil
import socket
import time

from affectjax import logs

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
LOCK_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL, errno.ENOLCK)
_TEMPORARY = re.compile(r'^(?P<target>.+)\.(?:tmp|old)-(?P<host>.+)-(?P<pid>\d+)$')


class DiskFullError(OSError):
  """A full disk (errno ENOSPC) told in one line: `str(error)` is the whole message."""

  def __init__(self, *args):  # (message), or (errno, message) when unpickled
    super().__init__(*((errno.ENOSPC,) + args if len(args) == 1 else args))

  def __str__(self) -> str:
    return self.strerror


def is_disk_full(error: BaseException) -> bool:
  """Whether `error` is an out-of-space (ENOSPC) or out-of-quota (EDQUOT) OSError, or an error
  of a library that reports it in its text (ArrayRecord's writer raises RuntimeError)."""
  if isinstance(error, OSError) and error.errno is not None:
    return error.errno in DISK_FULL_ERRNOS
  return any(os.strerror(code) in str(error) for code in DISK_FULL_ERRNOS)


def _short_write(error: BaseException) -> bool:
  """NumPy's errno-less OSError for a write cut short by a full disk ('5120000 requested and
  389056 written'); ENOSPC errors keep their type (callers add what they were writing)."""
  return (isinstance(error, OSError) and error.errno is None and
          ' requested and ' in str(error) and ' written' in str(error))


def disk_full_error(what: str, folder: str, fix: str, need: int | None = None,
                    leftovers_found=()) -> DiskFullError:
  """'not enough disk space for <what>: it needs 5.40 GB in <folder>, which has 1.20 GB free;
  <leftovers and their sizes>; <fix>' (free measured now)."""
  free = free_bytes(folder)
  text = f'not enough disk space for {what}: '
  text += (f'it needs {logs.format_bytes(need)} in {folder}, which has '
           f'{logs.format_bytes(free)} free' if need is not None else
           f'{folder} has {logs.format_bytes(free)} free')
  if leftovers_found:
    held = sum(item.size for item in leftovers_found)
    text += (f'; {logs.format_bytes(held)} of that disk are held by unfinished writes there '
             f'({describe_leftovers(leftovers_found)}): wait for those still running, remove '
             'those whose process is gone')
  return DiskFullError(f'{text}; {fix}')


def free_bytes(folder: str) -> int:
  """Free space of the disk of `folder` (or of its nearest existing parent)."""
  folder = os.path.abspath(folder)
  while not os.path.exists(folder) and os.path.dirname(folder) != folder:
    folder = os.path.dirname(folder)
  return shutil.disk_usage(folder).free


def is_writable(folder: str) -> bool:
  """Whether files can be created in `folder` (created if absent): tried, not inferred from
  permission bits (root ignores those; a read-only mount does not)."""
  try:
    os.makedirs(folder, exist_ok=True)
    with open(temporary_name(os.path.join(folder, '.write-test')), 'w'):
      pass
    os.remove(temporary_name(os.path.join(folder, '.write-test')))
    return True
  except OSError:
    return False


def temporary_name(path: str) -> str:
  """`<path>.tmp-<host>-<pid>`: where this process writes `path` before renaming it."""
  return f'{path}.tmp-{socket.gethostname()}-{os.getpid()}'


def remove(path: str) -> None:
  """Removes a file or a folder tree; nothing if absent."""
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path, ignore_errors=True)
  else:
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)


def _install(tmp: str, path: str) -> None:
  """Renames `tmp` to `path`; a folder already at `path` is moved aside, then removed."""
  if not (os.path.isdir(tmp) and os.path.isdir(path)):
    os.replace(tmp, path)
    return
  old = f'{path}.old-{socket.gethostname()}-{os.getpid()}'
  remove(old)
  os.rename(path, old)
  os.rename(tmp, path)
  remove(old)


def _remove_dead_copies(path: str) -> None:
  """Removes the temporaries of `path` left by dead processes of this host (killed outright
  while writing it), saying so."""
  folder, name = os.path.split(os.path.abspath(path))
  try:
    names = [n for n in os.listdir(folder) if n.startswith(name + '.')]
  except FileNotFoundError:
    return
  for other in names:
    match = _TEMPORARY.match(other)
    if (match and match['target'] == name and match['host'] == socket.gethostname() and
        not process_alive(int(match['pid']))):
      leftover = os.path.join(folder, other)
      size = allocated_bytes(leftover)
      remove(leftover)
      print(f'Removed {leftover} ({logs.format_bytes(size)}), left by process {match["pid"]} of '
            'this host, which is no longer running', flush=True)


@contextlib.contextmanager
def atomic_path(path: str):
  """Yields the temporary path to write `path` under (file or folder, the caller creates it);
  renamed to `path` when the block completes, removed when it raises."""
  tmp = temporary_name(path)
  remove(tmp)
  _remove_dead_copies(path)
  try:
    yield tmp
    _install(tmp, path)
  except BaseException as e:
    remove(tmp)
    if isinstance(e, DiskFullError) or not _short_write(e):
      raise
    raise disk_full_error(os.path.basename(path), os.path.dirname(os.path.abspath(path)),
                          'write it to a larger disk, or free space there') from e


@contextlib.contextmanager
def atomic_write(path: str, mode: str = 'w', **open_kwargs):
  """`with atomic_write(path) as f:` an open file whose content replaces `path` only when the
  block completes; on any failure the previous `path` stays as it was."""
  with atomic_path(path) as tmp:
    with open(tmp, mode, **open_kwargs) as f:
      yield f


@contextlib.contextmanager
def atomic_dir(path: str):
  """Yields a new empty temporary folder, which replaces the folder `path` when the block
  completes and is removed when it raises."""
  with atomic_path(path) as tmp:
    os.makedirs(tmp)
    yield tmp


def reserve(path: str, size: int) -> bool:
  """Allocates the first `size` bytes of the file `path` on disk (posix_fallocate), so writing
  them later (e.g. through a memory map, where a full disk is a SIGBUS) cannot run out of space.
  OSError (ENOSPC) when the disk cannot hold them; False where the filesystem cannot reserve
  (the caller must rely on a free-space check)."""
  fallocate = getattr(os, 'posix_fallocate', None)
  if fallocate is None:
    return False
  fd = os.open(path, os.O_RDWR)
  try:
    fallocate(fd, 0, size)
  except OSError as e:
    if e.errno in LOCK_UNSUPPORTED:
      return False
    raise
  finally:
    os.close(fd)
  return True


@contextlib.contextmanager
def exclusive_lock(path: str, on_wait=None):
  """Holds an advisory lock (fcntl.flock) on the file `path` (created if absent, left in place)
  for the block. While another process holds it, calls `on_wait(holder)` once ('host H pid P',
  as the holder wrote in the file) and waits. Where the filesystem has no flock, runs unlocked."""
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      if on_wait is not None:
        on_wait(_holder(fd))
      fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as e:
      if e.errno not in LOCK_UNSUPPORTED:
        raise
    _write_holder(fd, f'host {socket.gethostname()} pid {os.getpid()}\n')
    try:
      yield
    finally:
      _write_holder(fd, '')
  finally:
    os.close(fd)  # releases the lock


def _write_holder(fd: int, text: str) -> None:
  """Says who holds the lock, for those who wait; skipped on a full disk (it is only a note)."""
  try:
    os.ftruncate(fd, 0)
    if text:
      os.pwrite(fd, text.encode(), 0)
  except OSError as e:
    if not is_disk_full(e):
      raise


def _holder(fd: int) -> str:
  """What the holder of the lock file `fd` wrote in it (it writes just after locking)."""
  for _ in range(20):
    text = os.pread(fd, 200, 0).decode(errors='replace').strip()
    if text:
      return text
    time.sleep(0.01)
  return 'another process'


@dataclasses.dataclass(frozen=True)
class Leftover:
  """A temporary file or folder (`<target>.tmp-<host>-<pid>`) of some process."""
  path: str
  host: str
  pid: int
  size: int  # bytes allocated on disk

  @property
  def on_this_host(self) -> bool:
    return self.host == socket.gethostname()

  def describe(self) -> str:
    if self.on_this_host:
      state = 'still running' if process_alive(self.pid) else 'no longer running'
      whose = f'pid {self.pid} of this host, {state}'
    else:
      whose = f'pid {self.pid} of host {self.host}, which this host cannot check'
    return f'{os.path.basename(self.path)}: {logs.format_bytes(self.size)}, {whose}'


def describe_leftovers(items) -> str:
  return ', '.join(item.describe() for item in items)


def allocated_bytes(path: str) -> int:
  """Disk space a file or a folder's files take (allocated blocks: a sparse file counts only
  what was written)."""
  if not os.path.isdir(path):
    try:
      return os.lstat(path).st_blocks * 512
    except OSError:
      return 0
  total = 0
  for folder, _, names in os.walk(path):
    total += sum(allocated_bytes(os.path.join(folder, name)) for name in names)
  return total


def process_alive(pid: int) -> bool:
  """Whether process `pid` of this host exists."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, another user's
    return True
  return True


def leftovers(folder: str) -> list:
  """The temporaries in `folder` of other processes (this host or others), sorted by name."""
  found = []
  try:
    names = sorted(os.listdir(folder))
  except FileNotFoundError:
    return found
  for name in names:
    match = _TEMPORARY.match(name)
    if match is None:
      continue
    item = Leftover(os.path.join(folder, name), match['host'], int(match['pid']), 0)
    if not (item.on_this_host and item.pid == os.getpid()):
      found.append(dataclasses.replace(item, size=allocated_bytes(item.path)))
  return found


def remove_dead_leftovers(folder: str, log=print) -> list:
  """Removes the temporaries in `folder` left by dead processes of this host, saying so through
  `log`; reports those of other hosts (which may still be writing). Returns what remains."""
  remaining = []
  for item in leftovers(folder):
    if item.on_this_host and not process_alive(item.pid):
      remove(item.path)
      log(f'Removed {item.path} ({logs.format_bytes(item.size)}), left by process {item.pid} '
          'of this host, which is no longer running')
      continue
    remaining.append(item)
    if not item.on_this_host:
      log(f'Found {item.path} ({logs.format_bytes(item.size)}), left by process {item.pid} of '
          f'host {item.host}, which may still be writing it: remove it by hand if not')
  return remaining
