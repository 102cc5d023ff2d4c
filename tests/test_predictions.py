"""Submission-file helpers: test lists, nearest-frame filling, frame counts."""
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
