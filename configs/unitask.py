"""Uni-task versus multi-task study (2024 report, ResNet18): one model per task, and a naive
multi-task model with three heads.

  --config=configs/unitask.py:va     VA alone: MSE, Adam
  --config=configs/unitask.py:expr   EXPR alone: 8 classes (with Other), class-weighted CE, SGD
  --config=configs/unitask.py:au     AU alone: 12 AUs, class-weighted BCE (pos_weight), Adam
  --config=configs/unitask.py:mtl    the naive multi-task ResNet18: three heads, plain CE for
                                     EXPR and MSE for AU and VA, summed (the default)
Append `,demo` or `,test` for the small variants (`configs/unitask.py:va,demo`).

ResNet18 (ImageNet weights with --config.init_from=<converted torchvision resnet18>) whose fc is
replaced by the task layers (no hidden layer), per-task Aff-Wild2 sets with 8 EXPR classes,
ABAW3+ metrics; flip and rotation augmentation (on the device); ReduceLROnPlateau on the
validation score for every model. Class weights come from the training labels: EXPR
n / (C * n_c) ('balanced'), AU negatives / positives ('neg_pos_ratio'). The AU MSE is of the AU
probability against the 0/1 label. The report gives neither learning rates, epochs nor the
plateau settings; the values below are ours: 20 epochs, Adam 1e-3, SGD 1e-2 with momentum 0.9,
plateau factor 0.1 after 3 evaluations (one per epoch) without a better validation score.
"""
from affectjax import config as config_lib

TASKS = {'va': 'va', 'expr': 'expr', 'au': 'au', 'mtl': 'expr,au,va'}


def get_config(arg=None):
  task, variant = config_lib.parse_variant(arg, tuple(TASKS), 'mtl', 'configs/unitask.py')
  c = config_lib.base_config()
  c.tasks = TASKS[task]
  c.num_expr_classes = 8
  c.edition = 'abaw3'
  c.data.layout = 'per_task'
  c.data.sampling = 'joint'
  c.model.arch = 'resnet18'
  c.paper_init = 'ImageNet'  # the paper's initialisation (a run without init_from warns)
  c.num_epochs = 20.0
  c.device_augment.flip = True
  c.device_augment.rotate_deg = 10.0
  c.loss.expr = 'ce'
  c.loss.expr_class_weights = 'balanced'
  c.loss.au_pos_weight = 'neg_pos_ratio'
  c.loss.va = 'mse'
  c.optim.schedule = 'constant'
  c.optim.optimizer = 'adam'
  c.optim.learning_rate = 1e-3
  if task == 'expr':
    c.optim.optimizer = 'sgd'
    c.optim.learning_rate = 1e-2
    c.optim.momentum = 0.9
  c.optim.plateau.enabled = True
  c.optim.plateau.monitor = 'val_score'
  c.optim.plateau.patience = 3
  if task == 'mtl':  # the naive multi-task model: the plain losses, summed
    c.loss.au = 'mse'
  if task in ('va', 'expr', 'mtl'):  # the untrained tasks' weights are never resolved
    c.loss.au_pos_weight = None
  if task in ('va', 'au', 'mtl'):
    c.loss.expr_class_weights = None
  c = config_lib.apply_variant(c, variant)
  c.model.head_hidden = 0  # the fc replaced by the task layers
  if variant:
    c.optim.plateau.patience = 1
    # The synthetic per-task sets are ABAW2-style (7 classes); its s-Aff-Wild2 file has Other.
    c.data.layout = 'mtl'
  return c
