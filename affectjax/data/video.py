"""Videos in, streamed: frames as RGB uint8 chunks with their numbers and times (PyAV, FFmpeg).

- Streaming: frames come in chunks of `chunk` frames, so memory stays flat whatever the video's
  length (benchmarks/bench_analyze.py measures peak RSS against video length).
- Frame numbers are 0-based decode positions, so the numbers stay those of the video's frames
  (Aff-Wild2's crop k is its video's k-th frame). After a corrupt packet that decodes to nothing,
  the next frame's number is advanced by its timestamp, so the lost frame leaves its number
  unused; otherwise frames are numbered in order, whatever the timestamps (a variable-frame-rate
  video's intervals vary). Times are presentation times in seconds from the stream's start.
- Rotation metadata (the display matrix of phone videos) is applied, as players do.
- A corrupt packet is counted and skipped within `max_bad_fraction` of the frames; an unreadable
  file, a file without a video stream and a video without frames are VideoErrors naming the file.

PyAV is the `video` extra (pip install 'affectjax[video]'); OpenCV's FFmpeg backend decodes the
same files and is compared on speed in benchmarks/bench_analyze.py.
"""
import dataclasses
import os
from typing import Iterator

import cv2
import numpy as np

SUFFIXES = ('.mp4', '.avi', '.mkv', '.mov', '.webm', '.m4v', '.mpg', '.mpeg', '.wmv', '.flv')


class VideoError(ValueError):
  """A video that cannot be read: names the file and what is wrong."""


@dataclasses.dataclass(frozen=True)
class VideoInfo:
  path: str
  width: int  # as displayed (after rotation)
  height: int
  fps: float
  num_frames: int  # the container's count; 0 where it does not say
  duration: float  # seconds; 0.0 where the container does not say
  rotation: int  # degrees counter-clockwise the decoded frames are turned to display them


@dataclasses.dataclass
class Chunk:
  index: np.ndarray  # int64 [n], 0-based frame numbers
  time: np.ndarray  # float64 [n], seconds
  images: np.ndarray  # uint8 [n, H, W, 3], RGB


def _av():
  try:
    import av  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("reading videos needs PyAV: pip install 'affectjax[video]'") from e
  return av


def _open(path: str):
  av = _av()
  if not os.path.isfile(path):
    raise VideoError(f'{path}: no such video file')
  try:
    container = av.open(path)
  except (av.error.FFmpegError, UnicodeDecodeError) as e:
    raise VideoError(f'{path}: not a readable video ({e})') from e
  if not container.streams.video:
    container.close()
    raise VideoError(f'{path}: has no video stream')
  return container


def _fps(stream) -> float:
  rate = stream.average_rate or stream.guessed_rate or stream.base_rate
  return float(rate) if rate else 25.0


def _rotation(frame) -> int:
  return int(round(getattr(frame, 'rotation', 0) or 0)) % 360


def rgb(frame) -> np.ndarray:
  """uint8 [H, W, 3] RGB of a decoded frame. The common 4:2:0 frames are converted by OpenCV
  (BT.601, video range, as FFmpeg's default conversion): about 8x faster than PyAV's rgb24
  reformat here (benchmarks/bench_analyze.py); other formats go through FFmpeg."""
  if frame.format.name == 'yuv420p' and frame.width % 2 == 0 and frame.height % 2 == 0:
    return cv2.cvtColor(frame.to_ndarray(format='yuv420p'), cv2.COLOR_YUV2RGB_I420)
  return frame.to_ndarray(format='rgb24')


