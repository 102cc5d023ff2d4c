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

Variants (the paper's ablation): `stat` (models 3/4: block + STAT) and `stat_lstm` (models 5/6:
+ LSTM, the default), both EXPR + VA (models 4/6; --config.tasks=expr for models 3/5); append
`,demo` or `,test` for the small variants.
"""
from affectjax import config as config_lib

VARIANTS = ('stat_lstm', 'stat')


def get_config(arg=None):
  model, variant = config_lib.parse_variant(arg, VARIANTS, 'stat_lstm',
                                            'configs/temporal_stat.py')
  c = config_lib.base_config()
  c.kind = 'temporal'
  c.tasks = 'expr,va'
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
  c.temporal.va5 = True
  config_lib.temporal_statistical_loss(c)
  c.optim.schedule = 'constant'
  c.num_epochs = 10.0
  if variant:
    c = config_lib.apply_variant(c, variant)
    c.temporal.hidden = 64 if variant == 'demo' else 8
    c.temporal.head_dims = (64,) if variant == 'demo' else (8,)
    c.temporal.length = 8 if variant == 'demo' else 4
    c.optim.learning_rate = 1e-3
    c.num_epochs = 10.0 if variant == 'demo' else 2.0
  return c
