"""Host-side JPEG decoding and augmentation of face crops, in uint8 from bytes to batch row.

Decoder: simplejpeg (libjpeg-turbo) with its default accurate DCT and fancy upsampling. On the
112x112 crops it is as fast as OpenCV, about twice as fast as PIL, and its output is identical to
PIL's, so models pretrained on PIL-decoded images see the same pixels. `fastdct` / `fastupsample`
save a few percent of decode time for errors of up to 3 (DCT) and 14 (upsampling) grey levels on
4:2:0 crops (measured by benchmarks/bench_pipeline.py), so they stay off.

Augmentation is one affine warp (flip, rotation, scale, translation folded into one matrix) and
one 3x4 colour matrix (brightness, saturation, contrast) applied with `cv2.transform`, all on
uint8. A bilinear warp runs on 4-channel (RGBX) images: OpenCV's vectorised path makes it about
1.6x faster than on 3 channels. Normalisation is left to the device.
"""
import dataclasses

import cv2
import ml_collections
import numpy as np
import simplejpeg

# Per-sample OpenCV calls on 112x112 images are far too small to gain from OpenCV's own threads;
# parallelism comes from grain threads and worker processes instead.
cv2.setNumThreads(1)

_INTERPOLATION = ('bilinear', 'nearest')
_AREA_MIN_RATIO = 1.5  # smaller reductions resize bilinearly (see decode_jpeg)
_GREY_WEIGHTS = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601 luma, as PIL's 'L'


def default_augment_config() -> ml_collections.ConfigDict:
  """Host augmentation strengths; all zero/False = no augmentation."""
  return ml_collections.ConfigDict({
      'flip': False,  # random horizontal flip with probability 0.5
      'rotate_deg': 0.0,  # rotation angle ~ U(-rotate_deg, rotate_deg) degrees
      'scale': 0.0,  # zoom factor ~ U(1 - scale, 1 + scale)
      'translate': 0.0,  # shift ~ U(-translate, translate) x image size, per axis
      'color_jitter': 0.0,  # brightness, contrast, saturation factors ~ U(1 - c, 1 + c)
      # Warp resampling: 'bilinear', or 'nearest' (torchvision RandomRotation's default,
      # about 2.5x cheaper on the host).
      'interpolation': 'bilinear',
  })


def decode_jpeg(data: bytes, image_size: int | None = None, colorspace: str = 'RGB'):
  """Decodes JPEG bytes to uint8 [H, W, C] (C = 3 for 'RGB', 4 for 'RGBX'); None if corrupt.

  With `image_size`, a larger image is first reduced inside the decoder (libjpeg-turbo DCT
  scaling by the smallest M/8 that stays at or above `image_size`, e.g. 112 -> 70 for 64), then
  resized to exactly `image_size` square: INTER_AREA when a reduction of at least
  `_AREA_MIN_RATIO` remains, else INTER_LINEAR. After DCT scaling the remaining reduction is
  usually small (70 -> 64 is 1.09x), where bilinear and area averaging differ by 0.4 grey levels
  on average (99th percentile 4) while bilinear costs a sixth of the time (8 vs 44 us per crop).
  """
  if not data:
    return None
  try:
    kwargs = {}
    if image_size:
      kwargs = dict(min_height=image_size, min_width=image_size)
    image = simplejpeg.decode_jpeg(data, colorspace=colorspace, strict=True, **kwargs)
  except ValueError:  # simplejpeg reports corrupt, truncated and non-JPEG data as ValueError
    return None
  if image_size and image.shape[:2] != (image_size, image_size):
    ratio = min(image.shape[0], image.shape[1]) / image_size
    image = cv2.resize(image, (image_size, image_size),
                       interpolation=cv2.INTER_AREA if ratio >= _AREA_MIN_RATIO
                       else cv2.INTER_LINEAR)
  return image


@dataclasses.dataclass(frozen=True)
class AugmentParams:
  """Per-sample augmentation draws, each float32 [B] (flip bool [B])."""
  flip: np.ndarray
  angle: np.ndarray
  scale: np.ndarray
  shift_x: np.ndarray
  shift_y: np.ndarray
  brightness: np.ndarray
  contrast: np.ndarray
  saturation: np.ndarray

  def rows(self, start: int, stop: int) -> 'AugmentParams':
    """The draws of samples start..stop-1."""
    return AugmentParams(**{f.name: getattr(self, f.name)[start:stop]
                            for f in dataclasses.fields(self)})


def sample_augment(rng: np.random.Generator, n: int, config) -> AugmentParams:
  """Draws the augmentation of n samples. Every field is always drawn, in a fixed order, so
  turning one augmentation on does not change the draws of the others."""
  u = rng.uniform(-1.0, 1.0, size=(7, n)).astype(np.float32)
  flip = rng.random(n) < 0.5
  c = float(config.color_jitter)
  return AugmentParams(
      flip=flip & bool(config.flip), angle=u[0] * float(config.rotate_deg),
      scale=1.0 + u[1] * float(config.scale), shift_x=u[2] * float(config.translate),
      shift_y=u[3] * float(config.translate), brightness=1.0 + u[4] * c,
      contrast=1.0 + u[5] * c, saturation=1.0 + u[6] * c)


