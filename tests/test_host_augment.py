"""Tests of the host-side JPEG decoding and augmentation (affectjax.data.host_augment)."""
import io

import cv2
import numpy as np
import pytest
import simplejpeg
from PIL import Image

from affectjax.data import host_augment
from affectjax.data.synthetic import generate


@pytest.fixture(scope='session')
def dataset_root(tmp_path_factory):
  return generate.ensure_synthetic(tmp_path_factory.getbasetemp() / 'synthetic', progress=False,
                                   num_videos=8, frames_per_video=24, seed=1)


def test_decoder_matches_pil_and_rejects_corrupt_data(dataset_root):
  path = next((dataset_root / 'cropped_aligned').rglob('*.jpg'))
  data = path.read_bytes()
  reference = np.asarray(Image.open(io.BytesIO(data)).convert('RGB'))
  np.testing.assert_array_equal(host_augment.decode_jpeg(data), reference)
  small = host_augment.decode_jpeg(data, 32)
  area = cv2.resize(reference, (32, 32), interpolation=cv2.INTER_AREA)
  assert small.shape == (32, 32, 3)
  # Two-stage (DCT-domain 3/8 scaling, then area) vs one area resize: close, not identical.
  difference = np.abs(small.astype(int) - area)
  assert difference.mean() < 3.0 and np.percentile(difference, 90) <= 8
  assert host_augment.decode_jpeg(host_augment.decode_jpeg(data, 200).tobytes()) is None
  assert host_augment.decode_jpeg(b'') is None
  assert host_augment.decode_jpeg(data[:len(data) // 2]) is None  # truncated


def _augment_params(**values):
  fields = dict(flip=False, angle=0.0, scale=1.0, shift_x=0.0, shift_y=0.0, brightness=1.0,
                contrast=1.0, saturation=1.0)
  fields.update(values)
  return host_augment.AugmentParams(**{k: np.array([v]) for k, v in fields.items()})


def _write(image, warp=True, jitter=False, interpolation='bilinear', **values):
  config = host_augment.default_augment_config()
  config.rotate_deg = 1.0 if warp else 0.0
  config.interpolation = interpolation
  config.color_jitter = 0.1 if jitter else 0.0
  jpeg = simplejpeg.encode_jpeg(image, 95, 'RGB')
  plain = host_augment.decode_jpeg(jpeg)
  out = np.zeros_like(image)
  writer = host_augment.RowWriter(image.shape[0], config)
  assert writer.write(out, jpeg, _augment_params(**values), 0)
  return out, plain


def test_geometric_augmentation_against_numpy():
  image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
  for warp in (True, False):
    out, plain = _write(image, warp=warp)
    np.testing.assert_array_equal(out, plain)
    out, plain = _write(image, warp=warp, flip=True)
    np.testing.assert_array_equal(out, plain[:, ::-1])
  for interpolation in ('bilinear', 'nearest'):
    out, plain = _write(image, angle=90.0, interpolation=interpolation)  # as np.rot90
    np.testing.assert_array_equal(out, np.rot90(plain))
    out, plain = _write(image, flip=True, angle=90.0, interpolation=interpolation)
    np.testing.assert_array_equal(out, np.rot90(plain[:, ::-1]))  # flip first, then rotate
    out, plain = _write(image, shift_x=2 / 16, interpolation=interpolation)  # 2 pixels right
    np.testing.assert_array_equal(out[:, 2:], plain[:, :-2])
  with pytest.raises(ValueError, match='interpolation'):
    _write(image, interpolation='bicubic')


def test_colour_jitter_against_torchvision_formulas():
  image = np.random.default_rng(1).integers(30, 220, (16, 16, 3), dtype=np.uint8)
  grey_weights = np.array([0.299, 0.587, 0.114])
  out, plain = _write(image, warp=False, jitter=True, brightness=1.2)
  np.testing.assert_allclose(out, np.clip(plain * 1.2, 0, 255), atol=1.0)
  out, plain = _write(image, warp=False, jitter=True, saturation=0.0)
  grey = plain @ grey_weights
  np.testing.assert_allclose(out, np.repeat(grey[..., None], 3, -1), atol=1.0)
  out, plain = _write(image, warp=False, jitter=True, contrast=0.5)
  mean_grey = (plain @ grey_weights).mean()
  np.testing.assert_allclose(out, np.clip(0.5 * plain + 0.5 * mean_grey, 0, 255), atol=1.0)
