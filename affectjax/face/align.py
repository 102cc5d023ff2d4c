"""Five-point face alignment to 112x112 crops on the device, and faces tracked across frames.

The template: the ArcFace 112x112 five-point template (insightface's `arcface_dst`: eye centres,
nose tip, mouth corners). Aff-Wild2's `cropped_aligned` crops are 112x112, aligned on five
landmarks of a RetinaFace detection; the set's documentation names no template, and ArcFace's
is the standard 112x112 five-point one that such pipelines use, framing the face as the
Aff-Wild2 crops do (eyes a little under half-way down, the mouth at five sixths). `--template`
scales it for other crop sizes.

Landmarks are in MTCNN's order: left eye, right eye, nose, mouth left, mouth right (left and
right as seen in the image).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

TEMPLATE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                         [41.5493, 92.3655], [70.7299, 92.2041]], np.float32)


def template(size: int = 112) -> np.ndarray:
  """float32 [5, 2] (x, y): the ArcFace template scaled to a size x size crop."""
  return TEMPLATE_112 * (size / 112.0)


def similarity(points: jnp.ndarray, target: jnp.ndarray) -> jnp.ndarray:
  """float32 [..., 2, 3]: the least-squares similarity transform (Umeyama 1991: rotation,
  uniform scale, translation; no reflection) taking `points` [..., P, 2] onto `target` [P, 2],
  so that target ~ M[:, :2] @ p + M[:, 2]."""
  def one(p):
    mu_p, mu_q = p.mean(0), target.mean(0)
    pc, qc = p - mu_p, target - mu_q
    u, s, vt = jnp.linalg.svd(qc.T @ pc / p.shape[0])
    d = jnp.sign(jnp.linalg.det(u) * jnp.linalg.det(vt))
    d = jnp.where(d == 0, 1.0, d)
    rotation = u @ jnp.diag(jnp.array([1.0, d])) @ vt
    scale = (s[0] + d * s[1]) / jnp.maximum(jnp.mean(jnp.sum(pc ** 2, -1)), 1e-12)
    translation = mu_q - scale * rotation @ mu_p
    return jnp.concatenate([scale * rotation, translation[:, None]], 1)
  points = jnp.asarray(points, jnp.float32)
  target = jnp.asarray(target, jnp.float32)
  flat = points.reshape((-1,) + points.shape[-2:])
  return jax.vmap(one)(flat).reshape(points.shape[:-2] + (2, 3))


def warp(images: jnp.ndarray, matrices: jnp.ndarray, size: int) -> jnp.ndarray:
  """uint8 [N, size, size, 3]: images uint8 [N, H, W, 3] resampled through the affine maps
  [N, 2, 3] (image -> crop coordinates, pixel centres at integers, as cv2.warpAffine), bilinear,
  black outside the image."""
  grid = jnp.stack(jnp.meshgrid(jnp.arange(size), jnp.arange(size), indexing='xy'), -1)
  grid = grid.reshape(-1, 2).astype(jnp.float32)  # (x, y) of every output pixel

  def one(image, m):
    a, t = m[:, :2], m[:, 2]
    source = (grid - t) @ jnp.linalg.inv(a).T  # (x, y) in the image
    x, y = source[:, 0], source[:, 1]
    x0, y0 = jnp.floor(x), jnp.floor(y)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    h, w = image.shape[:2]

    def at(yy, xx):
      inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
      pixel = image[jnp.clip(yy, 0, h - 1).astype(jnp.int32),
                    jnp.clip(xx, 0, w - 1).astype(jnp.int32)].astype(jnp.float32)
      return jnp.where(inside[:, None], pixel, 0.0)

    out = ((1 - fy) * ((1 - fx) * at(y0, x0) + fx * at(y0, x0 + 1)) +
           fy * ((1 - fx) * at(y0 + 1, x0) + fx * at(y0 + 1, x0 + 1)))
    return jnp.clip(jnp.round(out), 0, 255).astype(jnp.uint8).reshape(size, size, -1)
  return jax.vmap(one)(images, matrices.astype(jnp.float32))


@functools.partial(jax.jit, static_argnames=('size',))
def align(images: jnp.ndarray, landmarks: jnp.ndarray, size: int = 112) -> tuple:
  """(crops uint8 [N, size, size, 3], matrices [N, 2, 3]): each image's face, its landmarks
  [N, 5, 2] brought onto the template."""
  matrices = similarity(landmarks, jnp.asarray(template(size)))
  return warp(images, matrices, size), matrices


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """[len(a), len(b)] intersection over union of (x0, y0, x1, y1) boxes."""
  a, b = np.asarray(a, np.float64)[:, None], np.asarray(b, np.float64)[None]
  w = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
  h = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
  area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])
  inter = w * h
  return inter / np.maximum(area(a) + area(b) - inter, 1e-9)


def link(boxes: np.ndarray, valid: np.ndarray, min_iou: float = 0.3, max_gap: int = 10
         ) -> np.ndarray:
  """int [T, K] track ids (-1 where not valid) of the detections boxes [T, K, 4] of T frames:
  each detection joins the track whose last box overlaps it most (IoU at least `min_iou`,
  greedy, best pairs first), the tracks seen within `max_gap` frames first, then those seen
  longer ago (a face found again where it was last, after it turned away, was hidden or left
  the picture for a while, rejoins its track); else it starts a new track."""
  ids = np.full(valid.shape, -1, np.int64)
  last_box, last_seen = [], []
  for t in range(len(boxes)):
    if not valid[t].any():
      continue
    since = t - np.asarray(last_seen, np.int64)  # frames since each track was last seen
    for tracks in (np.flatnonzero(since <= max_gap), np.flatnonzero(since > max_gap)):
      here = [i for i in np.flatnonzero(valid[t]) if ids[t, i] < 0]
      taken = set(ids[t].tolist())
      tracks = [int(k) for k in tracks if k not in taken]
      if not here or not tracks:
        continue
      overlap = iou(boxes[t, here], np.stack([last_box[k] for k in tracks]))
      for flat in np.argsort(-overlap, axis=None):
        i, j = np.unravel_index(flat, overlap.shape)
        if overlap[i, j] < min_iou:
          break
        if ids[t, here[i]] < 0 and tracks[j] not in ids[t]:
          ids[t, here[i]] = tracks[j]
    for i in np.flatnonzero(valid[t]):
      if ids[t, i] < 0:
        ids[t, i] = len(last_box)
        last_box.append(None)
        last_seen.append(t)
      last_box[ids[t, i]], last_seen[ids[t, i]] = boxes[t, i], t
  return ids


def tracks_by_size(ids: np.ndarray, boxes: np.ndarray, min_frames: int = 1) -> list:
  """Track ids with at least `min_frames` frames, largest first (by the sum of their box areas
  over the video, so the person in the picture the longest and the closest comes first)."""
  area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
  found = [k for k in np.unique(ids[ids >= 0]) if (ids == k).sum() >= min_frames]
  return sorted(found, key=lambda k: -float(area[ids == k].sum()))


def follow(ids: np.ndarray, track: int, *arrays) -> tuple:
  """(present bool [T], then each of `arrays` [T, K, ...] at the track's detection per frame,
  zeros where the track is absent)."""
  hit = ids == track
  present = hit.any(1)
  which = hit.argmax(1)
  picked = [np.where(present.reshape((-1,) + (1,) * (a.ndim - 2)),
                     a[np.arange(len(a)), which], 0) for a in arrays]
  return (present, *picked)


def smooth(points: np.ndarray, present: np.ndarray, window: int) -> np.ndarray:
  """points [T, ...] averaged over a centred window of `window` frames among the frames where
  `present`; absent frames stay as they were. window <= 1 leaves them as they are."""
  if window <= 1:
    return points
  flat = points.reshape(len(points), -1).astype(np.float64)
  weight = present.astype(np.float64)
  kernel = np.ones(window)
  sums = np.stack([np.convolve(flat[:, d] * weight, kernel, 'same')
                   for d in range(flat.shape[1])], 1)
  count = np.convolve(weight, kernel, 'same')[:, None]
  out = np.where(present[:, None], sums / np.maximum(count, 1e-9), flat)
  return out.reshape(points.shape).astype(points.dtype)
