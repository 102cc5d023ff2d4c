"""Single-task AU baseline: ResNet with one 12-way sigmoid head, BCE per AU, Adam + cosine.

Usage: --config=configs/au.py[:demo|:test]; --config.loss.au_pos_weight=... for class-weighted BCE.
"""
from affectjax import config as config_lib


def get_config(arg=None):
  c = config_lib.base_config()
  c.tasks = 'au'
  c.edition = 'abaw2'
  c.data.layout = 'per_task'
  c.data.sampling = 'joint'
  c.model.arch = 'resnet50'
  return config_lib.apply_variant(c, arg)
