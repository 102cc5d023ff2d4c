"""The multi-task temporal statistical model (ABAW 2020, method 2): statistics and a BiLSTM over
blocks of per-frame predictions; its heads are `heads.TaskHeads`. `BlockModel` trains it end to
end with the frame model under it, on blocks of face crops."""
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from affectjax.models import heads


def masked_stats(x, mask):
  """Mean, max and min over axis 1 of x [B, S, F] where mask [B, S]: three [B, F]."""
  m = mask[..., None]
  count = jnp.maximum(m.sum(axis=1), 1)
  mean = jnp.where(m, x, 0.0).sum(axis=1) / count
  return mean, jnp.where(m, x, -jnp.inf).max(axis=1), jnp.where(m, x, jnp.inf).min(axis=1)


class StatModel(nn.Module):
  """The multi-task temporal statistical model (ABAW 2020, method 2), over blocks of frames.

  inputs {'features' [B, S, D], 'probs' [B, S, C] (the frame model's EXPR probabilities),
  'mask' [B, S]}: a frame and its S - 1 previous frames, left-aligned, so the current frame is
  the last present one. Fusion of the current features and probabilities with, when `stat`, the
  masked mean, max and min over the block of the probabilities and of the features, and with
  `lstm_layers` bidirectional LSTM layers of `lstm_hidden` units over the probabilities (their
  final forward and backward states). Branches of two Dense layers: EXPR logits, VA (tanh) and,
  with `va5`, the 5-vector (tanh). Outputs [B, 1, ...]: the current frame's prediction.
  """
  stat: bool = True
  lstm_layers: int = 1
  lstm_hidden: int = 1024
  branch_hidden: int = 512
  dropout: float = 0.0
  va5: bool = True
  tasks: Sequence[str] = ('expr', 'va')
  num_expr_classes: int = 7

  @nn.compact
  def __call__(self, inputs, train: bool = False):
    if 'probs' not in inputs:
      raise ValueError('the temporal statistical model needs the frame model\'s EXPR '
                       'probabilities: extract features from an image run that trains EXPR')
    features = jnp.asarray(inputs['features'], jnp.float32)
    probs = jnp.asarray(inputs['probs'], jnp.float32)
    mask = jnp.asarray(inputs['mask'], bool)
    lengths = mask.sum(axis=1).astype(jnp.int32)
    current = jnp.maximum(lengths - 1, 0)
    take = lambda x: jnp.take_along_axis(x, current[:, None, None], axis=1)[:, 0]
    parts = [take(features), take(probs)]
    if self.stat:
      parts += [*masked_stats(probs, mask), *masked_stats(features, mask)]
    y = probs
    for i in range(self.lstm_layers):
      zero = jnp.zeros_like(y[:, 0, :1]) * jnp.zeros((1, self.lstm_hidden), y.dtype)
      carry = ((zero, zero), (zero, zero))  # per-device under shard_map, like the outputs
      (forward, backward), y = nn.Bidirectional(
          nn.RNN(nn.OptimizedLSTMCell(self.lstm_hidden, name=f'lstm{i}_forward')),
          nn.RNN(nn.OptimizedLSTMCell(self.lstm_hidden, name=f'lstm{i}_backward')),
          return_carry=True, name=f'bilstm{i}')(y, initial_carry=carry, seq_lengths=lengths)
      if i + 1 == self.lstm_layers:
        parts += [forward[1], backward[1]]  # final hidden states (LSTM carry = (c, h))
    x = nn.Dropout(self.dropout, deterministic=not train)(jnp.concatenate(parts, axis=-1))
    out = heads.TaskHeads(tuple(self.tasks), self.num_expr_classes, (self.branch_hidden,),
                    self.dropout, va5=self.va5, name='head')(x, train)
    return {k: v[:, None] for k, v in out.items()}


class BlockModel(nn.Module):
  """Method 2 end to end: the frame model (a backbone and its `heads.MultiTaskHead` for EXPR,
  under 'backbone' and 'head' as in `affect.AffectModel`, so `init_from` a frame run such as
  configs/mtl_va.py loads them) on every frame of a block, then `temporal` (a StatModel) over the
  frames' embeddings and EXPR probabilities.

  inputs {'image' [B, S, H, W, 3] prepared, 'mask' [B, S]} -> `temporal`'s outputs for the
  row's own frame, [B, ...]. Which backbone parts train is the backbone's (`frozen_parts`).
  """
  backbone: nn.Module
  temporal: nn.Module
  num_expr_classes: int = 7
  hidden: int = 512
  dropout: float = 0.0

  def setup(self):
    self.head = heads.MultiTaskHead(tasks=('expr',), num_expr_classes=self.num_expr_classes,
                                    hidden=self.hidden, dropout=self.dropout)

  def __call__(self, inputs, train: bool = False):
    images = inputs['image']
    b, s = images.shape[:2]
    frames = self.head(self.backbone(images.reshape((b * s,) + images.shape[2:]), train=train),
                       train=train)
    block = {'features': frames['embedding'].reshape(b, s, -1),
             'probs': jax.nn.softmax(frames['expr'].astype(jnp.float32)).reshape(b, s, -1),
             'mask': inputs['mask']}
    return {k: v[:, 0] for k, v in self.temporal(block, train=train).items()}
