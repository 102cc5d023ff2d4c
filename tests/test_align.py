"""Alignment and tracking (affectjax/face/align.py, faces.py): the similarity transform against
scikit-image's, the device warp against cv2.warpAffine, landmarks brought onto the template on a
synthetic face whose landmarks are known, and tracks linked, named and smoothed."""
import cv2
import numpy as np
from skimage import transform

from affectjax.data.synthetic import faces as synthetic_faces
from affectjax.face import align, faces


def _points(seed, n=3):
  rng = np.random.default_rng(seed)
  return np.stack([align.TEMPLATE_112 * rng.uniform(0.8, 2.0) + rng.uniform(20, 120, 2) +
                   rng.normal(0, 3, (5, 2)) for _ in range(n)]).astype(np.float32)


def test_similarity_equals_scikit_image():
  points = _points(0)
  ours = np.asarray(align.similarity(points, align.template()))
  for p, m in zip(points, ours):
    reference = transform.SimilarityTransform.from_estimate(p, align.template())
    np.testing.assert_allclose(m, reference.params[:2], atol=2e-4)


def test_warp_equals_opencv():
  rng = np.random.default_rng(1)
  images = cv2.GaussianBlur(rng.integers(0, 255, (3, 160, 200, 3), dtype=np.uint8)[0], (0, 0),
                            2)[None].repeat(3, 0)
  crops, matrices = align.align(images, _points(1))
  for image, crop, m in zip(images, np.asarray(crops), np.asarray(matrices)):
    reference = cv2.warpAffine(image, m, (112, 112), flags=cv2.INTER_LINEAR, borderValue=0)
    difference = np.abs(crop.astype(int) - reference)
    assert difference.max() <= 1 and difference.mean() < 0.05  # OpenCV rounds to 1/32 pixel


def test_a_synthetic_face_lands_on_the_template():
  identity = synthetic_faces.Identity.sample(np.random.default_rng(2))
  scene = synthetic_faces.Scene(roll=12, scale=1.1, shift=(4.0, -3.0))
  au = np.zeros(12)
  image = synthetic_faces.render_face(au, identity, scene, 224)
  points = synthetic_faces.landmarks(au, identity, scene, 224)
  crops, matrices = align.align(image[None], points[None])
  m = np.asarray(matrices[0])
  moved = points @ m[:, :2].T + m[:, 2]
  # A face is no exact similarity of the template: the residual is the identity's proportions.
  assert np.abs(moved - align.TEMPLATE_112).max() < 6
  eyes = np.asarray(crops[0])[40:62, 30:82].mean()  # the eyes' row is where the template says
  assert crops.shape == (1, 112, 112, 3) and eyes > 20


def _moving_faces():
  """Boxes of 30 frames: face A (large, on the right) throughout except frames 10-12, face B
  (small, on the left) from frame 5, and a false detection on frame 20 only."""
  boxes = np.zeros((30, 3, 4), np.float32)
  valid = np.zeros((30, 3), bool)
  for t in range(30):
    if not 10 <= t <= 12:
      boxes[t, 1] = [200 + 2 * t, 50, 300 + 2 * t, 170]
      valid[t, 1] = True
    if t >= 5:
      boxes[t, 0] = [20 + t, 60, 80 + t, 130]
      valid[t, 0] = True
  boxes[20, 2] = [150, 300, 170, 320]
  valid[20, 2] = True
  return boxes, valid


def test_tracks_link_across_gaps_and_come_largest_first():
  boxes, valid = _moving_faces()
  ids = align.link(boxes, valid, max_gap=5)
  a, b = ids[0, 1], ids[5, 0]
  assert a != b and (ids[valid[:, 1], 1] == a).all() and (ids[5:, 0] == b).all()
  assert ids[20, 2] not in (a, b) and (ids[~valid] == -1).all()
  assert align.tracks_by_size(ids, boxes) == [a, b, ids[20, 2]]
  assert align.tracks_by_size(ids, boxes, min_frames=2) == [a, b]
  # A face back where it was last rejoins its track after a longer gap too (it turned away,
  # was hidden, left the picture); one found elsewhere after the gap starts a new track.
  assert (align.link(boxes, valid, max_gap=2)[valid[:, 1], 1] == a).all()
  moved = boxes.copy()
  moved[13:, 1] += np.float32([400, 0, 400, 0])
  for gap in (2, 5):
    later = align.link(moved, valid, max_gap=gap)
    assert later[13, 1] not in (later[0, 1], later[5, 0]) and (
        later[13:, 1][valid[13:, 1]] == later[13, 1]).all()


def test_faces_are_named_as_aff_wild2_names_them():
  boxes, valid = _moving_faces()
  t = len(boxes)
  dets = faces.VideoDetections(None, np.arange(t), np.arange(t) / 25, boxes,
                               np.ones((t, 3), np.float32),
                               np.zeros((t, 3, 5, 2), np.float32), valid, {}, {})
  assert [f.name for f in faces.faces_of(dets, 'clip')] == ['clip']
  both = faces.faces_of(dets, 'clip', all_faces=True)
  assert [f.name for f in both] == ['clip_right', 'clip_left']  # the larger face is the right one
  np.testing.assert_array_equal(both[0].present, valid[:, 1])
  np.testing.assert_array_equal(both[1].boxes[valid[:, 0]], boxes[valid[:, 0], 0])
  assert [f.name for f in faces.faces_of(dets, 'clip', all_faces=True, min_frames=1)] == [
      'clip_face1', 'clip_face2', 'clip_face3']
  short = faces.VideoDetections(None, np.arange(3), np.arange(3) / 25, boxes[:3],
                                np.ones((3, 3), np.float32), np.zeros((3, 3, 5, 2), np.float32),
                                valid[:3], {}, {})  # shorter than min_frames: all 3 frames do
  assert [f.name for f in faces.faces_of(short, 'clip', all_faces=True)] == ['clip']
  none = dets.valid.copy()
  none[:] = False
  assert faces.faces_of(faces.VideoDetections(*[getattr(dets, k) for k in (
      'info', 'index', 'time', 'boxes', 'scores', 'landmarks')], none, {}, {}), 'clip') == []


def test_smoothing_averages_present_frames_only():
  rng = np.random.default_rng(3)
  truth = np.cumsum(np.full((40, 5, 2), 0.5), 0)
  noisy = truth + rng.normal(0, 2, truth.shape)
  present = np.ones(40, bool)
  present[[7, 8, 30]] = False
  smoothed = align.smooth(noisy, present, 5)
  np.testing.assert_array_equal(smoothed[~present], noisy[~present])
  inner = present.copy()
  inner[:3] = inner[-3:] = False  # a linear trend is kept away from the ends
  assert np.abs(smoothed - truth)[inner].mean() < 0.6 * np.abs(noisy - truth)[inner].mean()
  np.testing.assert_array_equal(align.smooth(noisy, present, 1), noisy)
  expected = noisy[[4, 5, 6]].mean(0)  # frame 6's window 4..8 without the absent 7 and 8
  np.testing.assert_allclose(smoothed[6], expected, rtol=1e-6)
