"""Multi-task temporal statistical model (ABAW 2020, Chonnam National University; method 2).

A frame model (configs/mtl_va.py: ResNet50, EXPR 7 + VA) gives per-frame features and EXPR
probabilities (`--config.mode=features`); this model predicts each frame from it and its
`temporal.length - 1` previous frames (s = 16; 32 with --config.temporal.length=32): STAT (mean,
max, min over the block of the probabilities and the features) and a bidirectional LSTM of 1024
units over the probabilities, fused with the current frame's features and probabilities; an EXPR
branch and VA / VA 5-vector branches of two Dense layers. Loss 1.0 CE + 0.4 (1 - CCC arousal)
+ 0.4 (1 - CCC valence) + 0.2 MSE(5-vector); Adam 1e-4; class-balanced sampling.

  python -m affectjax.main --config=configs/mtl_va.py --workdir=runs/frames --config.mode=features
  python -m affectjax.main --config=configs/temporal_stat.py:stat_lstm --workdir=runs/stat \
    --config.temporal.features_dir=runs/frames/features

Variants, the paper's ablation models by number:
  model1  image -> EXPR (the frame model alone, configs/mtl_va.py with EXPR only)
  model2  image -> EXPR + VA (configs/mtl_va.py)
  model3  image + block (STAT) -> EXPR          model4  the same -> EXPR + VA (`stat`)
  model5  block with STAT + LSTM -> EXPR        model6  the same -> EXPR + VA (`stat_lstm`, default)
With `end_to_end` (models 3-6) the block model trains on blocks of face crops together with the
frame model's last stage and classifier (`model.trainable='layer4'`; the frozen stages keep their
BatchNorm statistics), as the paper does, starting from a frame run:
  python -m affectjax.main --config=configs/temporal_stat.py:model6,end_to_end --workdir=runs/e2e \
    --config.init_from=runs/frames
Append `,demo` or `,test` for the small variants.
"""
import os

from affectjax import config as config_lib

MODELS = {'model1': ('image', 'expr'), 'model2': ('image', 'expr,va'),
          'model3': ('stat', 'expr'), 'model4': ('stat', 'expr,va'),
          'model5': ('stat_lstm', 'expr'), 'model6': ('stat_lstm', 'expr,va'),
          'stat': ('stat', 'expr,va'), 'stat_lstm': ('stat_lstm', 'expr,va')}


def _frame_config(variant: str):
  """configs/mtl_va.py with the same variant: the frame model (models 1 and 2)."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'mtl_va.py')
  return config_lib.load_config_file(f'{path}:{variant}' if variant else path)


def get_config(arg=None):
  words = [w for w in (arg or '').split(',') if w]
  end_to_end = 'end_to_end' in words
  name, variant = config_lib.parse_variant(
      ','.join(w for w in words if w != 'end_to_end'), tuple(MODELS), 'stat_lstm',
      'configs/temporal_stat.py')
  model, tasks = MODELS[name]
  if model == 'image':
    if end_to_end:
      raise config_lib.ConfigError(f'configs/temporal_stat.py:{name} is the frame model alone: '
                                   'end_to_end applies to the block models (model3 to model6)')
    c = _frame_config(variant)
    c.tasks = tasks
    c.model.va5 = 'va' in tasks
    return c
  c = config_lib.base_config()
  c.kind = 'block' if end_to_end else 'temporal'
  c.tasks = tasks
  c.num_expr_classes = 7
  c.edition = 'abaw2'
  c.data.layout = 'per_task'
  c.data.sampling = 'balanced'
  c.temporal.encoder = 'stat'
  c.temporal.window = 'block'
  c.temporal.length = 16
  c.temporal.stat = True
  c.temporal.lstm_layers = 1 if model == 'stat_lstm' else 0
  c.temporal.hidden = 1024
  c.temporal.head_dims = (512,)
  c.temporal.dropout = 0.0
  c.temporal.va5 = 'va' in tasks
  config_lib.temporal_statistical_loss(c)
  c.optim.schedule = 'constant'
  c.num_epochs = 10.0
  if end_to_end:
    # The frame model of configs/mtl_va.py under the block model: its last stage and classifier
    # train, the stages before it are frozen; online augmentation, one draw per block.
    c.model.arch = 'resnet50'
    c.model.trainable = 'layer4'
    c.paper_init = ('a trained frame model (a configs/mtl_va.py run; the paper\'s: VGGFace2, '
                    'fine-tuned on AffectNet and RAF-DB)')
    c.device_augment.flip = True
    c.device_augment.rotate_deg = 10.0
    c.global_batch_size = c.eval_batch_size = 32  # 32 blocks of 16 frames: 512 crops a step
    c.num_epochs = 5.0
  if variant:
    c = config_lib.apply_variant(c, variant)
    c.temporal.hidden = 64 if variant == 'demo' else 8
    c.temporal.head_dims = (64,) if variant == 'demo' else (8,)
    c.temporal.length = 8 if variant == 'demo' else 4
    c.optim.learning_rate = 1e-3
    c.num_epochs = 10.0 if variant == 'demo' else 2.0
    if end_to_end:  # blocks of 4 crops: the frame model sees 4x the frames of an image run
      c.temporal.length = 4
      c.global_batch_size = c.eval_batch_size = 16 if variant == 'demo' else 8
      c.num_epochs = 2.0 if variant == 'demo' else 1.0
  return c
