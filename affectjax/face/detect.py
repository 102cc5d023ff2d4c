"""Batched MTCNN face detection (boxes, scores, five landmarks) in JAX, with static shapes.

The pipeline of the `mtcnn` wheel 1.0.0 (`MTCNN().detect_faces`), on the device and jit-compiled
once per frame resolution and batch size:

1. P-Net over an image pyramid: scales (12 / min_face_size) * scale_factor**k for k <
   round(-(log(min(H, W) / 12) / log(scale_factor) + 1)), each level of size int(H * s) x
   int(W * s), resized with TF's area filter (tf.image.resize(method=AREA), reproduced here by
   fixed per-resolution gather taps). The levels are packed into one image, so P-Net runs once
   (its first layer's outputs outside each level masked before the max pooling: each level's
   windows are those of P-Net on the level alone). Windows scoring > thresholds[0] become
   boxes: the 12-pixel window at (2x + 1, 2y + 1)..(2x + 12, 2y + 12) moved by 11 * the
   regression, divided by s; NMS per scale (IoU > 0.5), then across scales (IoU > 0.7), then
   made square.
2. R-Net on 24x24 crops (tf.image.crop_and_resize's bilinear sampling, reproduced): score >
   thresholds[1], boxes moved by the regression times (size + 1), NMS (IoU > 0.7), square.
3. O-Net on 48x48 crops: landmarks = (size + 1) * output + corner - 1 on the input box, score >
   thresholds[2], boxes moved likewise, NMS with IoU over the smaller area (> 0.7); boxes clipped
   to the image, landmarks not (detect_faces' defaults).

The reference's NMS is not the greedy one: with boxes sorted by score, a box is dropped when any
higher-scoring box (kept or not) overlaps it beyond the threshold. That is a masked IoU matrix
here, with no loop. Static shapes: each stage keeps a fixed number of candidates (the highest
scoring, `DetectConfig`'s *_candidates) with a validity mask; the reference keeps them all, so
results differ only where a frame has more candidates than that (the output 'overflow').
"""
import functools
from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from affectjax.face import mtcnn

KEYPOINTS = ('left_eye', 'right_eye', 'nose', 'mouth_left', 'mouth_right')


class DetectConfig(NamedTuple):
  """Detection settings (hashable: a static argument of the jitted pipeline). The defaults of
  the first four are the mtcnn wheel's (min_face_size, scale_factor, threshold_pnet/rnet/onet,
  nms_pnet1/pnet2/rnet/onet). The *_candidates caps are this port's: raise them for crowded or
  large frames when 'overflow' is set (the cost grows as their square for NMS)."""
  min_face_size: float = 20.0
  scale_factor: float = 0.709
  thresholds: Tuple[float, float, float] = (0.6, 0.7, 0.8)
  # IoU thresholds: P-Net per scale, P-Net across scales, R-Net, O-Net (IoU over the min area).
  nms_thresholds: Tuple[float, float, float, float] = (0.5, 0.7, 0.7, 0.7)
  max_faces: int = 8  # K: the detections returned per frame, highest scores first
  pnet_candidates: int = 2048  # the best P-Net windows above thresholds[0], all levels
  rnet_candidates: int = 512  # P-Net boxes that R-Net sees
  onet_candidates: int = 32  # R-Net boxes that O-Net sees
  # R-Net and O-Net see their first bucket of candidates always, the rest only when a frame of
  # the batch has more valid ones (a device-side conditional).
  buckets: Tuple[int, int] = (128, 8)


# The arrays `detect_faces` returns per frame: up to K = max_faces faces, highest score first,
# invalid slots zero. boxes [N, K, 4] float32 (x0, y0, x1, y1) pixels, clipped to [0, W - 1] x
# [0, H - 1]; scores [N, K] float32 (O-Net's face probability); landmarks [N, K, 5, 2] float32
# (x, y) in KEYPOINTS order, not clipped; valid [N, K] bool; overflow [N] bool: some stage had
# more candidates than its cap (the reference, which has none, might have found other faces).
OUTPUTS = ('boxes', 'scores', 'landmarks', 'valid', 'overflow')


def _pnet_size(n: int) -> int:
  return (n - 1) // 2 - 4  # conv 3 (valid), max pool 2 / 2 (same), conv 3, conv 3


