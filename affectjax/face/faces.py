"""A video's faces: detected on every frame, linked into tracks, aligned into crops (two passes).

1. `detect_video` decodes the video in chunks and runs the detector on each (boxes, scores and
   five landmarks per frame; only these small arrays are kept, so memory stays flat).
2. `faces_of` links the detections into tracks (affectjax.face.align.link: a face found again
   where it was last seen rejoins its track after any gap) and picks the faces to output: the
   largest track by default (the sum of its box areas), or every track of at least
   `min_frames` frames (`all_faces`; all of a shorter video's frames), named as Aff-Wild2
   names them (`video.video_name`): the video's name for one face, `<video>_left` /
   `<video>_right` for two (by their mean horizontal position), and `<video>_face<k>`
   (largest first) for more. Landmarks are optionally smoothed over time.
3. `aligned` decodes the video again and yields each face's aligned crops, warped on the device
   in fixed-size chunks (one compilation per video resolution).
"""
import dataclasses
import time
from typing import Callable, Iterator

import jax.numpy as jnp
import numpy as np
import tqdm

from affectjax.data import video as video_lib
from affectjax.face import align


MIN_FRAMES = 5  # the fewest frames of a face that `all_faces` keeps


@dataclasses.dataclass
class VideoDetections:
  info: video_lib.VideoInfo
  index: np.ndarray  # int64 [T] frame numbers (0-based)
  time: np.ndarray  # float64 [T] seconds
  boxes: np.ndarray  # float32 [T, K, 4] (x0, y0, x1, y1)
  scores: np.ndarray  # float32 [T, K]
  landmarks: np.ndarray  # float32 [T, K, 5, 2] (x, y)
  valid: np.ndarray  # bool [T, K]
  counts: dict  # 'frames' decoded, 'bad' packets skipped
  seconds: dict  # wall seconds per stage: 'decode', 'detect'


@dataclasses.dataclass
class Face:
  name: str
  present: np.ndarray  # bool [T]
  boxes: np.ndarray  # float32 [T, 4]
  scores: np.ndarray  # float32 [T]
  landmarks: np.ndarray  # float32 [T, 5, 2], smoothed where asked


def _timed(iterator, seconds: dict, key: str):
  """The items of `iterator`, the time spent producing them added to seconds[key]."""
  while True:
    start = time.perf_counter()
    try:
      item = next(iterator)
    except StopIteration:
      return
    finally:
      seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - start
    yield item


def detect_video(path: str, detect: Callable, chunk: int = 32, max_bad_fraction: float = 0.01,
                 progress: bool = True) -> VideoDetections:
  """Every frame's detections. `detect(images uint8 [n, H, W, 3])` returns numpy boxes [n, K, 4],
  scores [n, K], landmarks [n, K, 5, 2] and valid [n, K] (affectjax.face.detect.Detector)."""
  info = video_lib.probe(path)
  counts, seconds, parts = {}, {'decode': 0.0, 'detect': 0.0}, []
  with tqdm.tqdm(total=info.num_frames or None, unit='frame', disable=not progress,
                 desc=f'detect {video_lib.video_name(path)}', mininterval=2.0) as bar:
    chunks = video_lib.read(path, chunk, max_bad_fraction, counts)
    for piece in _timed(iter(chunks), seconds, 'decode'):
      start = time.perf_counter()
      n, images = len(piece.index), piece.images
      if n < chunk:  # a fixed batch shape: one compilation per resolution
        images = np.concatenate([images, np.zeros((chunk - n,) + images.shape[1:], np.uint8)])
      found = {k: np.asarray(v)[:n] for k, v in detect(images).items()}
      seconds['detect'] += time.perf_counter() - start
      parts.append(dict(found, index=piece.index, time=piece.time))
      bar.update(len(piece.index))
  joined = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  return VideoDetections(info, joined['index'], joined['time'],
                         joined['boxes'].astype(np.float32), joined['scores'].astype(np.float32),
                         joined['landmarks'].astype(np.float32), joined['valid'].astype(bool),
                         counts, seconds)


def faces_of(dets: VideoDetections, name: str, all_faces: bool = False, smooth_window: int = 1,
             min_frames: int = MIN_FRAMES, min_iou: float = 0.3, max_gap: int = 10) -> list:
  """The faces to output (see the module's docstring); [] when no face was found."""
  ids = align.link(dets.boxes, dets.valid, min_iou, max_gap)
  # (a video shorter than min_frames keeps the faces seen in all of its frames)
  order = align.tracks_by_size(ids, dets.boxes,
                               min(min_frames, len(dets.index)) if all_faces else 1)
  order = order if all_faces else order[:1]
  found = []
  for track in order:
    present, boxes, scores, points = align.follow(ids, track, dets.boxes, dets.scores,
                                                  dets.landmarks)
    found.append(Face('', present, boxes, scores, align.smooth(points, present, smooth_window)))
  if len(found) == 1:
    found[0].name = name
  elif len(found) == 2:
    centre = [np.mean((f.boxes[f.present, 0] + f.boxes[f.present, 2]) / 2) for f in found]
    for face, side in zip(found, ('left', 'right') if centre[0] <= centre[1] else
                          ('right', 'left')):
      face.name = f'{name}_{side}'
  else:
    for k, face in enumerate(found, 1):
      face.name = f'{name}_face{k}'
  return found


def aligned(path: str, dets: VideoDetections, found: list, size: int = 112, chunk: int = 32,
            seconds: dict | None = None) -> Iterator[tuple]:
  """(positions int [n] into the detections' frames, {face name: (present bool [n], crops uint8
  [n, size, size, 3])}) per chunk of a second decoding of the video; crops of absent frames are
  black. The decoded frames must be the first pass's (the same file, decoded the same way)."""
  seconds = {} if seconds is None else seconds
  counts, position = {}, 0
  rest = align.template(size)
  chunks = video_lib.read(path, chunk, 1.0, counts)
  for piece in _timed(iter(chunks), seconds, 'decode'):
    n = len(piece.index)
    rows = np.arange(position, position + n)
    if rows[-1] >= len(dets.index) or not np.array_equal(dets.index[rows], piece.index):
      raise video_lib.VideoError(f'{path}: decoded differently the second time (frames '
                                 f'{piece.index[0]}..{piece.index[-1]}); was it changed?')
    position += n
    start = time.perf_counter()
    images = piece.images
    if n < chunk:  # a fixed shape: one compilation per resolution
      images = np.concatenate([images, np.zeros((chunk - n,) + images.shape[1:], np.uint8)])
    out = {}
    for face in found:
      present = face.present[rows]
      points = np.broadcast_to(rest, (chunk, 5, 2)).copy()
      points[:n][present] = face.landmarks[rows][present]
      crops, _ = align.align(jnp.asarray(images), jnp.asarray(points), size)
      crops = np.array(crops)[:n]
      crops[~present] = 0
      out[face.name] = (present, crops)
    seconds['align'] = seconds.get('align', 0.0) + time.perf_counter() - start
    yield rows, out
