"""BatchNorm (with the residual add and ReLU after it) and the stem's max-pool, with their
training gradients written out, for the training step's memory traffic.

They compute what `flax.linen.BatchNorm` (then `x + residual`, then `nn.relu`) and
`flax.linen.max_pool` compute: the same variables, the same forward values, the same
gradients up to rounding. Their backward passes are written out rather than derived by JAX,
because the derived ones move more bytes than they need on a GPU (`benchmarks/deviceless.py`
reads the compiled programs; ResNet50's train step at batch 256 moves about 8% fewer bytes):

- BatchNorm in training: JAX differentiates the mean and the variance separately, and XLA's
  fusion of that derivative writes float32 copies of whole activations where the reductions
  are small (ResNet50's layer4). The written-out backward is the textbook one: the two
  reductions of the incoming gradient (its sum, and its sum against the centred input) in
  one pass, then one elementwise pass, reading the activations in their compute dtype. The
  ReLU's mask is kept from the forward pass, one byte an element: XLA keeps it anyway when
  it can share the forward's computation, and recomputing it behind a barrier made XLA write
  it out in the backward pass instead (more bytes in all). With `mask_bits` it is packed eight
  channels to a byte (`pack_bits`; where the channels are a multiple of 8): ResNet50's train
  step then moves another 8% fewer bytes, but XLA groups its kernels into fewer CUDA graphs
  at its default settings, and the host launches more of them one by one (BUILD.md).
- The max-pool: JAX differentiates `reduce_window` into a select-and-scatter, which XLA turns
  into a scatter over four int32 index arrays. Here the forward keeps, for each output, which
  of its nine window positions held the maximum (int8), and the backward places each gradient
  back with nine strided pads that XLA fuses into one elementwise pass. Ties go to the first
  maximum in row-major window order, as in select-and-scatter and PyTorch; a window holding
  a NaN gives its gradient to its first NaN, as PyTorch does (JAX's derived gradient spreads
  it differently).
"""
import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


def batch_statistics(x: jax.Array, axis_name: Optional[str] = None) -> tuple:
  """Per-channel (mean, variance) of `x` over all but its last axis, in float32, averaged
  across `axis_name` when given: E[x^2] - E[x]^2 clipped at zero, as flax computes them."""
  xf = x.astype(jnp.float32)
  axes = tuple(range(x.ndim - 1))
  moments = jnp.stack([jnp.mean(xf, axes), jnp.mean(jnp.square(xf), axes)])
  if axis_name is not None:
    moments = lax.pmean(moments, axis_name)
  mean, mean_sq = moments[0], moments[1]
  return mean, jnp.maximum(0.0, mean_sq - jnp.square(mean))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def batch_norm(x, scale, bias, residual, epsilon: float, axis_name: Optional[str], dtype,
               relu: bool, mask_bits: bool = False) -> jax.Array:
  """Normalises `x` with its own batch statistics (see `batch_statistics`), scales and shifts
  it per channel, casts it to `dtype`, adds `residual` (None: nothing) and, with `relu`,
  applies a ReLU. Differentiable in x, scale, bias and residual. The ReLU's mask is kept for
  the backward pass one byte an element, or with `mask_bits` in bits (`pack_bits`)."""
  return _batch_norm_fwd(x, scale, bias, residual, epsilon, axis_name, dtype, relu,
                         mask_bits)[0]


def add_relu(y, residual=None, relu: bool = False):
  """`y` plus `residual` (None: nothing), through a ReLU with `relu`."""
  y = y if residual is None else y + residual
  return nn.relu(y) if relu else y


def _pre_activation(x, mean, inv, scale, bias, residual, dtype):
  """The normalised x in `dtype`, plus `residual`: what `batch_norm`'s ReLU sees."""
  return add_relu(((x.astype(jnp.float32) - mean) * (scale * inv) + bias).astype(dtype),
                  residual)