@functools.lru_cache(maxsize=None)
def pyramid(height: int, width: int, min_face_size: float = 20.0,
            scale_factor: float = 0.709) -> Tuple[Tuple[float, int, int], ...]:
  """The pyramid levels (scale, level height, level width) for H x W frames, as the reference
  computes them (float64; sizes truncated), less levels too small for one P-Net window."""
  count = round(-((np.log(min(height, width) / 12) / np.log(scale_factor)) + 1))
  scales = (12 / min_face_size) * scale_factor ** np.arange(max(count, 0))
  levels = [(float(s), int(height * s), int(width * s)) for s in scales]
  return tuple(lv for lv in levels if min(_pnet_size(lv[1]), _pnet_size(lv[2])) > 0)


@functools.lru_cache(maxsize=None)
def area_taps(in_size: int, out_size: int) -> Tuple[np.ndarray, np.ndarray]:
  """TF's ResizeArea along one axis: out[y] = sum_t weights[y, t] * in[index[y, t]], the mean
  of in over [y * r, (y + 1) * r), r = in_size / out_size (fractional pixels weighted by their
  overlap). index int32 [out_size, T], weights float32 [out_size, T] (zero-padded taps)."""
  r = np.float32(in_size) / np.float32(out_size)
  lo = np.arange(out_size, dtype=np.float32) * r
  hi = np.arange(1, out_size + 1, dtype=np.float32) * r
  start, end = np.floor(lo).astype(np.int64), np.ceil(hi).astype(np.int64)
  taps = int((end - start).max())
  i = start[:, None] + np.arange(taps)[None, :]
  overlap = np.minimum(i + 1, hi[:, None]) - np.maximum(i, lo[:, None])
  weights = np.where(i < end[:, None], overlap, 0.0) / r
  return np.minimum(i, in_size - 1).astype(np.int32), weights.astype(np.float32)


def _area_axis(x: jax.Array, size: int, axis: int) -> jax.Array:
  index, weights = area_taps(x.shape[axis], size)
  shape = [1] * x.ndim
  shape[axis] = size
  total = 0.0
  for t in range(index.shape[1]):  # a few taps (about 1 / scale + 1): fused gathers, no matmul
    total = total + jnp.take(x, index[:, t], axis=axis) * weights[:, t].reshape(shape)
  return total


def resize_area(images: jax.Array, height: int, width: int) -> jax.Array:
  """float32 [N, H, W, C] -> [N, height, width, C] by area averaging (tf.image.resize AREA)."""
  return _area_axis(_area_axis(images, width, 2), height, 1)


def crop_resize(images: jax.Array, boxes: jax.Array, size: int) -> jax.Array:
  """tf.image.crop_and_resize as the reference calls it (boxes divided by the image size, so
  corners land at x * (W - 1) / W): images float32 [N, H, W, C], boxes [N, R, 4] (x0, y0, x1,
  y1) pixels -> bilinear crops [N, R, size, size, C]; samples outside the image are 0."""
  n, h, w, c = images.shape
  t = jnp.arange(size, dtype=jnp.float32)

  def axis(lo, hi, extent):  # [N, R] corners -> sample positions, floor index, weight, inside
    lo, hi = lo / extent, hi / extent
    pos = lo[..., None] * (extent - 1) + t * ((hi - lo) * (extent - 1) / (size - 1))[..., None]
    first = jnp.floor(pos)
    inside = (pos >= 0) & (pos <= extent - 1)
    return (jnp.clip(first, 0, extent - 1).astype(jnp.int32),
            jnp.clip(jnp.ceil(pos), 0, extent - 1).astype(jnp.int32), pos - first, inside)

  y0, y1, wy, iny = axis(boxes[..., 1], boxes[..., 3], h)
  x0, x1, wx, inx = axis(boxes[..., 0], boxes[..., 2], w)
  flat = images.reshape(n, h * w, c)
  pick = lambda ys, xs: jax.vmap(lambda f, i: f[i])(
      flat, (ys[..., :, None] * w + xs[..., None, :]).reshape(n, -1)).reshape(
          n, -1, size, size, c)
  wx = wx[..., None, :, None]
  top_left, bottom_left = pick(y0, x0), pick(y1, x0)
  top = top_left + (pick(y0, x1) - top_left) * wx
  bottom = bottom_left + (pick(y1, x1) - bottom_left) * wx
  out = top + (bottom - top) * wy[..., :, None, None]
  return jnp.where((iny[..., :, None] & inx[..., None, :])[..., None], out, 0.0)


