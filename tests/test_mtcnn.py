"""The JAX MTCNN (affectjax.face.mtcnn, affectjax.face.detect) against the reference `mtcnn`
package: its outputs are in tests/data/mtcnn_reference.npz, written by
tests/make_mtcnn_reference.py (TensorFlow is never imported here). Needs the mtcnn wheel (for
its weight files only) and lz4, as the extra `video` installs them."""
import importlib.util
import os
import pickle
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

lz4_frame = pytest.importorskip('lz4.frame')
if importlib.util.find_spec('mtcnn') is None:
  pytest.skip('the mtcnn wheel (its weights) is not installed', allow_module_level=True)

from affectjax.face import detect  # pylint: disable=wrong-import-position
from affectjax.face import mtcnn  # pylint: disable=wrong-import-position

REFERENCE = os.path.join(os.path.dirname(__file__), 'data', 'mtcnn_reference.npz')
# Tolerances: the nets and resampling agree with TensorFlow to ~1e-6 (float32 rounding); the
# detections on the test images to ~1e-3 px.
NET_ATOL = 1e-5
PIXEL_ATOL = 0.05


@pytest.fixture(scope='module')
def ref():
  with np.load(REFERENCE) as data:
    return dict(data)


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
  return mtcnn.load_weights(cache_dir=str(tmp_path_factory.mktemp('mtcnn_cache')))


# Smaller candidate caps than the defaults, for speed on CPUs; the test images stay under them
# (the tests check 'overflow').
SMALL = {'pnet_candidates': 512, 'rnet_candidates': 128, 'onet_candidates': 16}


@pytest.fixture(scope='module')
def detector(weights):
  return detect.Detector(weights, **SMALL)


@pytest.fixture(scope='module')
def astronaut():
  skimage_data = pytest.importorskip('skimage.data')
  image = skimage_data.astronaut()
  assert image.shape == (512, 512, 3) and image.dtype == np.uint8
  return image


def normalise(images):
  return (images.astype(np.float32) - 127.5) / 128


def reference_faces(rows):
  """The reference's numpy rows [F, 16] -> boxes [F, 4], scores [F], landmarks [F, 5, 2]."""
  return rows[:, 1:5], rows[:, 5], np.stack([rows[:, 6:11], rows[:, 11:16]], axis=-1)


# ---- The nets and the resampling --------------------------------------------------------------

def test_nets_reproduce_the_reference(ref, weights):
  pnet, rnet, onet = (jax.jit(m().apply) for m in (mtcnn.PNet, mtcnn.RNet, mtcnn.ONet))
  for name in ('pnet12', 'pnet40x50'):
    reg, prob = pnet(weights['pnet'], normalise(ref[f'pnet_in{name[4:]}']))
    np.testing.assert_allclose(reg, ref[f'{name}_reg'], atol=NET_ATOL)
    np.testing.assert_allclose(prob, ref[f'{name}_prob'], atol=NET_ATOL)
  reg, prob = rnet(weights['rnet'], normalise(ref['rnet_in']))
  np.testing.assert_allclose(reg, ref['rnet_reg'], atol=NET_ATOL)
  np.testing.assert_allclose(prob, ref['rnet_prob'], atol=NET_ATOL)
  reg, marks, prob = onet(weights['onet'], normalise(ref['onet_in']))
  np.testing.assert_allclose(reg, ref['onet_reg'], atol=NET_ATOL)
  np.testing.assert_allclose(marks, ref['onet_lm'], atol=NET_ATOL)
  np.testing.assert_allclose(prob, ref['onet_prob'], atol=NET_ATOL)
  assert ref['rnet_prob'][-1, 1] > 0.99 and ref['onet_prob'][-1, 1] > 0.99  # the face crops


def test_area_resize_and_crops_reproduce_tensorflow(ref):
  images = jnp.asarray(normalise(ref['area_in']))
  for key in ('area_out_a', 'area_out_b'):
    out = jax.jit(detect.resize_area, static_argnums=(1, 2))(images, *ref[key].shape[1:3])
    np.testing.assert_allclose(out, ref[key], atol=NET_ATOL)
  boxes = jnp.asarray(ref['crop_boxes'][None, :, 1:], jnp.float32)
  crops = jax.jit(detect.crop_resize, static_argnums=2)(images, boxes, 24)
  np.testing.assert_allclose(crops[0], ref['crop_out'], atol=1e-4)


