"""Submission-file helpers: test lists, nearest-frame filling, frame counts, formats."""
import dataclasses
import os

import numpy as np
import pytest

from affectjax import predictions
from affectjax.data import unlabelled


def test_nearest_predicted_prefers_the_earlier_frame_on_a_tie():
  predicted = np.array([2, 6, 10])
  frames = np.array([1, 2, 3, 4, 5, 8, 9, 12])
  np.testing.assert_array_equal(predictions.nearest_predicted(frames, predicted),
                                [0, 0, 0, 0, 1, 1, 2, 2])


def test_fill_rows_uses_the_same_video_only(tmp_path):
  for video, frames in (('a', (1, 2, 3)), ('b', (1, 5))):
    (tmp_path / 'cropped_aligned' / video).mkdir(parents=True)
    for f in frames:
      (tmp_path / 'cropped_aligned' / video / f'{f:05d}.jpg').write_bytes(b'')
  index = unlabelled.frames_index(str(tmp_path), videos=['b', 'a'])
  assert index.video_names == ('a', 'b') and index.frame.tolist() == [1, 2, 3, 1, 5]
  predicted = np.array([True, False, False, False, True])
  np.testing.assert_array_equal(predictions.fill_rows(index, predicted), [0, 0, 0, 4, 4])
  with pytest.raises(ValueError, match='no frame of video a'):
    predictions.fill_rows(index, np.array([False, False, False, True, True]))
  with pytest.raises(unlabelled.FrameListError, match="test video 'c' has no face crops"):
    unlabelled.frames_index(str(tmp_path), videos=['a', 'c'])


def test_test_lists_and_frame_counts(tmp_path):
  videos = tmp_path / 'videos.txt'
  videos.write_text('1-30-1280x720.mp4\n\n10-60-1280x720_right\n1-30-1280x720\n')
  assert unlabelled.read_video_list(str(videos)) == ['1-30-1280x720', '10-60-1280x720_right']
  videos.write_text('ok\nnot a name\n')
  with pytest.raises(unlabelled.FrameListError, match=r'videos\.txt:2'):
    unlabelled.read_video_list(str(videos))
  images = tmp_path / 'images.txt'
  images.write_text('image,valence,arousal,expression,aus\nv1/00002.jpg,,,\nv1/00010.jpg\n')
  assert unlabelled.read_image_list(str(images)) == [('v1', 2), ('v1', 10)]
  images.write_text('v1/00000.jpg\n')
  with pytest.raises(unlabelled.FrameListError, match=r'images\.txt:1: .*1-based'):
    unlabelled.read_image_list(str(images))
  for path, read in ((videos, unlabelled.read_video_list), (images, unlabelled.read_image_list)):
    path.write_text('\n\n' if read is unlabelled.read_video_list else 'image,valence\n')
    with pytest.raises(unlabelled.FrameListError, match=rf'{path.name}: the list names no'):
      read(str(path))
  counts = tmp_path / 'counts.csv'
  counts.write_text('video,frames\nv1,120\nv2\t7\n')
  assert predictions.read_frame_counts(str(counts)) == {'v1': 120, 'v2': 7}
  counts.write_text('video,frames\nv1,many\n')  # line 1 without a number is the header
  with pytest.raises(ValueError, match=r'counts\.csv:2'):
    predictions.read_frame_counts(str(counts))


def test_au_thresholds_file(tmp_path):
  path = tmp_path / 'eval.json'
  path.write_text('{"au_f1": 0.5, "au_thresholds": [0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, '
                  '0.7, 0.75, 0.8, 0.85]}')
  np.testing.assert_allclose(predictions.read_au_thresholds(str(path))[[0, -1]], [0.3, 0.85])
  path.write_text('0.5,' * 11 + '0.25\n')
  assert predictions.read_au_thresholds(str(path))[-1] == 0.25
  assert predictions.read_au_thresholds('') == 0.5
  path.write_text('0.5,0.5\n')
  with pytest.raises(ValueError, match='expected 12 AU thresholds'):
    predictions.read_au_thresholds(str(path))
  probs = np.array([[0.3] * 12, [0.8] * 12])
  logits = np.log(probs / (1 - probs))
  thresholds = np.array([0.25] * 6 + [0.75] * 6)
  decided = predictions.decode_outputs({'au': logits}, ('au',), thresholds)
  np.testing.assert_array_equal(decided['au'], [[1] * 6 + [0] * 6, [1] * 12])


