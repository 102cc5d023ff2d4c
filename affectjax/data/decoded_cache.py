"""Decoded-frame cache: each frame of a split decoded once, kept as uint8 pixels on local disk.

With `data.decoded_cache=True` the pipeline decodes every frame of the split once, at the
training size, into a memory-mapped `.npy` array (`images.npy`, uint8 [N, S, S, 3] for the N
rows of the index, plus `ok.npy`, bool [N], False for frames that could not be read or
decoded), and afterwards reads pixels from it instead of decoding JPEG. Host augmentation
(flip, warp, colour) is still applied per batch, to the same pixels as from the JPEG: batches
are identical with and without the cache (the decoder output is the same; see
`host_augment.RowWriter.place`). Bad frames keep their meaning: a frame with `ok=False` is counted,
substituted (training) or left as padding (evaluation) exactly as an undecodable JPEG.

Why: on a GPU host the JPEG decode is the input pipeline's main cost (about 11,000 crops/s per
core at 112x112, see docs/benchmarks.md), while copying a decoded 112x112 crop is about ten
times cheaper. The price is disk (and page cache) space: 37.6 KB per frame at 112x112 against
about 5 KB of JPEG, e.g. 5.4 GB for the 142k training frames of s-Aff-Wild2 and 53 GB for 1.4M
frames. The build reserves the whole images file on disk first (`files.reserve`), so a disk
that cannot hold it is a one-line `files.DiskFullError` (sizes, folder, leftovers, the fix)
before any pixel is written, never a SIGBUS through the memory map. grain's own cache
(`CacheIterDataset`) keeps an iterator's elements in order in one process's memory, which fits
neither per-epoch shuffled random access nor worker processes; this cache is a file, so worker
processes and the page cache share it.

Location: `data.decoded_cache_dir`, else `data.cache_dir`, else `~/.cache/affectjax`, in a
folder named after a digest of the split's frames (videos and frame numbers, not labels), the
data root or packed folder, the image size and this format's version: a changed index or image
size gives a new folder (old folders are not deleted: remove them by hand). Replacing crop
files in place is not detected; delete the cache folder after doing so. Several processes
may ask for the same cache at once (e.g. one per host): the first builds it under a lock
(`<cache>.lock`, fcntl.flock), the others wait for it and open what it built. A build writes
`<cache>.tmp-<host>-<pid>` and renames it into place; a failure (a full disk, Ctrl-C, a decode
error) removes it, and the next build removes the leftovers of killed processes of its host and
reports those of other hosts.
"""
import concurrent.futures
import functools
import hashlib
import json
import os
import time

import numpy as np

from affectjax import files
from affectjax import logs
from affectjax.data import host_augment

FORMAT = 'affectjax.decoded'
VERSION = 1
_CHUNK = 512  # rows decoded per task
_FIX = 'set data.decoded_cache_dir to a larger disk, or data.decoded_cache=False'


def cache_key(index, image_size: int, origin: str) -> str:
  """Digest of what determines the cached pixels: the frames (in row order), where their
  bytes come from, the output size and this format's version."""
  h = hashlib.sha1(json.dumps([FORMAT, VERSION, int(image_size), origin, index.split]).encode())
  h.update('\n'.join(index.video_names).encode())
  for column in (index.video_id, index.frame):
    h.update(np.ascontiguousarray(column).tobytes())
  return h.hexdigest()


def cache_folder(data_config) -> str:
  base = data_config.decoded_cache_dir or data_config.cache_dir or os.path.join(
      os.path.expanduser('~'), '.cache', 'affectjax')
  return os.path.join(base, 'decoded')


class DecodedSource:
  """Random-access source over a built cache: row i gives `{'image': uint8 [S, S, 3] (a view
  of the memory map) or None for a bad frame, 'index': int32 i}`. Labels are the index's
  (the pipeline reads them from there). Pickles as its path (worker processes reopen it)."""

  def __init__(self, path: str):
    self.path = path
    meta_path = os.path.join(path, 'meta.json')
    with open(meta_path) as f:
      self.meta = json.load(f)
    self.images = np.load(os.path.join(path, 'images.npy'), mmap_mode='r')
    self.ok = np.load(os.path.join(path, 'ok.npy'))
    if self.images.shape[0] != self.meta['num_frames'] or self.ok.shape != (
        self.meta['num_frames'],):
      raise ValueError(f'{path}: arrays do not match meta.json ({self.images.shape[0]} images, '
                       f'{self.ok.shape[0]} flags, {self.meta["num_frames"]} frames)')

  def __len__(self) -> int:
    return self.images.shape[0]

  def __getitem__(self, row) -> dict:
    row = int(row)
    return {'image': self.images[row] if self.ok[row] else None, 'index': np.int32(row)}

  def __getitems__(self, rows) -> list:
    return [self[r] for r in rows]

  def __getstate__(self):
    return {'path': self.path}

  def __setstate__(self, state):
    self.__init__(state['path'])

  def __repr__(self) -> str:
    return f'DecodedSource({self.path!r}, {len(self)} frames)'


def _open_if_valid(path: str, key: str, num_frames: int, image_size: int):
  try:
    source = DecodedSource(path)
  except (OSError, ValueError, KeyError):
    return None
  meta = source.meta
  if (meta.get('format') != FORMAT or meta.get('version') != VERSION or meta.get('key') != key
      or meta.get('num_frames') != num_frames
      or source.images.shape[1:] != (image_size, image_size, 3)):
    return None
  return source


