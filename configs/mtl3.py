"""All three tasks on s-Aff-Wild2 (ABAW3/4 MTL layout), scored with ABAW3+ metrics.

EXPR (8 classes with Other) + 12 AUs + valence/arousal, every frame trained on whatever labels it
has (joint sampling, masked losses): CE for EXPR, BCE for AUs, 1 - CCC for valence and arousal.
Validation score: P = mean CCC + EXPR macro F1 + AU mean F1. Usage: --config=configs/mtl3.py[:demo|:test].
"""
from affectjax import config as config_lib


def get_config(arg=None):
  c = config_lib.base_config()
  c.tasks = 'expr,au,va'
  c.num_expr_classes = 8
  c.edition = 'abaw3'
  c.data.layout = 'mtl'
  c.data.sampling = 'joint'
  c.model.arch = 'resnet50'
  c.loss.expr = 'ce'
  c.loss.va = 'ccc'
  c.loss.weights.expr = 1.0
  c.loss.weights.au = 1.0
  c.loss.weights.va = 1.0
  c.optim.optimizer = 'adam'
  c.optim.learning_rate = 1e-3
  c.global_batch_size = 256
  c.num_epochs = 10.0
  return config_lib.apply_variant(c, arg)