def _iou(boxes: jax.Array, over_min: bool = False) -> jax.Array:
  """Boxes [..., M, 4] (x0, y0, x1, y1) -> [..., M, M] intersection over union (or over the
  smaller area), as the reference computes it (no +1 on sizes)."""
  a, b = boxes[..., :, None, :], boxes[..., None, :, :]
  area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])
  side = lambda i: jnp.maximum(0.0, jnp.minimum(a[..., i + 2], b[..., i + 2]) -
                               jnp.maximum(a[..., i], b[..., i]))
  inter = side(0) * side(1)
  return inter / (jnp.minimum(area(a), area(b)) if over_min else area(a) + area(b) - inter)


def _suppress(overlaps: jax.Array, valid: jax.Array) -> jax.Array:
  """overlaps bool [..., M, M], valid [..., M] (sorted by score) -> keep [..., M]: valid with no
  valid earlier box overlapping."""
  m = valid.shape[-1]
  earlier = np.arange(m)[:, None] < np.arange(m)[None, :]
  return valid & ~jnp.any(overlaps & earlier & valid[..., :, None], axis=-2)


def nms(boxes: jax.Array, valid: jax.Array, threshold: float, over_min: bool = False):
  """The reference's NMS: boxes [..., M, 4] sorted by score (highest first) among the valid
  [..., M] -> keep [..., M] bool: valid and no valid earlier box with IoU > threshold (IoU =
  intersection / union, or / the smaller area when over_min)."""
  return _suppress(_iou(boxes, over_min) > threshold, valid)


def _best(scores, valid, k, *arrays):
  """The k highest valid scores, sorted: (scores [N, k], valid [N, k], *arrays [N, k, ...]
  gathered); fewer than k entries are padded with invalid ones."""
  if k > scores.shape[1]:
    pad = lambda x, v: jnp.pad(x, [(0, 0), (0, k - x.shape[1])] + [(0, 0)] * (x.ndim - 2),
                               constant_values=v)
    scores, valid, arrays = pad(scores, 0), pad(valid, False), [pad(x, 0) for x in arrays]
  top, order = jax.lax.top_k(jnp.where(valid, scores, -jnp.inf), k)
  take = lambda x: jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), 1)
  return (top, top > -jnp.inf) + tuple(take(x) for x in arrays)


def _square(boxes):
  """Boxes [..., 4] -> squares of side max(w, h) with the same centres (the reference's)."""
  w, h = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
  side = jnp.maximum(w, h)
  x0, y0 = boxes[..., 0] + 0.5 * (w - side), boxes[..., 1] + 0.5 * (h - side)
  return jnp.stack([x0, y0, x0 + side, y0 + side], axis=-1)


def _refine(boxes, offsets):
  """Boxes moved by the regression offsets [..., 4] times (w + 1, h + 1, w + 1, h + 1)."""
  w, h = boxes[..., 2] - boxes[..., 0] + 1, boxes[..., 3] - boxes[..., 1] + 1
  return boxes + offsets * jnp.stack([w, h, w, h], axis=-1)


class _Mosaic(NamedTuple):
  """The pyramid levels packed into one image (at even offsets, in shelves), so that P-Net runs
  once. levels: (scale, height, width, top, left); size: the mosaic's (height, width); mask:
  bool [height - 2, width - 2], P-Net's first-layer outputs that lie inside one level; and per
  P-Net output position (flattened), the level (-1: none), its scale and the window's column
  and row within the level's own map."""
  levels: Tuple[Tuple[float, int, int, int, int], ...]
  size: Tuple[int, int]
  mask: np.ndarray
  level: np.ndarray
  scale: np.ndarray
  column: np.ndarray
  row: np.ndarray