def _batch_norm_fwd(x, scale, bias, residual, epsilon, axis_name, dtype, relu, mask_bits=False):
  mean, var = batch_statistics(x, axis_name)
  inv = lax.rsqrt(var + epsilon)
  pre = _pre_activation(x, mean, inv, scale, bias, residual, dtype)
  mask = None
  if relu:  # kept: a byte or a bit an element (the module's docstring)
    mask = pack_bits(pre > 0) if mask_bits else pre > 0
  # (residual only for its type: jit drops what the backward pass does not read)
  return add_relu(pre, relu=relu), (x, mean, inv, scale, bias, residual, mask)


def _batch_norm_bwd(epsilon, axis_name, dtype, relu, mask_bits, residuals, dy):
  del epsilon, dtype, relu, mask_bits
  x, mean, inv, scale, bias, residual, mask = residuals
  g = dy.astype(jnp.float32)
  if mask is not None:
    g = jnp.where(unpack_bits(mask, x.shape[-1]), g, 0.0)
  axes = tuple(range(x.ndim - 1))
  centred = x.astype(jnp.float32) - mean
  sums = jnp.stack([jnp.sum(g, axes), jnp.sum(g * centred, axes)])  # this device's
  count = x.size // x.shape[-1]
  # What reaches x through the statistics: from every device's loss when they were averaged
  # across `axis_name` (each device's own scale: a parameter may differ between devices).
  total = scale * sums
  if axis_name is not None:
    total, count = lax.psum(total, axis_name), count * lax.psum(1, axis_name)
  dx = inv * (scale * g - total[0] / count - centred * (inv * inv) * (total[1] / count))
  return (_sum_to(dx, x), _sum_to(sums[1] * inv, scale), _sum_to(sums[0], bias),
          None if residual is None else _sum_to(g, residual))


def pack_bits(mask: jax.Array) -> jax.Array:
  """A boolean [..., C] array as uint8 [..., C / 8], channel 8j + k in bit k of byte j (as
  it is when C is not a multiple of 8)."""
  return mask if mask.shape[-1] % 8 else jnp.packbits(mask, axis=-1, bitorder='little')


def unpack_bits(packed: jax.Array, channels: int) -> jax.Array:
  """`pack_bits`' boolean [..., channels] array back: `jnp.unpackbits(packed, -1, channels,
  bitorder='little')`, written as one shift and mask of each byte, which XLA fuses into the
  backward passes in fewer bytes (ResNet50's train step: 84 MB less than `jnp.unpackbits`)."""
  if packed.dtype == jnp.bool_:
    return packed
  bits = (packed[..., None] >> jnp.arange(8, dtype=jnp.uint8)) & jnp.uint8(1)
  return bits.reshape(*packed.shape[:-1], channels).astype(jnp.bool_)


def _sum_to(cotangent, primal):
  """`cotangent` in `primal`'s dtype, summed over the manual axes along which it varies and
  `primal` does not (under `shard_map`: the transpose of JAX's implicit replicated-to-varying
  cast, which a derived gradient would contain; e.g. a replicated parameter's)."""
  axes = tuple(sorted(_varying(cotangent) - _varying(primal)))
  return (lax.psum(cotangent, axes) if axes else cotangent).astype(primal.dtype)


def _varying(x) -> frozenset:
  """The manual (`shard_map`) axes along which `x` varies: `manual_axis_type.varying` of its
  type (`vma` in older jax)."""
  aval = jax.typeof(x)
  axis_type = getattr(aval, 'manual_axis_type', None)
  return frozenset(axis_type.varying if axis_type is not None else getattr(aval, 'vma', ()))


batch_norm.defvjp(_batch_norm_fwd, _batch_norm_bwd)


