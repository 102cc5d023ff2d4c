"""Single-task VA baseline: ResNet with a (valence, arousal) tanh head, 1 - CCC loss, Adam.

The uni-task study trained VA with MSE: --config.loss.va=mse. Usage: --config=configs/va.py[:demo|:test].
"""
from affectjax import config as config_lib


def get_config(arg=None):
  c = config_lib.base_config()
  c.tasks = 'va'
  c.edition = 'abaw3'
  c.data.layout = 'per_task'
  c.data.sampling = 'joint'
  c.model.arch = 'resnet50'
  c.loss.va = 'ccc'
  return config_lib.apply_variant(c, arg)