def test_packed_pyramid_gives_each_level_its_own_pnet_map(weights):
  """P-Net runs once on the pyramid levels packed into one image; each level's windows must be
  those of P-Net on the level alone (odd sizes included, where max pooling pads)."""
  images = jnp.asarray(normalise(np.random.default_rng(0).integers(0, 256, (1, 40, 33, 3))))
  mosaic = detect._mosaic(40, 33, 20.0, 0.709)  # pylint: disable=protected-access
  assert [(h, w) for _, h, w, _, _ in mosaic.levels] == [(24, 19), (17, 14)]

  @jax.jit
  def maps(variables, images):
    canvas = jnp.zeros((1,) + mosaic.size + (3,))
    levels = [detect.resize_area(images, h, w) for _, h, w, _, _ in mosaic.levels]
    for level, (_, h, w, top, left) in zip(levels, mosaic.levels):
      canvas = canvas.at[:, top:top + h, left:left + w].set(level)
    packed = mtcnn.PNet().apply(variables, canvas, jnp.asarray(mosaic.mask))[1]
    return packed[0, ..., 1].reshape(-1), [mtcnn.PNet().apply(variables, level)[1][0, ..., 1]
                                          for level in levels]

  packed, alone = jax.tree_util.tree_map(np.asarray, maps(weights['pnet'], images))
  for i, level in enumerate(alone):
    at = mosaic.level == i
    got = np.zeros_like(level)
    got[mosaic.row[at].astype(int), mosaic.column[at].astype(int)] = packed[at]
    np.testing.assert_allclose(got, level, atol=1e-6)


def test_pyramid_is_the_references():
  levels = detect.pyramid(512, 512)
  assert [(h, w) for _, h, w in levels] == [(n, n) for n in (307, 217, 154, 109, 77, 55, 39,
                                                             27, 19, 13)]
  np.testing.assert_allclose([s for s, _, _ in levels], 0.6 * 0.709 ** np.arange(10))
  assert detect.pyramid(11, 11) == ()


# ---- Weights ------------------------------------------------------------------------------------

def test_restricted_reader_gives_joblibs_arrays(weights, tmp_path):
  for net in mtcnn.NETS:
    shapes = jax.tree_util.tree_map(np.shape, weights[net]['params'])
    assert shapes == mtcnn.param_shapes(net), net
  joblib = pytest.importorskip('joblib')
  for net in mtcnn.NETS:
    path = os.path.join(mtcnn.weights_dir(), f'{net}.lz4')
    ours, theirs = mtcnn.read_joblib_lz4(path), joblib.load(path)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
      assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
  # Other layouts joblib writes: Fortran order, big-endian, 0-d, empty.
  arrays = [np.asfortranarray(np.arange(12.0).reshape(3, 4)), np.arange(5, dtype='>i4'),
            np.array(2.5), np.zeros((0, 3), np.float32), np.arange(7, dtype=np.uint8)]
  path = str(tmp_path / 'mixed.lz4')
  joblib.dump(arrays, path)
  for a, b in zip(mtcnn.read_joblib_lz4(path), joblib.load(path)):
    assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)


def test_cache_written_once_then_reused(tmp_path, monkeypatch):
  cache_dir = str(tmp_path / 'cache')
  first = mtcnn.load_weights(cache_dir=cache_dir)
  assert os.listdir(cache_dir) == [os.path.basename(mtcnn.cache_path(cache_dir=cache_dir))]
  stamp = os.stat(mtcnn.cache_path(cache_dir=cache_dir)).st_mtime_ns

  def fail(path):
    raise AssertionError(f'{path} read again instead of the cache')
  monkeypatch.setattr(mtcnn, 'read_joblib_lz4', fail)
  again = mtcnn.load_weights(cache_dir=cache_dir)
  assert os.stat(mtcnn.cache_path(cache_dir=cache_dir)).st_mtime_ns == stamp
  jax.tree_util.tree_map(np.testing.assert_array_equal, first, again)
  assert len(os.listdir(cache_dir)) == 1