def upright(image: np.ndarray, rotation: int) -> np.ndarray:
  """The frame as displayed: turned `rotation` degrees counter-clockwise (FFmpeg's display
  matrix angle, as PyAV's frame.rotation gives it; a phone's portrait video reads -90 = 270)."""
  quarter = (rotation // 90) % 4
  return np.ascontiguousarray(np.rot90(image, k=quarter)) if quarter else image


def probe(path: str) -> VideoInfo:
  """The video's displayed size, frame rate, frame count and rotation (decodes one frame)."""
  container = _open(path)
  try:
    stream = container.streams.video[0]
    first = next(container.decode(stream), None)
    if first is None:
      raise VideoError(f'{path}: has no frames')
    rotation = _rotation(first)
    width, height = first.width, first.height
    if rotation in (90, 270):
      width, height = height, width
    duration = (float(stream.duration * stream.time_base) if stream.duration and
                stream.time_base else (container.duration or 0) / 1e6)
    return VideoInfo(path, width, height, _fps(stream), int(stream.frames or 0), duration,
                     rotation)
  except _av().error.FFmpegError as e:
    raise VideoError(f'{path}: not a readable video ({e})') from e
  finally:
    container.close()


def read(path: str, chunk: int = 64, max_bad_fraction: float = 0.01,
         counts: dict | None = None) -> Iterator[Chunk]:
  """Chunks of at most `chunk` frames of `path`, in order. `counts` (if given) receives 'frames'
  (decoded) and 'bad' (packets that did not decode) as it goes; more bad packets than
  `max_bad_fraction` of the frames (at least 1 allowed) is a VideoError at the end."""
  av = _av()
  counts = {} if counts is None else counts
  counts.update(frames=0, bad=0)
  container = _open(path)
  stream = container.streams.video[0]
  stream.thread_type = 'AUTO'
  fps, base = _fps(stream), stream.time_base
  start = stream.start_time or 0
  index, times, images, last, size, previous = [], [], [], -1, None, None
  lost = False  # a packet failed to decode since the last frame
  try:
    for packet in container.demux(stream):
      try:
        decoded = packet.decode()
      except av.error.InvalidDataError:
        counts['bad'] += 1
        lost = True
        continue
      for frame in decoded:
        t = float((frame.pts - start) * base) if frame.pts is not None and base else \
            (last + 1) / fps
        if not lost:
          last += 1
        elif previous is None:  # lost before the first frame
          last = max(0, int(round(t * fps)))
        else:  # the frames the time since the previous frame holds (a variable rate drifts)
          last += max(1, int(round((t - previous) * fps)))
        lost, previous = False, t
        image = upright(rgb(frame), _rotation(frame))
        if size is None:
          size = image.shape
        elif image.shape != size:  # a stream that changes size mid-way: the first size kept
          image = np.asarray(frame.reformat(width=size[1], height=size[0],
                                            format='rgb24').to_ndarray())
        index.append(last)
        times.append(t)
        images.append(image)
        counts['frames'] += 1
        if len(images) == chunk:
          yield Chunk(np.asarray(index, np.int64), np.asarray(times), np.stack(images))
          index, times, images = [], [], []
  except av.error.FFmpegError as e:
    raise VideoError(f'{path}: decoding stopped after {counts["frames"]} frames ({e})') from e
  finally:
    container.close()
  if images:
    yield Chunk(np.asarray(index, np.int64), np.asarray(times), np.stack(images))
  if counts['frames'] == 0:
    raise VideoError(f'{path}: has no frames that decode')
  if counts['bad'] > max(1, max_bad_fraction * counts['frames']):
    raise VideoError(f'{path}: {counts["bad"]} packets did not decode, over the tolerated '
                     f'{max_bad_fraction:.1%} of {counts["frames"]} frames (max_bad_fraction)')


def video_name(path: str) -> str:
  """The name a video's faces and outputs are given: its file name without the suffix."""
  return os.path.splitext(os.path.basename(path))[0]


def list_videos(folder: str) -> list:
  """The videos of `folder` (by suffix), sorted; other files are named in an error, since a
  folder mixing videos and other files is likely the wrong folder (hidden files are ignored),
  and so are two videos of one name (clip.mp4 and clip.avi), whose outputs would collide."""
  if not os.path.isdir(folder):
    raise VideoError(f'{folder}: no such folder')
  names = sorted(n for n in os.listdir(folder) if not n.startswith('.'))
  other = [n for n in names if not n.lower().endswith(SUFFIXES) or
           not os.path.isfile(os.path.join(folder, n))]
  if other:
    raise VideoError(f'{folder}: holds files that are not videos ({", ".join(other[:5])}'
                     f'{" ..." if len(other) > 5 else ""}); videos end in {", ".join(SUFFIXES)}')
  if not names:
    raise VideoError(f'{folder}: holds no videos')
  seen = {}
  for n in names:
    if (name := video_name(n)) in seen:
      raise VideoError(f'{folder}: {seen[name]} and {n} would both be named {name!r}; rename '
                       'one of them')
    seen[name] = n
  return [os.path.join(folder, n) for n in names]


def write(path: str, frames, fps: float = 25.0, codec: str = 'libx264', quality: int = 23) -> str:
  """Writes uint8 [H, W, 3] RGB frames (any iterable) as a video (the tests' and benchmarks'
  videos, and a user's own from image folders)."""
  av = _av()
  container = av.open(path, 'w')
  try:
    stream = None
    for image in frames:
      if stream is None:
        stream = container.add_stream(codec, rate=round(fps))
        stream.height, stream.width = image.shape[:2]
        stream.pix_fmt = 'yuv420p'
        if codec == 'libx264':
          stream.options = {'crf': str(quality), 'preset': 'veryfast'}
      for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(image), format='rgb24')):
        container.mux(packet)
    if stream is not None:
      for packet in stream.encode():
        container.mux(packet)
  finally:
    container.close()
  return path
