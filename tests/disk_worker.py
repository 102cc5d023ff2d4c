"""A tiny decoded-cache build (used by test_disk.py; not a test itself). As a script: one of
several processes building the same cache at once.

argv: cache_folder barrier_folder number
"""
import os
import sys
import time

import numpy as np

from affectjax.data import decoded_cache
from affectjax.data import index as index_lib

SIZE = 16  # decoded pixels per side: 768 bytes a frame


def tiny_index(root, num_videos=2, frames=6) -> index_lib.AffWild2Index:
  n = num_videos * frames
  return index_lib.AffWild2Index(
      tuple(f'video{v}' for v in range(num_videos)),
      np.repeat(np.arange(num_videos, dtype=np.int32), frames),
      np.tile(np.arange(1, frames + 1, dtype=np.int32), num_videos), np.zeros(n, np.int8),
      np.zeros((n, 12), np.int8), np.zeros((n, 2), np.float32), str(root), 'train', {})


def jpeg() -> bytes:
  import simplejpeg
  image = np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
  return simplejpeg.encode_jpeg(image, quality=90)


class Source:
  """Records of one JPEG; `delay` seconds per read, `fail` raised on the first read."""

  def __init__(self, delay=0.0, fail=None):
    self.jpeg, self.delay, self.fail = jpeg(), delay, fail

  def __getitems__(self, rows):
    time.sleep(self.delay)
    if self.fail is not None:
      raise self.fail
    return [{'jpeg': self.jpeg} for _ in rows]


def build(folder, source=None):
  return decoded_cache.build(source or Source(), tiny_index(folder), SIZE, str(folder),
                             'test:origin', threads=2)


def main(folder, barrier, number):
  open(os.path.join(barrier, number), 'w').close()
  while len(os.listdir(barrier)) < 2:  # start together
    time.sleep(0.01)
  cache = build(folder, Source(delay=1.0))
  print('inode', os.stat(os.path.join(cache.path, 'images.npy')).st_ino, flush=True)


if __name__ == '__main__':
  main(*sys.argv[1:])
