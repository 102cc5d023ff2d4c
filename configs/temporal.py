"""Multi-task temporal encoders over per-frame features (ABAW4 2022 MTL challenge, first place).

First extract per-frame features with a trained image run (its heads' shared layer), then train
a temporal model on segments of them:

  python -m affectjax.main --config=configs/mtl3.py --workdir=runs/mtl3 --config.mode=features
  python -m affectjax.main --config=configs/temporal.py:gru --workdir=runs/temporal_gru \
    --config.temporal.features_dir=runs/mtl3/features

Variants: `gru` (default), `lstm` (hidden 1024) or `transformer` (4 layers, 4 heads, feed-forward
1024); with `share_bottom` or `feedback` (AU's top encoder feeding EXPR's) for the paper's other
frameworks (`basic` by default); append `,demo` or `,test` for the small variants
(`configs/temporal.py:lstm,feedback,demo`).
Segments of 250 consecutive annotated frames; per task a head of Dense 512 -> 256 -> output
(separate linear valence and arousal heads);
loss a MSE(valence) + b MSE(arousal) + c CE(EXPR, 8 classes) + d BCE(AU), all weights 1 here
(the paper tunes them); Adam 5e-5, 50 epochs, batch 8 segments, dropout 0.3. GRU and LSTM
carry their last state from a video's segment to its next (`temporal.carry_state`: each batch
row a lane holding a video's segments in order; no gradient between segments); its VA
smoothing is mode=eval's tuned window plus --config.predict.va_window.
"""
from affectjax import config as config_lib
from affectjax.models import temporal


def get_config(arg=None):
  words = [w for w in (arg or '').split(',') if w]
  frameworks = [w for w in words if w in temporal.FRAMEWORKS]
  encoder, variant = config_lib.parse_variant(
      ','.join(w for w in words if w not in temporal.FRAMEWORKS), tuple(temporal.ENCODERS),
      'gru', 'configs/temporal.py')
  c = config_lib.base_config()
  c.kind = 'temporal'
  c.tasks = 'expr,au,va'
  c.num_expr_classes = 8
  c.edition = 'abaw3'
  c.data.layout = 'mtl'
  c.temporal.encoder = encoder
  c.temporal.hidden = 1024
  c.temporal.num_layers = 4 if encoder == 'transformer' else 1
  c.temporal.num_heads = 4
  c.temporal.ff_dim = 1024
  c.temporal.head_dims = (512, 256)
  c.temporal.dropout = 0.3
  c.temporal.length = 250
  c.temporal.framework = frameworks[0] if frameworks else 'basic'
  c.temporal.top_layers = 1  # the authors' code: one layer per task on top of the shared ones
  c.temporal.feedback = 'au>expr' if c.temporal.framework == 'feedback' else ''
  c.temporal.va_heads = 'linear'  # valence and arousal heads of their own, linear
  c.temporal.carry_state = encoder in ('gru', 'lstm')  # state across a video's segments
  c.loss.expr = 'ce'
  c.loss.va = 'mse'
  c.loss.va_column_weights = (1.0, 1.0)  # a, b
  c.loss.weights.expr = 1.0  # c
  c.loss.weights.au = 1.0  # d
  c.optim.optimizer = 'adam'
  c.optim.learning_rate = 5e-5
  c.optim.schedule = 'constant'
  c.num_epochs = 50.0
  c.global_batch_size = c.eval_batch_size = 8
  c.checkpoint_every_steps = 500
  if variant:
    c = config_lib.apply_variant(c, variant)  # synthetic data, logging and checkpoint cadence
    c.temporal.hidden = c.temporal.ff_dim = 128 if variant == 'demo' else 16
    c.temporal.head_dims = (64, 32) if variant == 'demo' else (8,)
    c.temporal.num_layers = min(c.temporal.num_layers, 2)
    c.temporal.length = 32 if variant == 'demo' else 8
    c.optim.learning_rate = 1e-3
    c.num_epochs = 30.0 if variant == 'demo' else 2.0
    c.global_batch_size = c.eval_batch_size = 8 if variant == 'demo' else 2
  return c
