"""AffectModel: ResNet backbone + multi-task heads, built from an ml_collections config."""
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from affectjax import labels
from affectjax.models import heads
from affectjax.models import resnet

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


class AffectModel(nn.Module):
  """images [B,H,W,3] float (normalised) -> dict of outputs (see heads.MultiTaskHead).

  Parameters live under 'backbone' and 'head' ('head/hidden', 'head/expr', 'head/au',
  'head/va', 'head/va5'), so one task's head can be masked by path.
  """
  backbone: nn.Module
  tasks: Sequence[str] = labels.TASKS
  num_expr_classes: int = 7
  hidden: int = 512
  dropout: float = 0.0
  va5: bool = False

  def setup(self):
    self.head = heads.MultiTaskHead(tasks=tuple(self.tasks),
                                    num_expr_classes=self.num_expr_classes,
                                    hidden=self.hidden, dropout=self.dropout, va5=self.va5)

  def __call__(self, images, train: bool = False):
    return self.head(self.backbone(images, train=train), train=train)


def default_model_config() -> ml_collections.ConfigDict:
  """Model config with defaults: ResNet50 v1.5 at width 64, float32, PyTorch BatchNorm."""
  config = ml_collections.ConfigDict()
  config.arch = 'resnet50'        # resnet18 | resnet34 | resnet50 | resnet101 | resnet152
  config.width = 64               # base filters; tests use 8
  config.stride_on = '3x3'        # '3x3' (v1.5, torchvision) | '1x1' (v1, VGGFace2 Caffe port)
  config.stem_pool = 'torch'      # 'torch' (pad 1) | 'ceil' (VGGFace2: ceil mode, no padding)
  config.dtype = 'float32'        # compute dtype: 'float32' | 'bfloat16'; params stay float32
  config.bn_axis_name = ml_collections.config_dict.placeholder(str)  # 'data' for sync BN
  config.bn_momentum = 0.9        # flax convention: 0.9 == torch momentum 0.1
  config.bn_epsilon = 1e-5
  config.zero_init_last_bn = False
  # BatchNorm's and the stem max-pool's training gradients written out (models/layers.py: the
  # same values, fewer bytes moved on a GPU); False: JAX derives them.
  config.hand_grads = True
  # With hand_grads: each ReLU's mask kept in bits rather than bytes (8% fewer bytes moved on a
  # GPU, more host launches: off until a GPU run measures it; BUILD.md).
  config.mask_bits = False
  # Convolution kernels kept 'OHWI' (cuDNN's order: no copies in the GPU update) or 'HWIO'
  # (flax's). Either reads checkpoints and weights of the other (resnet.relayout).
  config.kernel_layout = 'OHWI'
  # The first part that trains (resnet.PARTS, 'all' or 'head'): the parts before it are frozen
  # (BatchNorm statistics fixed, no gradient, no update), as method 2 trains only layer4 + heads.
  config.trainable = 'all'
  config.head_hidden = 512        # 0: task layers directly on the pooled features
  config.dropout = 0.0
  config.va5 = False              # extra 5-vector VA head (temporal-statistical paper)
  return config


def arch_depth(arch: str) -> int:
  """'resnet50' -> 50."""
  depth = arch.lower().removeprefix('resnet')
  if not depth.isdigit() or int(depth) not in resnet.STAGE_SIZES:
    raise ValueError(f'unknown arch {arch!r}; expected resnet18/34/50/101/152')
  return int(depth)


def create_backbone(model_config) -> resnet.ResNet:
  """The ResNet backbone described by a model config (see default_model_config)."""
  if model_config.dtype not in DTYPES:
    raise ValueError(f'dtype must be one of {sorted(DTYPES)}, got {model_config.dtype!r}')
  return resnet.resnet(arch_depth(model_config.arch), width=model_config.width,
                       stride_on=model_config.stride_on, stem_pool=model_config.stem_pool,
                       dtype=DTYPES[model_config.dtype],
                       bn_axis_name=model_config.bn_axis_name,
                       bn_momentum=model_config.bn_momentum,
                       bn_epsilon=model_config.bn_epsilon,
                       zero_init_last_bn=model_config.get('zero_init_last_bn', False),
                       hand_grads=model_config.get('hand_grads', True),
                       mask_bits=model_config.get('mask_bits', False),
                       kernel_layout=model_config.get('kernel_layout', 'OHWI'),
                       frozen_parts=resnet.frozen_parts(model_config.get('trainable', 'all')))


def create_model(model_config, tasks: Sequence[str] = labels.TASKS,
                 num_expr_classes: int = 7) -> AffectModel:
  """AffectModel for the given tasks from a model config (see default_model_config)."""
  return AffectModel(backbone=create_backbone(model_config), tasks=tuple(tasks),
                     num_expr_classes=num_expr_classes, hidden=model_config.head_hidden,
                     dropout=model_config.dropout, va5=model_config.va5)
