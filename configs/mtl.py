"""Incomplete labels, modified multi-task learning (ABAW2 2021): EXPR (7) + AU (12).

ResNet50 (VGGFace2 weights if given via --config.init_from), 112x112, batch 256, Adam with cosine
annealing from 1e-3 for 10 epochs, focal loss (gamma 2) for EXPR + BCE per AU with equal
weights, the alternating scheme (EXPR-only, AU-only, then both-labelled frames each epoch;
the absent task's head frozen). Usage: --config=configs/mtl.py[:demo|:test].
"""
from affectjax import config as config_lib


def get_config(arg=None):
  c = config_lib.base_config()
  c.tasks = 'expr,au'
  c.num_expr_classes = 7
  c.edition = 'abaw2'
  c.data.layout = 'per_task'
  c.data.sampling = 'alternating'
  c.model.arch = 'resnet50'
  c.paper_init = 'VGGFace2'  # the paper's initialisation (a run without init_from warns)
  c.model.head_hidden = 512
  c.loss.expr = 'focal'
  c.loss.focal_gamma = 2.0
  c.loss.weights.expr = 1.0
  c.loss.weights.au = 1.0
  c.optim.optimizer = 'adam'
  c.optim.learning_rate = 1e-3
  c.optim.schedule = 'cosine'
  c.global_batch_size = 256
  c.num_epochs = 10.0
  return config_lib.apply_variant(c, arg)
