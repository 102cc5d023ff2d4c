"""Device preprocessing: normalisation presets, resizing, flips and affine warps."""
import functools

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from affectjax.models import preprocess


def _images(shape=(4, 12, 12, 3), seed=0):
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _smooth_image(size=33):
  """A smooth uint8 RGB image (bilinear resampling of it is accurate to well under a level)."""
  y, x = np.mgrid[0:size, 0:size] / size
  channels = [np.sin(3 * x + 1) * np.cos(2 * y), x * y, np.cos(4 * y - x)]
  return np.round(127.5 + 100 * np.stack(channels, -1)).astype(np.uint8)


@pytest.mark.parametrize('name', ['imagenet', 'vggface2', 'unit'])
def test_normalize_matches_numpy_formula(name):
  images = _images()
  pre = preprocess.PRESETS[name]
  x = images.astype(np.float64)
  if pre['channel_order'] == 'BGR':
    x = x[..., ::-1]
  want = (x - np.array(pre['mean'])) / np.array(pre['std'])
  got = preprocess.normalize(jnp.asarray(images), pre)
  assert got.dtype == jnp.float32 and got.shape == images.shape
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-4)
  assert preprocess.normalize(jnp.asarray(images), pre, jnp.bfloat16).dtype == jnp.bfloat16


def test_presets_hold_the_published_constants():
  np.testing.assert_allclose(preprocess.IMAGENET['mean'], [123.675, 116.28, 103.53])
  np.testing.assert_allclose(preprocess.IMAGENET['std'], [58.395, 57.12, 57.375])
  # VGGFace2: the mean is (B, G, R); a pure-red pixel's first BGR channel is blue.
  red = jnp.asarray([[[[255, 0, 0]]]], jnp.uint8)
  np.testing.assert_allclose(preprocess.normalize(red, preprocess.VGGFACE2)[0, 0, 0],
                             [-91.4953, -103.8827, 255 - 131.0912], rtol=1e-6)


