"""Videos in (affectjax/data/video.py): frames, numbers and times as written, rotation metadata as
players apply it (OpenCV's FFmpeg backend as the reference), corrupt packets counted and skipped
within the tolerance, and a clear error for each kind of bad input."""
import fractions
import struct

import cv2
import numpy as np
import pytest

from affectjax.data import video

import av  # pylint: disable=wrong-import-order


def _frames(n, h=48, w=64, seed=0):
  rng = np.random.default_rng(seed)
  base = rng.integers(0, 255, (h // 8, 40, 3), dtype=np.uint8)  # 40 distinct shifts
  out = []
  for k in range(n):  # smooth pictures (codecs keep them), each frame a little different
    image = cv2.resize(np.roll(base, k, axis=1), (w, h), interpolation=cv2.INTER_LINEAR)
    out.append(image)
  return out


def _mjpeg(path, frames):
  container = av.open(str(path), 'w')
  stream = container.add_stream('mjpeg', rate=25)
  stream.height, stream.width = frames[0].shape[:2]
  stream.pix_fmt = 'yuvj420p'
  for image in frames:
    for packet in stream.encode(av.VideoFrame.from_ndarray(image, format='rgb24')):
      container.mux(packet)
  for packet in stream.encode():
    container.mux(packet)
  container.close()
  return path


def test_frames_numbers_and_times_as_written(tmp_path):
  frames = _frames(37)
  path = video.write(str(tmp_path / 'clip.mp4'), frames, fps=25, quality=10)
  info = video.probe(path)
  assert (info.width, info.height, info.fps, info.num_frames, info.rotation) == (64, 48, 25.0,
                                                                                 37, 0)
  counts = {}
  chunks = list(video.read(path, chunk=16, counts=counts))
  assert [len(c.index) for c in chunks] == [16, 16, 5]
  index = np.concatenate([c.index for c in chunks])
  np.testing.assert_array_equal(index, np.arange(37))
  np.testing.assert_allclose(np.concatenate([c.time for c in chunks]), np.arange(37) / 25)
  images = np.concatenate([c.images for c in chunks])
  assert images.dtype == np.uint8 and images.shape == (37, 48, 64, 3)
  source = np.stack(frames).astype(int)  # lossy (4:2:0 colour), but each frame is its own
  distance = np.abs(images[:, None].astype(int) - source[None]).mean(axis=(2, 3, 4))
  np.testing.assert_array_equal(distance.argmin(1), np.arange(37))
  others = np.where(np.eye(37, dtype=bool), np.inf, distance).min(1)
  assert (distance.diagonal() < 0.5 * others).all()
  assert counts == {'frames': 37, 'bad': 0}


def test_rotation_metadata_applied_as_opencv_does(tmp_path):
  frames = _frames(4)
  path = tmp_path / 'portrait.mp4'
  video.write(str(path), frames, codec='mpeg4')
  data = bytearray(path.read_bytes())  # a phone's display matrix (90 degrees) in the track header
  identity = struct.pack('>9I', 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)
  at = data.find(identity, data.find(b'tkhd'))
  data[at:at + 36] = struct.pack('>9I', 0, 0x10000, 0, 0xFFFF0000, 0, 0, 0, 0, 0x40000000)
  path.write_bytes(bytes(data))
  info = video.probe(str(path))
  assert (info.width, info.height) == (48, 64) and info.rotation in (90, 270)
  ours = next(video.read(str(path))).images[0]
  capture = cv2.VideoCapture(str(path))  # OpenCV applies the display matrix by default
  ok, reference = capture.read()
  capture.release()
  assert ok and ours.shape == reference.shape == (64, 48, 3)
  difference = np.abs(ours.astype(int) - reference[..., ::-1])  # chroma upsampled differently
  assert difference.mean() < 2 and difference.max() <= 8
  assert np.abs(ours.astype(int) - np.rot90(reference, 2)[..., ::-1]).mean() > 10  # not upside down


def test_a_corrupt_packet_is_counted_and_skipped_keeping_the_numbers(tmp_path):
  path = _mjpeg(tmp_path / 'clip.avi', _frames(20))
  data = bytearray(path.read_bytes())
  starts = [i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] == 0xD8]
  data[starts[10]:starts[11] - 16] = bytes(starts[11] - 16 - starts[10])  # frame 10's JPEG gone
  bad = tmp_path / 'bad.avi'
  bad.write_bytes(bytes(data))
  counts = {}
  index = np.concatenate([c.index for c in video.read(str(bad), counts=counts,
                                                      max_bad_fraction=0.1)])
  np.testing.assert_array_equal(index, np.delete(np.arange(20), 10))
  assert counts == {'frames': 19, 'bad': 1}
  data[starts[12]:starts[13] - 16] = bytes(starts[13] - 16 - starts[12])
  bad.write_bytes(bytes(data))
  with pytest.raises(video.VideoError, match=r'bad\.avi: 2 packets did not decode'):
    list(video.read(str(bad), max_bad_fraction=0.05))


def test_variable_frame_rate_frames_are_numbered_in_order(tmp_path):
  """A phone's variable frame rate: 40 frames at a nominal 25 fps, their intervals 0.8x to 1.25x
  the nominal one. Every frame decodes, so the numbers are 0..39 (as OpenCV counts them), not
  the timestamps times the nominal rate, which skip numbers; the times are the timestamps."""
  path = str(tmp_path / 'vfr.mkv')
  container = av.open(path, 'w')
  stream = container.add_stream('mpeg4', rate=25)
  stream.width, stream.height, stream.pix_fmt = 64, 48, 'yuv420p'
  stream.codec_context.time_base = fractions.Fraction(1, 1000)
  intervals = np.random.default_rng(0).uniform(0.8, 1.25, 40) * 40  # milliseconds
  pts = np.round(np.concatenate([[0], np.cumsum(intervals[:-1])])).astype(int)
  assert (np.diff(np.round(pts / 40)) > 1).any()  # timestamps times the rate would skip
  for image, t in zip(_frames(40), pts):
    frame = av.VideoFrame.from_ndarray(image, format='rgb24')
    frame.pts, frame.time_base = int(t), fractions.Fraction(1, 1000)
    for packet in stream.encode(frame):
      container.mux(packet)
  for packet in stream.encode():
    container.mux(packet)
  container.close()
  counts = {}
  chunks = list(video.read(path, chunk=16, counts=counts))
  np.testing.assert_array_equal(np.concatenate([c.index for c in chunks]), np.arange(40))
  np.testing.assert_allclose(np.concatenate([c.time for c in chunks]), pts / 1000)
  assert counts == {'frames': 40, 'bad': 0}


@pytest.mark.parametrize('content, message', [
    (None, 'no such video file'), (b'', 'not a readable video'),
    (b'this is not a video\n' * 50, 'not a readable video')])
def test_unreadable_videos_name_the_file(tmp_path, content, message):
  path = tmp_path / 'clip.mp4'
  if content is not None:
    path.write_bytes(content)
  for call in (lambda: video.probe(str(path)), lambda: list(video.read(str(path)))):
    with pytest.raises(video.VideoError, match=f'clip.mp4: {message}'):
      call()


def test_a_folder_of_videos_and_one_mixing_other_files(tmp_path):
  for name in ('b.mp4', 'a.avi', '.hidden'):
    (tmp_path / name).write_bytes(b'x')
  assert [p.split('/')[-1] for p in video.list_videos(str(tmp_path))] == ['a.avi', 'b.mp4']
  (tmp_path / 'notes.txt').write_text('x')
  with pytest.raises(video.VideoError, match='not videos \\(notes.txt\\)'):
    video.list_videos(str(tmp_path))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(video.VideoError, match='holds no videos'):
    video.list_videos(str(tmp_path / 'empty'))
  (tmp_path / 'notes.txt').unlink()
  (tmp_path / 'empty').rmdir()
  (tmp_path / 'b.mov').write_bytes(b'x')  # both b.mov and b.mp4 would write folder b
  with pytest.raises(video.VideoError, match=r"b\.mov and b\.mp4 would both be named 'b'"):
    video.list_videos(str(tmp_path))