def needs_warp(config) -> bool:
  """Whether any geometric augmentation beyond a flip is configured."""
  return bool(config.rotate_deg or config.scale or config.translate)


def affine_matrix(size: int, flip: bool, angle: float, scale: float, shift_x: float,
                  shift_y: float) -> np.ndarray:
  """float64 [2, 3] mapping source to output pixels: flip, then rotate (degrees, counter-
  clockwise on screen) and scale about the centre, then shift by fractions of the size."""
  centre = (size - 1) / 2.0
  rotation = cv2.getRotationMatrix2D((centre, centre), float(angle), float(scale))
  if flip:  # x -> size - 1 - x, applied before the rotation
    rotation = rotation @ np.array([[-1.0, 0.0, size - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
  rotation[:, 2] += (float(shift_x) * size, float(shift_y) * size)
  return rotation


def colour_matrix(brightness: float, contrast: float, saturation: float,
                  mean_rgb: np.ndarray) -> np.ndarray:
  """float32 [3, 4] colour transform: scale by brightness, blend with the pixel's grey by
  saturation, then with the image's mean grey by contrast (torchvision's ColorJitter factors,
  in that fixed order, clipped once at the end instead of after each step)."""
  grey = np.outer(np.ones(3, np.float32), _GREY_WEIGHTS)
  linear = brightness * (saturation * np.eye(3, dtype=np.float32) + (1.0 - saturation) * grey)
  mean_grey = brightness * float(_GREY_WEIGHTS @ mean_rgb)  # saturation keeps the grey level
  offset = (1.0 - contrast) * mean_grey
  return np.concatenate([contrast * linear, np.full((3, 1), offset, np.float32)], axis=1)


class RowWriter:
  """Decodes one record's JPEG into a batch row, applying sample i's augmentation.

  Holds scratch buffers, so use one instance per thread.
  """

  def __init__(self, image_size: int, augment_config=None):
    self.size = image_size
    self.config = augment_config
    self.warp = augment_config is not None and needs_warp(augment_config)
    if self.warp and augment_config.interpolation not in _INTERPOLATION:
      raise ValueError(f"augment.interpolation must be 'bilinear' or 'nearest', got "
                       f'{augment_config.interpolation!r}')
    self.bilinear = self.warp and augment_config.interpolation == 'bilinear'
    self.jitter = augment_config is not None and bool(augment_config.color_jitter)
    self._rgbx = np.empty((image_size, image_size, 4), np.uint8)

  def write(self, out: np.ndarray, jpeg: bytes, params: AugmentParams | None, i: int) -> bool:
    """Fills out (uint8 [S, S, 3]) from `jpeg`; False (out untouched) if it does not decode."""
    # A bilinear warp is faster on 4 channels, so decode straight to RGBX for it.
    image = decode_jpeg(jpeg, self.size,
                        colorspace='RGBX' if params is not None and self.bilinear else 'RGB')
    if image is None:
      return False
    self.place(out, image, params, i)
    return True

  def write_record(self, out: np.ndarray, record: dict, params: AugmentParams | None,
                   i: int) -> bool:
    """`write` for a source record: JPEG bytes (`'jpeg'`) or already decoded pixels
    (`'image'`, uint8 [S, S, 3], None for a bad frame; see affectjax.data.decoded_cache)."""
    if 'jpeg' in record:
      return self.write(out, record['jpeg'], params, i)
    if record['image'] is None:
      return False
    self.place(out, record['image'], params, i)
    return True

  def place(self, out: np.ndarray, image: np.ndarray, params: AugmentParams | None,
            i: int) -> None:
    """Writes decoded pixels (uint8 [S, S, 3 or 4]) to out with sample i's augmentation. The
    warp gives the same pixels from 3 or 4 channels (OpenCV interpolates each channel alike)."""
    if params is None:
      np.copyto(out, image[..., :3])
      return
    if self.warp:
      matrix = affine_matrix(self.size, params.flip[i], params.angle[i], params.scale[i],
                             params.shift_x[i], params.shift_y[i])
      size = (self.size, self.size)
      if self.bilinear and image.shape[-1] == 4:
        cv2.warpAffine(image, matrix, size, dst=self._rgbx, flags=cv2.INTER_LINEAR,
                       borderMode=cv2.BORDER_REFLECT_101)
        cv2.cvtColor(self._rgbx, cv2.COLOR_RGBA2RGB, dst=out)
      else:
        cv2.warpAffine(np.ascontiguousarray(image[..., :3]), matrix, size, dst=out,
                       flags=cv2.INTER_LINEAR if self.bilinear else cv2.INTER_NEAREST,
                       borderMode=cv2.BORDER_REFLECT_101)
    elif params.flip[i]:
      cv2.flip(image[..., :3], 1, dst=out)
    else:
      np.copyto(out, image[..., :3])
    if self.jitter:
      mean_rgb = np.array(cv2.mean(out)[:3], np.float32)
      matrix = colour_matrix(params.brightness[i], params.contrast[i], params.saturation[i],
                             mean_rgb)
      cv2.transform(out, matrix, dst=out)