@functools.lru_cache(maxsize=None)
def _mosaic(height: int, width: int, min_face_size: float, scale_factor: float) -> _Mosaic:
  levels = pyramid(height, width, min_face_size, scale_factor)
  even = lambda n: n + n % 2
  limit = sum(even(w) for _, _, w in levels[:2])
  placed, top, left, shelf = [], 0, 0, 0
  for scale, h, w in levels:
    if left + even(w) > limit:
      top, left, shelf = top + shelf, 0, 0
    placed.append((scale, h, w, top, left))
    left, shelf = left + even(w), max(shelf, even(h))
  size = (max(top + shelf, 12), max(limit, 12))
  mask = np.zeros((size[0] - 2, size[1] - 2), bool)
  map_h, map_w = _pnet_size(size[0]), _pnet_size(size[1])
  tables = np.zeros((4, map_h, map_w))
  tables[0] = -1
  for i, (scale, h, w, top, left) in enumerate(placed):
    mask[top:top + h - 2, left:left + w - 2] = True
    rows, cols = np.mgrid[:_pnet_size(h), :_pnet_size(w)]
    fill = np.stack([np.full(rows.shape, i), np.full(rows.shape, scale), cols, rows])
    tables[:, top // 2 + rows, left // 2 + cols] = fill
  flat = tables.reshape(4, -1)
  return _Mosaic(tuple(placed), size, mask, flat[0].astype(np.int32), flat[1], flat[2], flat[3])


def _proposals(variables, images, config: DetectConfig):
  """Stage 1 on the packed pyramid: P-Net boxes [N, M, 4], scores [N, M], keep [N, M] (sorted
  by score), overflow [N] (more windows above the threshold than config.pnet_candidates)."""
  n, height, width, c = images.shape
  mosaic = _mosaic(height, width, config.min_face_size, config.scale_factor)
  canvas = jnp.zeros((n,) + mosaic.size + (c,), jnp.float32)
  for _, h, w, top, left in mosaic.levels:
    canvas = canvas.at[:, top:top + h, left:left + w].set(resize_area(images, h, w))
  reg, prob = mtcnn.PNet().apply(variables, canvas, jnp.asarray(mosaic.mask))
  score = prob[..., 1].reshape(n, -1)
  above = (score > config.thresholds[0]) & jnp.asarray(mosaic.level >= 0)
  k = min(int((mosaic.level >= 0).sum()), config.pnet_candidates)
  overflow = above.sum(axis=1) > k
  position = jnp.arange(score.shape[1])[None].repeat(n, 0)
  score, valid, position = _best(score, above, k, position)
  offsets = jnp.take_along_axis(reg.reshape(n, -1, 4), position[..., None], axis=1)
  table = lambda t: jnp.asarray(t, jnp.float32)[position]
  corner = jnp.stack([table(mosaic.column), table(mosaic.row)], axis=-1) * 2 + 1
  box = (jnp.concatenate([corner, corner + 11], axis=-1) + offsets * 11) / table(
      mosaic.scale)[..., None]
  iou = _iou(box)
  level = jnp.asarray(mosaic.level)[position]
  same_level = level[..., :, None] == level[..., None, :]
  keep = _suppress((iou > config.nms_thresholds[0]) & same_level, valid)  # per level
  return box, score, _suppress(iou > config.nms_thresholds[1], keep), overflow  # across levels


def _crops(images, boxes, size):
  """[N, m, 4] boxes -> crops [N * m, size, size, 3] for R-Net or O-Net."""
  return crop_resize(images, boxes, size).reshape((-1, size, size, images.shape[-1]))


def _bucketed(net, boxes, valid, bucket: int):
  """net(boxes [N, m, 4]) -> arrays [N * m, ...], on the candidates [N, k, 4] sorted valid
  first: the first `bucket` always, the rest only when some frame has more valid ones (the
  outputs there are zero otherwise). Returns the outputs as [N, k, ...]."""
  n, k = valid.shape
  shaped = lambda outs, m: tuple(o.reshape((n, m) + o.shape[1:]) for o in outs)
  if k <= bucket:
    return shaped(net(boxes), k)
  first, rest = boxes[:, :bucket], boxes[:, bucket:]
  zeros = lambda: jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                         jax.eval_shape(net, rest))
  later = jax.lax.cond(valid[:, bucket:].any(), lambda: net(rest), zeros)
  return tuple(jnp.concatenate(pair, axis=1)
               for pair in zip(shaped(net(first), bucket), shaped(later, k - bucket)))


