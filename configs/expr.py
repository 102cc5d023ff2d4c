"""Single-task EXPR baseline: ResNet with one 7-class head, focal loss (gamma 2), Adam + cosine.

Set --config.loss.expr=ce and --config.num_expr_classes=8 for the uni-task study's 8-class
setting (there with class-weighted CE: --config.loss.expr_class_weights=...).
Usage: --config=configs/expr.py[:demo|:test].
"""
from affectjax import config as config_lib


def get_config(arg=None):
  c = config_lib.base_config()
  c.tasks = 'expr'
  c.num_expr_classes = 7
  c.edition = 'abaw2'
  c.data.layout = 'per_task'
  c.data.sampling = 'joint'
  c.model.arch = 'resnet50'
  c.loss.expr = 'focal'
  c.loss.focal_gamma = 2.0
  return config_lib.apply_variant(c, arg)
