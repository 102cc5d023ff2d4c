"""One ResNet (v1 and v1.5, basic and bottleneck blocks) whose layout matches torchvision's.

Submodule names follow torchvision's parameter names (`conv1`, `bn1`, `layer2_0/conv1`,
`layer2_0/downsample_conv`, ...) so converted PyTorch weights map by renaming alone, and
padding is explicit so converted weights reproduce PyTorch outputs exactly.
"""
import functools
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

ModuleDef = Any

# torchvision's init (kaiming normal, fan_out, relu gain), for training from scratch.
CONV_INIT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
STRIDE_ON = ('3x3', '1x1')
STEM_POOL = ('torch', 'ceil')


def conv_padding(kernel: int) -> tuple:
  """PyTorch's symmetric padding for an odd kernel: ((k//2, k//2), (k//2, k//2))."""
  return ((kernel // 2, kernel // 2),) * 2


def max_pool_3x3_s2(x: jax.Array, mode: str) -> jax.Array:
  """Stem max-pool 3x3 stride 2 on NHWC.

  mode 'torch': padding 1 (torchvision), output floor((H-1)/2)+1.
  mode 'ceil': no padding, ceil mode (the Caffe VGGFace2 port), output ceil((H-3)/2)+1; the
  windows that run past the bottom/right edge see only real pixels (padding is -inf).
  """
  if mode == 'torch':
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
  if mode == 'ceil':
    pads = []
    for size in x.shape[1:3]:
      out = -(-(size - 3) // 2) + 1
      pads.append((0, (out - 1) * 2 + 3 - size))
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=tuple(pads))
  raise ValueError(f'stem_pool must be one of {STEM_POOL}, got {mode!r}')


class _Block(nn.Module):
  """Fields and the shared tail (last BN, projection shortcut, add, ReLU) of both blocks."""
  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1
  stride_on: str = '3x3'
  zero_init_last_bn: bool = False

  def _residual_tail(self, x, y, last_bn: str, out_filters: int):
    last_init = nn.initializers.zeros if self.zero_init_last_bn else nn.initializers.ones
    y = self.norm(name=last_bn, scale_init=last_init)(y)
    if x.shape != y.shape:
      x = self.conv(out_filters, (1, 1), (self.strides, self.strides),
                    name='downsample_conv')(x)
      x = self.norm(name='downsample_bn')(x)
    return nn.relu(x + y)


class BasicBlock(_Block):
  """Two 3x3 convolutions (ResNet18/34); the stride sits on the first (stride_on is moot)."""
  expansion = 1

  @nn.compact
  def __call__(self, x):
    s = (self.strides, self.strides)
    y = self.conv(self.filters, (3, 3), s, padding=conv_padding(3), name='conv1')(x)
    y = nn.relu(self.norm(name='bn1')(y))
    y = self.conv(self.filters, (3, 3), padding=conv_padding(3), name='conv2')(y)
    return self._residual_tail(x, y, 'bn2', self.filters)


class BottleneckBlock(_Block):
  """1x1 -> 3x3 -> 1x1 (x4 filters); stride on the 3x3 (v1.5) or on the first 1x1 (v1)."""
  expansion = 4

  @nn.compact
  def __call__(self, x):
    if self.stride_on not in STRIDE_ON:
      raise ValueError(f'stride_on must be one of {STRIDE_ON}, got {self.stride_on!r}')
    s = (self.strides, self.strides)
    s1, s3 = ((1, 1), s) if self.stride_on == '3x3' else (s, (1, 1))
    y = self.conv(self.filters, (1, 1), s1, name='conv1')(x)
    y = nn.relu(self.norm(name='bn1')(y))
    y = self.conv(self.filters, (3, 3), s3, padding=conv_padding(3), name='conv2')(y)
    y = nn.relu(self.norm(name='bn2')(y))
    y = self.conv(self.filters * 4, (1, 1), name='conv3')(y)
    return self._residual_tail(x, y, 'bn3', self.filters * 4)


class ResNet(nn.Module):
  """ResNet backbone: NHWC float images -> globally average-pooled features float32 [B, C].

  C = 8 * width * block_cls.expansion (2048 for ResNet50, 512 for ResNet18 at width 64).
  bn_momentum is in flax terms (0.9 == torch momentum 0.1); bn_axis_name synchronises batch
  statistics across that named axis (under shard_map) in training mode.
  """
  stage_sizes: Sequence[int]
  block_cls: ModuleDef
  width: int = 64
  stride_on: str = '3x3'
  stem_pool: str = 'torch'
  dtype: Any = jnp.float32
  bn_axis_name: Optional[str] = None
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  zero_init_last_bn: bool = False
  act: Callable = nn.relu
  frozen_parts: int = 0

  @nn.compact
  def __call__(self, x, train: bool = False):
    if not 0 <= self.frozen_parts <= len(self.stage_sizes) + 1:
      raise ValueError(f'frozen_parts must be in [0, {len(self.stage_sizes) + 1}], got '
                       f'{self.frozen_parts}')
    conv = functools.partial(nn.Conv, use_bias=False, padding='VALID', dtype=self.dtype,
                             param_dtype=jnp.float32, kernel_init=CONV_INIT)

    def norm(part: int):  # a frozen part's BatchNorm keeps its running statistics
      return functools.partial(nn.BatchNorm,
                               use_running_average=not train or part < self.frozen_parts,
                               momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                               dtype=self.dtype, param_dtype=jnp.float32,
                               axis_name=self.bn_axis_name)

    def end_of_part(x, part: int):  # no gradient into the frozen parts
      return jax.lax.stop_gradient(x) if part + 1 == self.frozen_parts else x

    x = jnp.asarray(x, self.dtype)
    x = conv(self.width, (7, 7), (2, 2), padding=conv_padding(7), name='conv1')(x)
    x = self.act(norm(0)(name='bn1')(x))
    x = end_of_part(max_pool_3x3_s2(x, self.stem_pool), 0)
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        x = self.block_cls(self.width * 2**i, conv=conv, norm=norm(i + 1),
                           strides=2 if i > 0 and j == 0 else 1, stride_on=self.stride_on,
                           zero_init_last_bn=self.zero_init_last_bn,
                           name=f'layer{i + 1}_{j}')(x)
      x = end_of_part(x, i + 1)
    # Pool in float32: a bf16 sum over 49+ positions loses precision the heads would see.
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


# The parts of a ResNet in order, as `model.trainable` names the first one that trains ('all'
# trains every part, 'head' none: the backbone is a fixed feature extractor).
PARTS = ('stem', 'layer1', 'layer2', 'layer3', 'layer4')
TRAINABLE = ('all',) + PARTS[1:] + ('head',)


def frozen_parts(trainable: str) -> int:
  """How many leading PARTS `model.trainable` freezes: 'all' 0, 'layer4' 4 (the stem and
  layer1-3), 'head' 5 (the whole backbone)."""
  if trainable not in TRAINABLE:
    raise ValueError(f'model.trainable={trainable!r}: expected one of {", ".join(TRAINABLE)} '
                     '(the first part that trains)')
  return TRAINABLE.index(trainable)


def frozen_parameters(params, frozen: int):
  """A tree like `params` (a model's, the backbone under 'backbone'), True for the parameters
  of the first `frozen` PARTS."""
  def is_frozen(path) -> bool:
    if len(path) < 2 or path[0] != 'backbone':
      return False
    name = path[1]
    part = 0 if name in ('conv1', 'bn1') else int(name.removeprefix('layer').split('_')[0])
    return part < frozen
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({k: is_frozen(k) for k in flat})


STAGE_SIZES = {
    18: ((2, 2, 2, 2), BasicBlock),
    34: ((3, 4, 6, 3), BasicBlock),
    50: ((3, 4, 6, 3), BottleneckBlock),
    101: ((3, 4, 23, 3), BottleneckBlock),
    152: ((3, 8, 36, 3), BottleneckBlock),
}


def resnet(depth: int, **kwargs) -> ResNet:
  """ResNet of the given depth (18, 34, 50, 101, 152); kwargs go to `ResNet`."""
  if depth not in STAGE_SIZES:
    raise ValueError(f'ResNet depth must be one of {sorted(STAGE_SIZES)}, got {depth}')
  stage_sizes, block_cls = STAGE_SIZES[depth]
  return ResNet(stage_sizes=stage_sizes, block_cls=block_cls, **kwargs)


ResNet18 = functools.partial(ResNet, stage_sizes=STAGE_SIZES[18][0], block_cls=BasicBlock)
ResNet34 = functools.partial(ResNet, stage_sizes=STAGE_SIZES[34][0], block_cls=BasicBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=STAGE_SIZES[50][0], block_cls=BottleneckBlock)
ResNet101 = functools.partial(ResNet, stage_sizes=STAGE_SIZES[101][0],
                              block_cls=BottleneckBlock)
ResNet152 = functools.partial(ResNet, stage_sizes=STAGE_SIZES[152][0],
                              block_cls=BottleneckBlock)
