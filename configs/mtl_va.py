"""EXPR + VA as in the multi-task temporal statistical model (ABAW 2020), per-frame part.

Loss 1.0 CE(EXPR) + 0.4 (1 - CCC arousal) + 0.4 (1 - CCC valence) + 0.2 MSE of the VA 5-vector
(arousal, valence, their mean, each one's difference from the mean); Adam, lr 1e-4 (constant);
class-balanced sampling. As in the paper, only ResNet50's last stage and the heads train
(`model.trainable='layer4'`; the earlier stages keep their weights and BatchNorm statistics), so
the run starts from pretrained weights (`init_from`). The `demo` and `test` variants start from
random weights, so they train every stage (with the base config's cosine schedule).
Usage: --config=configs/mtl_va.py[:demo|:test].
"""
from affectjax import config as config_lib


def get_config(arg=None):
  c = config_lib.base_config()
  c.tasks = 'expr,va'
  c.num_expr_classes = 7
  c.edition = 'abaw2'
  c.data.layout = 'per_task'
  c.data.sampling = 'balanced'
  c.model.arch = 'resnet50'
  # The paper's initialisation (a run without init_from warns).
  c.paper_init = 'VGGFace2, fine-tuned on AffectNet and RAF-DB'
  c.model.va5 = True
  # The paper: "all weights frozen except the last stage and the classifier"; lr 1e-4, no
  # schedule named.
  c.model.trainable = 'layer4'
  c.optim.schedule = 'constant'
  # The paper's online augmentation, its kind unstated: flips and small rotations here.
  c.device_augment.flip = True
  c.device_augment.rotate_deg = 10.0
  config_lib.temporal_statistical_loss(c)
  c = config_lib.apply_variant(c, arg)
  if arg:  # from random weights: nothing pretrained to keep frozen
    c.model.trainable = 'all'
    c.optim.schedule = 'cosine'
    c.optim.learning_rate = 1e-3
  return c
