"""Unlabelled frames to predict: the ABAW test-set lists, as a frame index without labels.

Two kinds of list, as the organisers release them:
- a video list (ABAW1/2 and ABAW5+ per-task test sets): one video name per line
  (`<video>`, `<video>_left` / `_right`; a trailing `.txt`, `.mp4` or `.avi` is removed); every
  crop found in `cropped_aligned/<video>/` becomes a row;
- an image list (ABAW3/4 MTL test set): one `<video>/<frame>.jpg` per line, optionally followed
  by comma-separated fields (ignored) and optionally under a header line starting with `image`.
Blank lines are skipped. A malformed line stops with the file and line number; a list without
entries, and a listed video without a crop folder, are errors naming the file or the video. Labels of the returned index are all missing.
"""
import os

import numpy as np

from affectjax import labels
from affectjax.data import index as index_lib
from affectjax.data import layout as layout_lib

_VIDEO_SUFFIXES = ('.txt', '.mp4', '.avi')


class FrameListError(ValueError):
  """A test list that cannot be predicted: malformed (names the file and line), empty, or
  naming a video without face crops."""


def _lines(path: str):
  with open(path, encoding='utf-8-sig') as f:
    for number, line in enumerate(f, 1):
      line = line.strip()
      if line:
        yield number, line


def read_video_list(path: str) -> list:
  """Video names of a video list, in file order, without repeats."""
  videos = []
  for number, line in _lines(path):
    name = line.split(',')[0].strip()
    for suffix in _VIDEO_SUFFIXES:
      if name.lower().endswith(suffix):
        name = name[:-len(suffix)]
    if not name or '/' in name or ' ' in name:
      raise FrameListError(f'{path}:{number}: expected one video name per line, got {line!r}')
    if name not in videos:
      videos.append(name)
  if not videos:
    raise FrameListError(f'{path}: the list names no video (expected one video name per line)')
  return videos


def read_image_list(path: str) -> list:
  """(video, frame) pairs of an image list, in file order."""
  pairs = []
  for number, line in _lines(path):
    name = line.split(',')[0].strip()
    if number == 1 and name.lower().startswith('image'):
      continue  # header
    video, _, file_name = name.rpartition('/')
    stem = file_name[:-4] if file_name.lower().endswith('.jpg') else ''
    if not video or not stem.isdigit() or int(stem) < 1:
      raise FrameListError(f'{path}:{number}: expected <video>/<frame>.jpg with a 1-based frame '
                          f'number, got {name!r}')
    pairs.append((video, int(stem)))
  if not pairs:
    raise FrameListError(f'{path}: the list names no image (expected one <video>/<frame>.jpg '
                         'per line)')
  return pairs


def frames_index(root: str, *, videos=None, images=None, split: str = 'test'):
  """An `AffWild2Index` (labels missing) of the frames to predict: every crop of `videos`, or
  exactly the `images` pairs (their crops need not exist: unreadable frames are filled from a
  neighbour when the predictions are written). Rows sorted by (video, frame)."""
  if (videos is None) == (images is None):
    raise ValueError('give videos or images')
  image_dir = os.path.join(root, layout_lib.IMAGE_DIR)
  if videos is not None:
    names, per_video = list(videos), []
    for name in names:
      frames = layout_lib.image_frames(os.path.join(image_dir, name))
      if frames is None or frames.size == 0:
        raise FrameListError(f'test video {name!r} has no face crops in '
                             f'{os.path.join(image_dir, name)}')
      per_video.append(np.sort(frames))
  else:
    names = list(dict.fromkeys(video for video, _ in images))
    grouped = {name: [] for name in names}
    for video, frame in images:
      grouped[video].append(frame)
    per_video = [np.unique(np.array(grouped[name], np.int64)) for name in names]
  order = sorted(range(len(names)), key=lambda i: names[i])
  names = [names[i] for i in order]
  per_video = [per_video[i] for i in order]
  video_id = np.concatenate([np.full(f.size, i, np.int32) for i, f in enumerate(per_video)])
  frame = np.concatenate(per_video).astype(np.int32)
  n = frame.size
  summary = {'layout': 'test_list', 'tasks': list(labels.TASKS), 'kept': int(n),
             'videos': len(names)}
  return index_lib.AffWild2Index(tuple(names), video_id, frame,
                                 **labels.missing_labels(n, 'index'), root=os.fspath(root),
                                 split=split, summary=summary)