def _decode_rows(source, images, ok, start: int, stop: int, image_size: int) -> int:
  """Decodes rows start..stop-1 of `source` into `images`; returns the bad-frame count."""
  records = source.__getitems__(list(range(start, stop)))
  bad = 0
  for row, record in zip(range(start, stop), records):
    image = host_augment.decode_jpeg(record['jpeg'], image_size)
    if image is None:
      images[row] = 0
      bad += 1
    else:
      images[row] = image
      ok[row] = True
  return bad


def _quiet(*args) -> None:
  del args


def build(source, index, image_size: int, folder: str, origin: str, *, threads: int = 0,
          progress: bool = True) -> DecodedSource:
  """The decoded cache of `index`'s frames (read through `source`, a JPEG-record source),
  built in `folder` unless a valid one is there already. One process builds it, the others
  wait for it (a lock file `<cache>.lock`) and open what it built. A full disk is a
  `files.DiskFullError` before any pixel is written; any failure leaves no partial folder."""
  key = cache_key(index, image_size, origin)
  path = os.path.join(folder, f'{index.split}-{image_size}px-{key[:16]}')
  num_frames = len(index)
  cached = _open_if_valid(path, key, num_frames, image_size)
  if cached is not None:
    return cached
  log = functools.partial(print, flush=True) if progress else _quiet

  def on_wait(holder):
    log(f'Waiting for {holder} to finish building the decoded cache of the {index.split} '
        f'split ({path})')

  need = num_frames * image_size * image_size * 3
  what = f'the decoded cache of the {index.split} split'
  try:
    os.makedirs(folder, exist_ok=True)
    with files.exclusive_lock(f'{path}.lock', on_wait):
      cached = _open_if_valid(path, key, num_frames, image_size)
      if cached is not None:  # built by the process this one waited for
        log(f'Opened the decoded cache of the {index.split} split built meanwhile: {path}')
        return cached
      files.remove(path)  # unreadable or from an interrupted rename: rebuild it
      others = files.remove_dead_leftovers(folder, log)
      if need > files.free_bytes(folder):
        raise files.disk_full_error(what, folder, _FIX, need, others)
      _build(source, index, image_size, path, key, origin, threads, log)
  except OSError as e:
    if files.is_disk_full(e) and not isinstance(e, files.DiskFullError):
      raise files.disk_full_error(what, folder, _FIX, need, files.leftovers(folder)) from e
    raise
  result = _open_if_valid(path, key, num_frames, image_size)
  if result is None:
    raise OSError(f'{path}: the decoded cache just written could not be opened again')
  return result


def _build(source, index, image_size, path, key, origin, threads, log):
  """Writes the cache into a temporary folder renamed to `path` when complete."""
  num_frames = len(index)
  shape = (num_frames, image_size, image_size, 3)
  threads = threads or min(32, os.cpu_count() or 1)
  start_time = time.perf_counter()
  with files.atomic_dir(path) as tmp:
    images = np.lib.format.open_memmap(os.path.join(tmp, 'images.npy'), mode='w+',
                                       dtype=np.uint8, shape=shape)
    ok = np.zeros(num_frames, bool)
    try:
      # Every block of the file on disk before any pixel goes through the memory map (where
      # a full disk is a SIGBUS); where the filesystem cannot, the check before stands.
      files.reserve(os.path.join(tmp, 'images.npy'), images.offset + images.nbytes)
      log(f'Decoding the {index.split} split once into {path} ({num_frames} frames, '
          f'{logs.format_bytes(images.nbytes)}, {threads} threads)')
      bad = _decode_all(source, images, ok, image_size, threads, log)
      images.flush()
    finally:
      del images  # unmapped now, so a failure's removed file frees its space at once
    np.save(os.path.join(tmp, 'ok.npy'), ok)
    meta = {'format': FORMAT, 'version': VERSION, 'key': key, 'num_frames': num_frames,
            'image_size': int(image_size), 'split': index.split, 'origin': origin,
            'bad_frames': int(bad)}
    with open(os.path.join(tmp, 'meta.json'), 'w') as f:
      json.dump(meta, f, indent=1)
  log(f'Decoded cache ready: {num_frames} frames ({bad} could not be read or decoded) in '
      f'{time.perf_counter() - start_time:.1f} s')


def _decode_all(source, images, ok, image_size: int, threads: int, log) -> int:
  """Decodes every row of `source` into `images` / `ok` with a thread pool (the decoder
  releases the GIL); returns the bad-frame count. On a failure (or Ctrl-C) the rows not started
  are cancelled and the running ones finish before it propagates."""
  num_frames = len(ok)
  start_time = last_print = time.perf_counter()
  bad = done = 0
  pool = concurrent.futures.ThreadPoolExecutor(threads)
  try:
    futures = {pool.submit(_decode_rows, source, images, ok, lo, min(lo + _CHUNK, num_frames),
                           image_size): min(_CHUNK, num_frames - lo)
               for lo in range(0, num_frames, _CHUNK)}
    for future in concurrent.futures.as_completed(futures):
      bad += future.result()
      done += futures[future]
      now = time.perf_counter()
      if now - last_print > 10 or done == num_frames:
        last_print = now
        log(f'  decoded {done}/{num_frames} frames ({done / (now - start_time):.0f}/s)')
  finally:
    pool.shutdown(wait=True, cancel_futures=True)
  return bad