class BatchNorm(nn.Module):
  """`flax.linen.BatchNorm` over the last axis (the same variables: params 'scale' and 'bias',
  batch_stats 'mean' and 'var'; the same values and running averages), optionally followed by
  a residual add and a ReLU, with `batch_norm`'s gradient in training (`hand_grads=False`:
  the same computation differentiated by JAX, as flax's BatchNorm would be; `mask_bits`: see
  `batch_norm`)."""
  use_running_average: bool = False
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32
  axis_name: Optional[str] = None
  scale_init: Callable = nn.initializers.ones
  bias_init: Callable = nn.initializers.zeros
  hand_grads: bool = True
  mask_bits: bool = False

  @nn.compact
  def __call__(self, x, residual=None, relu: bool = False):
    """The normalised `x`, plus `residual` when given, through a ReLU with `relu`."""
    features = (x.shape[-1],)
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, features, jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, features, jnp.float32)
    scale = self.param('scale', self.scale_init, features, self.param_dtype)
    bias = self.param('bias', self.bias_init, features, self.param_dtype)
    dtype = self.dtype or jnp.result_type(x, scale, bias)
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      initializing = self.is_initializing()  # (no axis to average across yet)
      axis_name = None if initializing else self.axis_name
      mean, var = batch_statistics(x, axis_name)
      if not initializing:
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
      if self.hand_grads:  # (its forward computes the same statistics: XLA merges the two)
        return batch_norm(x, scale, bias, residual, self.epsilon, axis_name, dtype, relu,
                          self.mask_bits)
    inv = lax.rsqrt(var + self.epsilon)
    return add_relu(_pre_activation(x, mean, inv, scale, bias, residual, dtype), relu=relu)


def max_pool_3x3_s2(x: jax.Array, padding: tuple, hand_grads: bool = True) -> jax.Array:
  """Max-pool of NHWC `x` over 3x3 windows at stride 2; `padding` ((top, bottom), (left,
  right)) with -inf. The same values and (but for windows holding a NaN) the same gradient as
  `nn.max_pool(x, (3, 3), (2, 2), padding)`, which hand_grads=False returns."""
  if not hand_grads:
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=padding)
  (top, _), (left, _) = padding
  low = jnp.array(-jnp.inf, x.dtype)
  out_h, out_w = ((size + sum(pads) - 3) // 2 + 1 for size, pads in zip(x.shape[1:3], padding))

  def windows(x):  # the nine [B, Ho, Wo, C] strided views, in row-major window order
    xp = lax.pad(x, low, ((0, 0, 0), (*padding[0], 0), (*padding[1], 0), (0, 0, 0)))
    return [xp[:, i:i + 2 * out_h - 1:2, j:j + 2 * out_w - 1:2, :]
            for i in range(3) for j in range(3)]

  @jax.custom_vjp
  def pool(x):
    return fwd(x)[0]  # (without the gradient, XLA drops the positions)

  def fwd(x):
    views = windows(x)
    y = functools.reduce(jnp.maximum, views)
    # The first position holding the maximum (or a NaN, which the maximum then is).
    where = jnp.full(y.shape, len(views) - 1, jnp.int8)
    for k in reversed(range(len(views) - 1)):
      where = jnp.where((views[k] == y) | jnp.isnan(views[k]), jnp.int8(k), where)
    return y, where

  def bwd(where, dy):
    acc = jnp.promote_types(dy.dtype, jnp.float32)  # (up to four windows overlap)
    zero = jnp.zeros((), acc)
    dx = jnp.zeros(x.shape, acc)
    for k in range(9):  # output (r, c) of window position (i, j) is input (2r+i-top, 2c+j-left)
      i, j = divmod(k, 3)
      rows = (i - top, x.shape[1] - (i - top) - (2 * out_h - 1), 1)
      cols = (j - left, x.shape[2] - (j - left) - (2 * out_w - 1), 1)
      part = jnp.where(where == k, dy.astype(acc), zero)
      dx = dx + lax.pad(part, zero, ((0, 0, 0), rows, cols, (0, 0, 0)))
    return (dx.astype(dy.dtype),)

  pool.defvjp(fwd, bwd)
  return pool(x)
