"""One ResNet (v1 and v1.5, basic and bottleneck blocks) whose layout matches torchvision's.

Submodule names follow torchvision's parameter names (`conv1`, `bn1`, `layer2_0/conv1`,
`layer2_0/downsample_conv`, ...) so converted PyTorch weights map by renaming alone, and
padding is explicit so converted weights reproduce PyTorch outputs exactly.

In inference (and in a frozen part) each BatchNorm is folded into the convolution before it
(`ConvNorm`): the same variables, one convolution with a bias per layer, which XLA fuses with
the residual add and the ReLU (on a GPU one cuDNN call) instead of a convolution and a
normalisation pass.

Convolution kernels are kept output channel first (`kernel_layout='OHWI'`, flax's nn.Conv
keeps HWIO): cuDNN takes NHWC convolutions' kernels, and returns their gradients, in that
order, so the Adam update writes each kernel and its moments in place. In HWIO, XLA copies the
three back every step (282 MB for ResNet50 at 112 px, `docs/benchmarks.md`). Trees of either
layout are told apart by their stem kernel (`kernel_layout_of`) and converted where they are
read (`relayout`): converted weights, runs and checkpoints from before, or flax HWIO trees.
"""
import dataclasses
import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from affectjax.models import layers

ModuleDef = Any

# torchvision's init (kaiming normal, fan_out, relu gain), for training from scratch.
CONV_INIT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
STRIDE_ON = ('3x3', '1x1')
# The axes of an HWIO kernel in the order each layout keeps them.
KERNEL_LAYOUTS = {'OHWI': (3, 0, 1, 2), 'HWIO': (0, 1, 2, 3)}
STEM_POOL = ('torch', 'ceil')