def detect_faces(variables, frames: jax.Array, config: DetectConfig = DetectConfig()):
  """MTCNN on a batch of frames of one resolution (jit-able with `config` static).

  variables: `mtcnn.load_weights()`'s {'pnet', 'rnet', 'onet'}; frames: uint8 [N, H, W, 3]
  RGB -> {'boxes': [N, K, 4], 'scores': [N, K], 'landmarks': [N, K, 5, 2], 'valid': [N, K],
  'overflow': [N]} (see OUTPUTS), K = config.max_faces.
  """
  n, height, width, _ = frames.shape
  if not pyramid(height, width, config.min_face_size, config.scale_factor):  # too small
    k = config.max_faces
    return {'boxes': jnp.zeros((n, k, 4)), 'scores': jnp.zeros((n, k)),
            'landmarks': jnp.zeros((n, k, 5, 2)), 'valid': jnp.zeros((n, k), bool),
            'overflow': jnp.zeros((n,), bool)}
  images = (frames.astype(jnp.float32) - 127.5) / 128
  box, score, keep, overflow = _proposals(variables['pnet'], images, config)

  k = min(keep.shape[1], config.rnet_candidates)
  overflow |= keep.sum(axis=1) > k
  _, valid, box = _best(score, keep, k, box)
  box = _square(box)
  rnet = lambda b: mtcnn.RNet().apply(variables['rnet'], _crops(images, b, 24))
  reg, prob = _bucketed(rnet, box, valid, config.buckets[0])
  score, box = prob[..., 1], _refine(box, reg)
  score, valid, box = _best(score, valid & (score > config.thresholds[1]), k, box)
  keep = nms(box, valid, config.nms_thresholds[2])

  k = min(k, config.onet_candidates)
  overflow |= keep.sum(axis=1) > k
  _, valid, box = _best(score, keep, k, box)
  box = _square(box)
  onet = lambda b: mtcnn.ONet().apply(variables['onet'], _crops(images, b, 48))
  reg, marks, prob = _bucketed(onet, box, valid, config.buckets[1])
  marks = marks.reshape(n, k, 2, 5).transpose(0, 1, 3, 2)  # [N, k, 5, (x, y)]
  size = box[..., 2:] - box[..., :2] + 1
  marks = marks * size[..., None, :] + box[..., None, :2] - 1
  score, box = prob[..., 1], _refine(box, reg)
  score, valid, box, marks = _best(score, valid & (score > config.thresholds[2]), k, box, marks)
  keep = nms(box, valid, config.nms_thresholds[3], over_min=True)

  score, valid, box, marks = _best(score, keep, config.max_faces, box, marks)
  limit = jnp.asarray([width - 1, height - 1, width - 1, height - 1], jnp.float32)
  box = jnp.clip(box, 0.0, limit)
  zero = lambda x: jnp.where(valid.reshape(valid.shape + (1,) * (x.ndim - 2)), x, 0.0)
  return {'boxes': zero(box), 'scores': zero(score), 'landmarks': zero(marks), 'valid': valid,
          'overflow': overflow}


class Detector:
  """A jit-compiled `detect_faces` with its weights: one compilation per frame shape (the
  pyramid and all buffer sizes are fixed per resolution and batch size).

  detector = Detector(); out = detector(frames)  # uint8 [N, H, W, 3] -> detect_faces' dict
  variables: `mtcnn.load_weights()` (the default); settings: DetectConfig fields, e.g.
  max_faces=8. `traces` counts the compilations so far.
  """

  def __init__(self, variables: Optional[dict] = None, **settings):
    self.config = DetectConfig(**settings)
    self.variables = jax.device_put(variables if variables is not None else
                                    mtcnn.load_weights())
    self.traces = 0
    self._detect = jax.jit(self._traced)

  def _traced(self, variables, frames):
    self.traces += 1
    return detect_faces(variables, frames, self.config)

  def detect(self, frames) -> dict:
    """uint8 [N, H, W, 3] RGB frames (one resolution) -> `detect_faces`' dict of device arrays
    (boxes [N, K, 4], scores [N, K], landmarks [N, K, 5, 2], valid [N, K], overflow [N])."""
    frames = jnp.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != jnp.uint8:
      raise ValueError(f'frames must be uint8 [N, H, W, 3], got {frames.dtype} {frames.shape}')
    return self._detect(self.variables, frames)

  __call__ = detect


def keypoints(landmarks) -> dict:
  """[5, 2] landmarks of one face -> {name: (x, y)} with the mtcnn wheel's names."""
  return {name: (float(x), float(y)) for name, (x, y) in zip(KEYPOINTS, np.asarray(landmarks))}

