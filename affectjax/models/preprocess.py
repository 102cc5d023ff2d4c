"""Device-side preprocessing: normalisation, resizing and random flip + affine augmentation.

Images arrive as uint8 RGB [B,H,W,3] (the data pipeline never normalises); everything here is
jit-able, takes explicit PRNG keys and never syncs with the host.
"""
import math
from typing import Any, Mapping, Sequence, Union

import jax
import jax.numpy as jnp

# Means and stds are on the 0..255 scale, in the channel order given (BGR means are (B, G, R)).
IMAGENET = {'channel_order': 'RGB', 'mean': tuple(255 * m for m in (0.485, 0.456, 0.406)),
            'std': tuple(255 * s for s in (0.229, 0.224, 0.225))}
VGGFACE2 = {'channel_order': 'BGR', 'mean': (91.4953, 103.8827, 131.0912),
            'std': (1.0, 1.0, 1.0)}
UNIT = {'channel_order': 'RGB', 'mean': (127.5, 127.5, 127.5), 'std': (127.5, 127.5, 127.5)}
PRESETS = {'imagenet': IMAGENET, 'vggface2': VGGFACE2, 'unit': UNIT}


def normalize(images_uint8: jax.Array, preprocessing: Mapping[str, Any],
              dtype: Any = jnp.float32) -> jax.Array:
  """RGB images [..., 3] (uint8 or float on 0..255) -> (reordered - mean) / std in dtype."""
  order = preprocessing['channel_order']
  if order not in ('RGB', 'BGR'):
    raise ValueError(f"channel_order must be 'RGB' or 'BGR', got {order!r}")
  x = images_uint8.astype(jnp.float32)
  if order == 'BGR':
    x = x[..., ::-1]
  mean = jnp.asarray(preprocessing['mean'], jnp.float32)
  inv_std = 1.0 / jnp.asarray(preprocessing.get('std', (1.0, 1.0, 1.0)), jnp.float32)
  return ((x - mean) * inv_std).astype(dtype)


def _cast_like(x: jax.Array, dtype: Any) -> jax.Array:
  """Casts float32 results back to the input dtype, rounding and clipping for integers."""
  if jnp.issubdtype(dtype, jnp.integer):
    info = jnp.iinfo(dtype)
    x = jnp.clip(jnp.round(x), info.min, info.max)
  return x.astype(dtype)


def resize(images: jax.Array, size: Union[int, Sequence[int]],
           method: str = 'bilinear') -> jax.Array:
  """[B,H,W,C] -> [B,h,w,C] (size int for square), same dtype (antialiased when shrinking)."""
  h, w = (size, size) if isinstance(size, int) else tuple(size)
  if images.shape[1:3] == (h, w):
    return images
  out = jax.image.resize(images.astype(jnp.float32), (images.shape[0], h, w, images.shape[3]),
                         method=method)
  return _cast_like(out, images.dtype)


def affine_warp(images: jax.Array, matrices: jax.Array, fill: float = 0.0) -> jax.Array:
  """Bilinear warp: out[b, y, x] = images[b] sampled at matrices[b] @ (y, x, 1).

  images [B,H,W,C] (any dtype; the result has the same dtype); matrices [B,2,3] map output pixel
  coordinates (row, column) to input coordinates. Samples outside the image read `fill`.
  """
  b, h, w, c = images.shape
  ys, xs = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                        indexing='ij')
  grid = jnp.stack([ys.ravel(), xs.ravel(), jnp.ones(h * w, jnp.float32)])  # [3, HW]
  src = jnp.einsum('bij,jn->bin', matrices.astype(jnp.float32), grid,
                   precision=jax.lax.Precision.HIGHEST)  # [B, 2, HW]
  sy, sx = src[:, 0], src[:, 1]
  y0, x0 = jnp.floor(sy), jnp.floor(sx)
  flat = images.reshape(b, h * w, c).astype(jnp.float32)
  out = jnp.zeros((b, h * w, c), jnp.float32)
  for dy in (0, 1):
    for dx in (0, 1):
      yi, xi = y0 + dy, x0 + dx
      weight = (1 - jnp.abs(sy - yi)) * (1 - jnp.abs(sx - xi))
      inside = (yi >= 0) & (yi <= h - 1) & (xi >= 0) & (xi <= w - 1)
      idx = (jnp.clip(yi, 0, h - 1) * w + jnp.clip(xi, 0, w - 1)).astype(jnp.int32)
      value = jnp.take_along_axis(flat, idx[..., None], axis=1)
      out = out + (weight * jnp.where(inside, 1.0, 0.0))[..., None] * value
      # Fill contributes with the weight of the neighbours that fall outside.
      out = out + (weight * jnp.where(inside, 0.0, fill))[..., None]
  return _cast_like(out.reshape(b, h, w, c), images.dtype)


def random_affine_matrices(key: jax.Array, batch: int, height: int, width: int, *,
                           flip: bool, max_rotate_deg: float, max_scale: float,
                           max_translate: float) -> jax.Array:
  """Per-example inverse affine maps [B,2,3] (output -> input pixel coordinates).

  Each example draws a horizontal flip (probability 1/2 when flip), a rotation uniform in
  +-max_rotate_deg degrees, a zoom factor uniform in 1 +- max_scale and a shift uniform in
  +-max_translate of the image size per axis, all about the image centre.
  """
  k_flip, k_rot, k_scale, k_shift = jax.random.split(key, 4)
  uniform = lambda k, shape, r: jax.random.uniform(k, shape, jnp.float32, -r, r)
  angle = uniform(k_rot, (batch,), math.radians(max_rotate_deg))
  scale = 1.0 + uniform(k_scale, (batch,), max_scale)
  shift = uniform(k_shift, (batch, 2), max_translate) * jnp.array([height, width], jnp.float32)
  mirror = jnp.where(jax.random.bernoulli(k_flip, 0.5, (batch,)), -1.0, 1.0) if flip else (
      jnp.ones((batch,), jnp.float32))
  # Output pixel p maps to input c + A^-1 (p - c - t), with A = scale * rotation(angle) * flip.
  cos, sin = jnp.cos(angle) / scale, jnp.sin(angle) / scale
  inv = jnp.stack([jnp.stack([cos, sin], -1),
                   jnp.stack([-sin * mirror, cos * mirror], -1)], 1)  # [B, 2, 2] (row, col)
  centre = jnp.array([(height - 1) / 2, (width - 1) / 2], jnp.float32)
  offset = centre - jnp.einsum('bij,bj->bi', inv, centre + shift,
                               precision=jax.lax.Precision.HIGHEST)
  return jnp.concatenate([inv, offset[..., None]], axis=-1)


def augment(images: jax.Array, key: jax.Array, *, flip: bool = True,
            max_rotate_deg: float = 0.0, max_scale: float = 0.0,
            max_translate: float = 0.0, fill: float = 0.0) -> jax.Array:
  """Random per-example horizontal flip and affine (see random_affine_matrices), same dtype.

  images [B,H,W,C] uint8 or float; without a rotation/scale/shift range only the flip runs,
  which is then an exact mirror and needs no resampling.
  """
  b, h, w, _ = images.shape
  if not (max_rotate_deg or max_scale or max_translate):
    if not flip:
      return images
    do_flip = jax.random.bernoulli(jax.random.split(key, 4)[0], 0.5, (b,))
    return jnp.where(do_flip[:, None, None, None], images[:, :, ::-1], images)
  matrices = random_affine_matrices(key, b, h, w, flip=flip, max_rotate_deg=max_rotate_deg,
                                    max_scale=max_scale, max_translate=max_translate)
  return affine_warp(images, matrices, fill=fill)