def conv_padding(kernel: int) -> tuple:
  """PyTorch's symmetric padding for an odd kernel: ((k//2, k//2), (k//2, k//2))."""
  return ((kernel // 2, kernel // 2),) * 2


def max_pool_3x3_s2(x: jax.Array, mode: str, hand_grads: bool = True) -> jax.Array:
  """Stem max-pool 3x3 stride 2 on NHWC (`layers.max_pool_3x3_s2`).

  mode 'torch': padding 1 (torchvision), output floor((H-1)/2)+1.
  mode 'ceil': no padding, ceil mode (the Caffe VGGFace2 port), output ceil((H-3)/2)+1; the
  windows that run past the bottom/right edge see only real pixels (padding is -inf).
  """
  if mode == 'torch':
    return layers.max_pool_3x3_s2(x, ((1, 1), (1, 1)), hand_grads)
  if mode == 'ceil':
    pads = []
    for size in x.shape[1:3]:
      out = -(-(size - 3) // 2) + 1
      pads.append((0, (out - 1) * 2 + 3 - size))
    return layers.max_pool_3x3_s2(x, tuple(pads), hand_grads)
  raise ValueError(f'stem_pool must be one of {STEM_POOL}, got {mode!r}')


def check_kernel_layout(layout: str) -> str:
  if layout not in KERNEL_LAYOUTS:
    raise ValueError(f'kernel_layout must be one of {", ".join(KERNEL_LAYOUTS)}, got {layout!r}')
  return layout


def _axes(source: str, target: str) -> tuple:
  """The transpose taking a kernel in `source` layout to `target`."""
  to_hwio = [KERNEL_LAYOUTS[source].index(a) for a in range(4)]
  return tuple(to_hwio[a] for a in KERNEL_LAYOUTS[target])


def from_hwio(kernel, layout: str):
  """An HWIO kernel (an array or a jax.ShapeDtypeStruct) in `layout`."""
  return _transpose(kernel, _axes('HWIO', layout))


def _transpose(leaf, axes: tuple):
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(tuple(leaf.shape[a] for a in axes), leaf.dtype,
                                sharding=leaf.sharding)
  return leaf.transpose(axes)


def _is_kernel(path, leaf) -> bool:
  return (len(getattr(leaf, 'shape', ())) == 4 and bool(path)
          and getattr(path[-1], 'key', None) == 'kernel')


def kernel_layout_of(tree) -> Optional[str]:
  """The layout of a tree's convolution kernels ('OHWI' or 'HWIO'), read from the ResNet stem's
  kernel (7x7 over 3 channels: (7, 7, 3, W) in HWIO, (W, 7, 7, 3) in OHWI; never both); None
  for a tree without one. `tree`: params, a train state, optimiser moments, or their shapes."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if _is_kernel(path, leaf):
      shape = tuple(leaf.shape)
      if shape[:3] == (7, 7, 3):
        return 'HWIO'
      if shape[1:] == (7, 7, 3):
        return 'OHWI'
  return None


def relayout(tree, layout: Optional[str], source: Optional[str] = None):
  """`tree` with its 4-D convolution kernels (leaves named 'kernel') in `layout`; `source`:
  the layout they are in (default: `kernel_layout_of(tree)`). A tree already in `layout`, or
  without kernels, and any tree when `layout` is None, are returned as they are."""
  if layout is None:
    return tree
  source = source or kernel_layout_of(tree)
  if source is None or check_kernel_layout(layout) == source:
    return tree
  axes = _axes(source, layout)
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: _transpose(leaf, axes) if _is_kernel(path, leaf) else leaf, tree)


def _conv(x, kernel, strides, padding, layout: str, dtype):
  return jax.lax.conv_general_dilated(jnp.asarray(x, dtype), kernel.astype(dtype), strides,
                                      padding, dimension_numbers=('NHWC', layout, 'NHWC'))


class Conv(nn.Module):
  """A convolution without bias on NHWC, its kernel kept in `layout`. The kernel is drawn as
  flax's nn.Conv draws it (CONV_INIT on HWIO, the same key), then transposed: both layouts
  start from the same values."""
  features: int
  kernel_size: Sequence[int]
  strides: Sequence[int]
  padding: Any
  layout: str = 'OHWI'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    shape = (*self.kernel_size, x.shape[-1], self.features)
    kernel = self.param('kernel', lambda key: from_hwio(CONV_INIT(key, shape, jnp.float32),
                                                        self.layout))
    return _conv(x, kernel, self.strides, self.padding, self.layout, self.dtype)


@dataclasses.dataclass(frozen=True)
class ConvNorm:
  """A convolution and the BatchNorm after it: two submodules of the calling module, under
  their own (torchvision) names.

  With `fold` (the BatchNorm normalising with the running statistics of existing variables:
  inference, or a frozen part) the normalisation is folded into the convolution, from the
  same variables: the kernel scaled per output channel by scale / sqrt(var + epsilon), and a
  bias of bias - mean * that. Exact in float32 up to rounding; in bf16 the folded kernel is
  rounded once instead of the convolution's output.
  """
  conv: ModuleDef  # Conv (a partial giving its layout and dtype)
  norm: ModuleDef  # layers.BatchNorm (a partial giving its epsilon)
  fold: bool = False

  def __call__(self, module: nn.Module, x, features: int, kernel_size, strides, padding,
               conv_name: str, norm_name: str, residual=None, relu: bool = False,
               **norm_kwargs):
    """The normalised convolution of `x`, plus `residual` (None: nothing), through a ReLU
    with `relu`."""
    if not self.fold:
      y = self.conv(features, kernel_size, strides, padding=padding, name=conv_name)(x)
      return self.norm(name=norm_name, **norm_kwargs)(y, residual, relu)
    dtype, layout = self.conv.keywords['dtype'], self.conv.keywords['layout']
    params = module.variables['params']
    kernel, bn = params[conv_name]['kernel'], params[norm_name]
    expected = from_hwio(jax.ShapeDtypeStruct((*kernel_size, x.shape[-1], features),
                                              jnp.float32), layout).shape
    if kernel.shape != expected:  # as Conv's parameter would check
      raise ValueError(f'{module.path}/{conv_name}: kernel {kernel.shape}, expected {expected}')
    stats = module.variables['batch_stats'][norm_name]
    scale = bn['scale'] * jax.lax.rsqrt(stats['var'] + self.norm.keywords['epsilon'])
    per_output = scale.reshape([-1 if a == 3 else 1 for a in KERNEL_LAYOUTS[layout]])
    y = _conv(x, kernel * per_output, strides, padding, layout, dtype)
    return layers.add_relu(y + (bn['bias'] - stats['mean'] * scale).astype(dtype), residual,
                           relu)


class _Block(nn.Module):
  """Fields and the projection shortcut of both blocks."""
  filters: int
  layer: ConvNorm
  strides: int = 1
  stride_on: str = '3x3'
  zero_init_last_bn: bool = False

  def _last_init(self):
    return nn.initializers.zeros if self.zero_init_last_bn else nn.initializers.ones

  def _shortcut(self, x):
    """`x`, or its projection where the block changes the shape."""
    if self.strides == 1 and x.shape[-1] == self.filters * self.expansion:
      return x
    return self.layer(self, x, self.filters * self.expansion, (1, 1),
                      (self.strides, self.strides), 'VALID', 'downsample_conv', 'downsample_bn')


class BasicBlock(_Block):
  """Two 3x3 convolutions (ResNet18/34); the stride sits on the first (stride_on is moot)."""
  expansion = 1

  @nn.compact
  def __call__(self, x):
    s = (self.strides, self.strides)
    y = self.layer(self, x, self.filters, (3, 3), s, conv_padding(3), 'conv1', 'bn1', relu=True)
    return self.layer(self, y, self.filters, (3, 3), (1, 1), conv_padding(3), 'conv2', 'bn2',
                      residual=self._shortcut(x), relu=True, scale_init=self._last_init())


class BottleneckBlock(_Block):
  """1x1 -> 3x3 -> 1x1 (x4 filters); stride on the 3x3 (v1.5) or on the first 1x1 (v1)."""
  expansion = 4

  @nn.compact
  def __call__(self, x):
    if self.stride_on not in STRIDE_ON:
      raise ValueError(f'stride_on must be one of {STRIDE_ON}, got {self.stride_on!r}')
    s = (self.strides, self.strides)
    s1, s3 = ((1, 1), s) if self.stride_on == '3x3' else (s, (1, 1))
    y = self.layer(self, x, self.filters, (1, 1), s1, 'VALID', 'conv1', 'bn1', relu=True)
    y = self.layer(self, y, self.filters, (3, 3), s3, conv_padding(3), 'conv2', 'bn2',
                   relu=True)
    return self.layer(self, y, self.filters * 4, (1, 1), (1, 1), 'VALID', 'conv3', 'bn3',
                      residual=self._shortcut(x), relu=True, scale_init=self._last_init())


class ResNet(nn.Module):
  """ResNet backbone: NHWC float images -> globally average-pooled features float32 [B, C].

  C = 8 * width * block_cls.expansion (2048 for ResNet50, 512 for ResNet18 at width 64).
  bn_momentum is in flax terms (0.9 == torch momentum 0.1); bn_axis_name synchronises batch
  statistics across that named axis (under shard_map) in training mode. fold_bn: a BatchNorm
  using its running statistics (inference; a frozen part in training) is folded into its
  convolution (`ConvNorm`). hand_grads: the training gradients of BatchNorm (with the residual
  add and ReLU after it) and of the stem max-pool are written out (`layers`: the same values,
  fewer bytes moved on a GPU); False: JAX derives them. mask_bits: those BatchNorms keep their
  ReLU's mask in bits (default: a byte an element). kernel_layout: 'OHWI' (the update writes
  the kernels in place on a GPU) or 'HWIO' (flax's), see the module's docstring.
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
  frozen_parts: int = 0
  fold_bn: bool = True
  hand_grads: bool = True
  mask_bits: bool = False
  kernel_layout: str = 'OHWI'

  @nn.compact
  def __call__(self, x, train: bool = False):
    if not 0 <= self.frozen_parts <= len(self.stage_sizes) + 1:
      raise ValueError(f'frozen_parts must be in [0, {len(self.stage_sizes) + 1}], got '
                       f'{self.frozen_parts}')
    conv = functools.partial(Conv, layout=check_kernel_layout(self.kernel_layout),
                             dtype=self.dtype)

    def layer(part: int) -> ConvNorm:  # a frozen part's BatchNorm keeps its running statistics
      running = not train or part < self.frozen_parts
      norm = functools.partial(layers.BatchNorm, hand_grads=self.hand_grads,
                               mask_bits=self.mask_bits,
                               use_running_average=running,
                               momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                               dtype=self.dtype, param_dtype=jnp.float32,
                               axis_name=self.bn_axis_name)
      return ConvNorm(conv, norm, self.fold_bn and running and not self.is_initializing())

    def end_of_part(x, part: int):  # no gradient into the frozen parts
      return jax.lax.stop_gradient(x) if part + 1 == self.frozen_parts else x

    x = jnp.asarray(x, self.dtype)
    x = layer(0)(self, x, self.width, (7, 7), (2, 2), conv_padding(7), 'conv1', 'bn1',
                 relu=True)
    x = end_of_part(max_pool_3x3_s2(x, self.stem_pool, self.hand_grads), 0)
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        x = self.block_cls(self.width * 2**i, layer=layer(i + 1),
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