def test_missing_weights_are_named(tmp_path, monkeypatch):
  shutil.copy(os.path.join(mtcnn.weights_dir(), 'pnet.lz4'), tmp_path)
  with pytest.raises(FileNotFoundError, match=r'rnet\.lz4.*pip install affectjax\[video\]'):
    mtcnn.load_weights(str(tmp_path), cache_dir=str(tmp_path / 'cache'))
  monkeypatch.setattr(importlib.util, 'find_spec', lambda name: None)
  with pytest.raises(FileNotFoundError, match=r'mtcnn package is not installed.*\[video\]'):
    mtcnn.load_weights(cache_dir=str(tmp_path / 'cache'))


class _Evil:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f'touch {self.marker}',))


def test_disallowed_globals_are_refused(tmp_path):
  marker = tmp_path / 'ran'
  path = tmp_path / 'evil.lz4'
  for payload, refused in (([_Evil(marker)], 'system'),
                           ([np.zeros(3, np.float32)], '_reconstruct')):  # numpy's own pickling
    path.write_bytes(lz4_frame.compress(pickle.dumps(payload, protocol=4)))
    with pytest.raises(pickle.UnpicklingError, match=f'{refused} is not allowed'):
      mtcnn.read_joblib_lz4(str(path))
  assert not marker.exists()


# ---- Detection ---------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def batch_result(detector, astronaut):
  """The astronaut three times, then a flat grey frame: one compilation, reused by the tests."""
  frames = np.stack([astronaut] * 3 + [np.full_like(astronaut, 128)])
  return frames, jax.tree_util.tree_map(np.asarray, detector(frames))


def test_astronaut_matches_the_reference(batch_result, ref):
  _, out = batch_result
  assert out['boxes'].shape == (4, 8, 4) and out['boxes'].dtype == np.float32
  assert out['scores'].shape == (4, 8) and out['landmarks'].shape == (4, 8, 5, 2)
  assert out['valid'].shape == (4, 8) and out['valid'].dtype == bool
  assert out['valid'][0].sum() == 1 and not out['overflow'].any()
  boxes, scores, marks = reference_faces(ref['astronaut_det'])
  np.testing.assert_allclose(out['boxes'][0, 0], boxes[0], atol=PIXEL_ATOL)
  np.testing.assert_allclose(out['landmarks'][0, 0], marks[0], atol=PIXEL_ATOL)
  np.testing.assert_allclose(out['scores'][0, 0], scores[0], atol=1e-5)
  assert set(detect.keypoints(out['landmarks'][0, 0])) == set(detect.KEYPOINTS)
  assert (out['boxes'][0, 1:] == 0).all() and (out['scores'][0, 1:] == 0).all()


def test_batch_gives_each_frame_its_own_detections(batch_result):
  _, out = batch_result
  for key in ('boxes', 'scores', 'landmarks', 'valid'):
    assert np.array_equal(out[key][1], out[key][0]) and np.array_equal(out[key][2], out[key][0])
  assert not out['valid'][3].any() and (out['boxes'][3] == 0).all()


def test_same_resolution_is_not_compiled_again(detector, batch_result):
  frames, out = batch_result
  traces = detector.traces
  again = detector(frames[::-1].copy())
  assert detector.traces == traces
  np.testing.assert_array_equal(np.asarray(again['boxes'])[3], out['boxes'][0])


def test_two_faces_at_another_resolution(ref, astronaut, weights):
  """Two half-size astronauts side by side (256x512): both faces, as the reference finds them,
  with max_faces=2 (one more compilation), and with small buckets, so that R-Net and O-Net also
  run on their later candidates."""
  half = ((astronaut.astype(np.int32).reshape(256, 2, 256, 2, 3).sum(axis=(1, 3)) + 2) // 4)
  pair = np.concatenate([half, half], axis=1).astype(np.uint8)
  small = detect.Detector(weights, max_faces=2, buckets=(32, 1), **SMALL)
  out = jax.tree_util.tree_map(np.asarray, small(pair[None]))
  assert out['valid'].tolist() == [[True, True]] and out['boxes'].shape == (1, 2, 4)
  assert not out['overflow'].any()
  boxes, scores, marks = reference_faces(ref['pair_det'])
  np.testing.assert_allclose(out['boxes'][0], boxes, atol=PIXEL_ATOL)
  np.testing.assert_allclose(out['landmarks'][0], marks, atol=PIXEL_ATOL)
  np.testing.assert_allclose(out['scores'][0], scores, atol=1e-5)