def test_resize_matches_opencv_bilinear_upsampling_and_keeps_dtype():
  images = _images((2, 9, 13, 3))
  got = preprocess.resize(jnp.asarray(images, jnp.float32), (18, 26))
  for i in range(2):
    want = cv2.resize(images[i].astype(np.float32), (26, 18), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(got[i], want, atol=1e-3)
  small = preprocess.resize(jnp.asarray(images), 5)
  assert small.shape == (2, 5, 5, 3) and small.dtype == jnp.uint8
  np.testing.assert_array_equal(preprocess.resize(jnp.asarray(images), (9, 13)), images)


def test_affine_warp_identity_flip_rotation_and_shift_are_exact():
  images = _images((3, 10, 10, 3))
  identity = np.tile(np.array([[1, 0, 0], [0, 1, 0]], np.float32), (3, 1, 1))
  warp = jax.jit(preprocess.affine_warp)
  np.testing.assert_array_equal(warp(images, identity), images)
  mirror = np.tile(np.array([[1, 0, 0], [0, -1, 9]], np.float32), (3, 1, 1))
  np.testing.assert_array_equal(warp(images, mirror), images[:, :, ::-1])
  # out[y, x] = in[x, 9 - y]: a quarter turn, np.rot90's direction.
  quarter = np.tile(np.array([[0, 1, 0], [-1, 0, 9]], np.float32), (3, 1, 1))
  np.testing.assert_array_equal(warp(images, quarter), np.rot90(images, k=1, axes=(1, 2)))
  # Shift down 2 rows and left 3 columns, zero fill.
  shift = np.tile(np.array([[1, 0, -2], [0, 1, 3]], np.float32), (3, 1, 1))
  want = np.zeros_like(images)
  want[:, 2:, :7] = images[:, :8, 3:]
  np.testing.assert_array_equal(warp(images, shift), want)


def test_affine_warp_half_pixel_shift_is_the_neighbour_average():
  images = _images((1, 6, 6, 2)).astype(np.float32)
  half = np.array([[[1, 0, 0], [0, 1, 0.5]]], np.float32)
  got = preprocess.affine_warp(jnp.asarray(images), jnp.asarray(half), fill=-1.0)
  np.testing.assert_allclose(got[0, :, :5], (images[0, :, :5] + images[0, :, 1:]) / 2, rtol=1e-6)
  np.testing.assert_allclose(got[0, :, 5], (images[0, :, 5] - 1) / 2, rtol=1e-6)


def test_random_affine_matches_opencv_warp():
  """The sampled per-example warps, reproduced with cv2.warpAffine on the same matrices."""
  image = _smooth_image()
  images = np.stack([image] * 4)
  kwargs = dict(flip=True, max_rotate_deg=20.0, max_scale=0.1, max_translate=0.1)
  key = jax.random.key(3)
  got = np.asarray(preprocess.augment(jnp.asarray(images), key, **kwargs))
  matrices = np.asarray(preprocess.random_affine_matrices(key, 4, 33, 33, **kwargs))
  assert not np.allclose(matrices[0], matrices[1])
  for i in range(4):
    (a, b, c), (d, e, f) = matrices[i]  # (row, col) -> OpenCV's (x, y) order
    cv_map = np.array([[e, d, f], [b, a, c]], np.float64)
    want = cv2.warpAffine(image, cv_map, (33, 33), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    inner = (slice(4, -4), slice(4, -4))  # OpenCV's border handling differs on edge pixels
    assert np.abs(got[i][inner].astype(int) - want[inner].astype(int)).max() <= 2


def test_random_affine_ranges():
  m = np.asarray(preprocess.random_affine_matrices(
      jax.random.key(0), 2000, 64, 64, flip=True, max_rotate_deg=10.0, max_scale=0.2,
      max_translate=0.05))
  lin = m[:, :, :2]
  det = np.linalg.det(lin)
  flipped = det < 0
  assert 0.45 < flipped.mean() < 0.55
  zoom = 1 / np.sqrt(np.abs(det))  # |det(A^-1)| = 1 / scale^2
  assert zoom.min() >= 0.8 - 1e-5 and zoom.max() <= 1.2 + 1e-5
  angle = np.degrees(np.arctan2(lin[:, 0, 1], lin[:, 0, 0]))
  assert np.abs(angle).max() <= 10 + 1e-4 and np.abs(angle).max() > 9
  # The shift t, from offset = c - A^-1 (c + t): t = A (c - offset) - c; |t| <= 0.05 * 64.
  shift = np.einsum('bij,bj->bi', np.linalg.inv(lin), 31.5 - m[:, :, 2]) - 31.5
  assert np.abs(shift).max() <= 3.2 + 1e-3 and np.abs(shift).max() > 2.8
  none = preprocess.random_affine_matrices(jax.random.key(0), 3, 8, 8, flip=False,
                                           max_rotate_deg=0, max_scale=0, max_translate=0)
  np.testing.assert_allclose(none, np.tile([[1, 0, 0], [0, 1, 0]], (3, 1, 1)), atol=1e-6)


@pytest.mark.parametrize('dtype', [jnp.uint8, jnp.float32])
def test_augment_flip_only_mirrors_exactly_and_keeps_dtype(dtype):
  images = jnp.asarray(_images((32, 8, 8, 3)), dtype)
  aug = jax.jit(functools.partial(preprocess.augment, flip=True))
  out = aug(images, jax.random.key(1))
  assert out.shape == images.shape and out.dtype == dtype
  same = np.all(out == images, axis=(1, 2, 3))
  mirrored = np.all(out == images[:, :, ::-1], axis=(1, 2, 3))
  assert np.all(same | mirrored) and 0 < mirrored.sum() < 32
  np.testing.assert_array_equal(aug(images, jax.random.key(1)), out)  # deterministic per key
  # The warp path draws the same flips from the same key.
  tiny = jax.jit(functools.partial(preprocess.augment, flip=True, max_translate=1e-7))
  np.testing.assert_allclose(tiny(images.astype(jnp.float32), jax.random.key(1)),
                             out.astype(jnp.float32), atol=1e-3)
  np.testing.assert_array_equal(preprocess.augment(images, jax.random.key(1), flip=False), images)


def test_augment_affine_keeps_shape_dtype_and_changes_images():
  images = jnp.asarray(np.stack([_smooth_image(16)] * 4))
  aug = jax.jit(functools.partial(preprocess.augment, flip=False, max_rotate_deg=15.0,
                                  max_scale=0.1, max_translate=0.1))
  out = aug(images, jax.random.key(5))
  assert out.shape == images.shape and out.dtype == jnp.uint8
  assert len({np.asarray(o).tobytes() for o in out}) == 4