def test_submissions_keep_the_list_order_and_cover_every_frame(tmp_path):
  """ABAW3/4 `mtl` and ABAW5+ `per_task` from an image list: its lines in its order (a repeated
  line repeated); `per_task` from a video list: every frame 1..N of each video."""
  for video, frames in (('a', (1, 3)), ('b', (2,))):
    (tmp_path / 'cropped_aligned' / video).mkdir(parents=True)
    for f in frames:
      (tmp_path / 'cropped_aligned' / video / f'{f:05d}.jpg').write_bytes(b'')
  images = [('b', 2), ('a', 3), ('a', 1), ('b', 2)]
  index = unlabelled.frames_index(str(tmp_path), images=images)  # rows a/1, a/3, b/2
  decided = {'expr': np.array([4, 5, 6]), 'au': np.eye(3, 12, dtype=np.int64),
             'va': np.array([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])}
  predicted = np.array([True, False, True])  # a/3 unreadable: it takes a/1's decisions
  order = predictions.list_order(index, images)
  assert order.tolist() == [2, 1, 0, 2]
  mtl, = predictions.write_submission('mtl', str(tmp_path / 'mtl'), index, decided, predicted,
                                      ('expr', 'au', 'va'), 8, order=order)
  au = {0: '1,0,0,0,0,0,0,0,0,0,0,0', 2: '0,0,1,0,0,0,0,0,0,0,0,0'}
  assert open(mtl).read().splitlines() == [
      'image,valence,arousal,expression,aus', f'b/00002.jpg,0.500000,0.600000,6,{au[2]}',
      f'a/00003.jpg,0.100000,0.200000,4,{au[0]}', f'a/00001.jpg,0.100000,0.200000,4,{au[0]}',
      f'b/00002.jpg,0.500000,0.600000,6,{au[2]}']
  paths = predictions.write_submission('per_task', str(tmp_path / 'listed'), index, decided,
                                       predicted, ('expr', 'va'), 8, order=order)
  assert [os.path.basename(p) for p in paths] == ['VA.csv', 'EXPR.csv']  # organisers' order
  assert open(paths[1]).read().splitlines() == [
      'image_location,Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other',
      'b/00002.jpg,6', 'a/00003.jpg,4', 'a/00001.jpg,4', 'b/00002.jpg,6']
  # A video list: frames 1..N of each video (b/1 has no crop; N = 4 for b from frame_counts).
  index = unlabelled.frames_index(str(tmp_path), videos=['a', 'b'])
  paths = predictions.write_submission('per_task', str(tmp_path / 'videos'), index, decided,
                                       np.ones(3, bool), ('expr',), 8, {'a': 3, 'b': 4})
  assert open(paths[0]).read().splitlines()[1:] == [
      'a/00001.jpg,4', 'a/00002.jpg,4', 'a/00003.jpg,5',
      'b/00001.jpg,6', 'b/00002.jpg,6', 'b/00003.jpg,6', 'b/00004.jpg,6']
  # Counts given, each video needs one: by its name or its source video's ('v' for 'v_left').
  with pytest.raises(ValueError, match=r'frame counts \(predict\.frame_counts\) do not list '
                     r'video a$'):
    predictions.write_submission('per_task', str(tmp_path / 'videos'), index, decided,
                                 np.ones(3, bool), ('expr',), 8, {'b': 4})
  left = dataclasses.replace(index, video_names=('v_left', 'v_right'))
  rows = predictions.every_frame_rows(left, np.ones(3, bool), {'v': 5, 'v_right': 3})
  assert {k: len(v) for k, v in rows.items()} == {'v_left': 5, 'v_right': 3}
  with pytest.raises(ValueError, match=r'do not list video v_left or v$'):
    predictions.every_frame_rows(left, np.ones(3, bool), {'v_right': 3})
