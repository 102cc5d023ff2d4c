"""Temporal encoders over per-frame features (the ABAW4 2022 multi-task winners, method 4).

inputs {'features': float [B, L, D], 'mask': bool [B, L]} (a segment of L consecutive frames of
one video, padded at the end) -> per frame and task: 'expr' [B, L, C] logits, 'au' [B, L, 12]
logits, 'va' [B, L, 2] tanh (valence, arousal), all float32.

Encoders (`encoder`):
- 'gru' / 'lstm': `num_layers` unidirectional layers of `hidden` units (flax `nn.RNN` over
  `GRUCell` / `OptimizedLSTMCell`, which follow PyTorch's GRU / LSTM equations); padded frames
  after a segment's end do not affect the valid ones.
- 'transformer': a Dense projection to `hidden`, sinusoidal positions, then `num_layers` post-norm
  encoder layers as PyTorch's `TransformerEncoderLayer` (self-attention with `num_heads` heads,
  ReLU feed-forward of `ff_dim`, dropout, LayerNorm after each residual); padded frames are
  masked out of the attention. Context stays within a segment.
Each task has its own head: `head_dims` Dense+ReLU+dropout layers (512, 256 in the paper), then
the task's output layer; parameters live under 'head/<task>' so heads can be masked by path.
Not implemented (see the note in docs/design.md): the paper's 'share-bottom' and 'feedback'
frameworks and carrying an RNN's last state into the next segment.
"""
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import numpy as np

from affectjax import labels

ENCODERS = ('gru', 'lstm', 'transformer')


def default_temporal_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      'encoder': 'gru',  # 'gru' | 'lstm' | 'transformer'
      'hidden': 1024,
      'num_layers': 1,  # RNN layers; transformer encoder layers (the paper: 4)
      'num_heads': 4,  # transformer
      'ff_dim': 1024,  # transformer feed-forward width
      'head_dims': (512, 256),
      'dropout': 0.3,
  })


def sinusoidal_positions(length: int, dim: int) -> np.ndarray:
  """float32 [length, dim]: the Transformer paper's sine/cosine position encoding."""
  position = np.arange(length)[:, None]
  rates = np.exp(-np.log(10000.0) * (np.arange(0, dim, 2) / dim))
  table = np.zeros((length, dim), np.float32)
  table[:, 0::2] = np.sin(position * rates)
  table[:, 1::2] = np.cos(position * rates)[:, :dim // 2]
  return table


class EncoderLayer(nn.Module):
  """PyTorch `TransformerEncoderLayer(norm_first=False, activation='relu')`."""
  num_heads: int
  ff_dim: int
  dropout: float

  @nn.compact
  def __call__(self, x, attention_mask, train: bool):
    drop = lambda y: nn.Dropout(self.dropout, deterministic=not train)(y)
    attended = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, name='attention')(
        x, x, mask=attention_mask, deterministic=True)
    x = nn.LayerNorm(epsilon=1e-5, name='norm1')(x + drop(attended))
    y = nn.Dense(self.ff_dim, name='ff1')(x)
    y = nn.Dense(x.shape[-1], name='ff2')(drop(nn.relu(y)))
    return nn.LayerNorm(epsilon=1e-5, name='norm2')(x + drop(y))


class TaskHead(nn.Module):
  dims: Sequence[int]
  out: int
  dropout: float

  @nn.compact
  def __call__(self, x, train: bool):
    for i, dim in enumerate(self.dims):
      x = nn.Dropout(self.dropout, deterministic=not train)(nn.relu(
          nn.Dense(dim, name=f'hidden{i}')(x)))
    return nn.Dense(self.out, name='out')(x)


class TemporalModel(nn.Module):
  encoder: str = 'gru'
  hidden: int = 1024
  num_layers: int = 1
  num_heads: int = 4
  ff_dim: int = 1024
  head_dims: Sequence[int] = (512, 256)
  dropout: float = 0.3
  tasks: Sequence[str] = labels.TASKS
  num_expr_classes: int = 8

  @nn.compact
  def __call__(self, inputs, train: bool = False):
    x = jnp.asarray(inputs['features'], jnp.float32)
    mask = jnp.asarray(inputs['mask'], bool)
    if self.encoder in ('gru', 'lstm'):
      lengths = mask.sum(axis=1).astype(jnp.int32)  # valid frames come first in a segment
      for i in range(self.num_layers):
        cell = (nn.GRUCell(self.hidden, name=f'gru{i}') if self.encoder == 'gru'
                else nn.OptimizedLSTMCell(self.hidden, name=f'lstm{i}'))
        # A zero initial state derived from the input: under shard_map it is then per-device
        # ('varying') like the scan's outputs, as jax.lax.scan requires.
        zero = jnp.zeros_like(x[:, 0, :1]) * jnp.zeros((1, self.hidden), x.dtype)
        carry = zero if self.encoder == 'gru' else (zero, zero)
        x = nn.RNN(cell, name=f'rnn{i}')(x, initial_carry=carry, seq_lengths=lengths)
        if i + 1 < self.num_layers:
          x = nn.Dropout(self.dropout, deterministic=not train)(x)
    elif self.encoder == 'transformer':
      x = nn.Dense(self.hidden, name='project')(x)
      x = x + sinusoidal_positions(x.shape[1], self.hidden)[None]
      attention_mask = nn.make_attention_mask(mask, mask)
      for i in range(self.num_layers):
        x = EncoderLayer(self.num_heads, self.ff_dim, self.dropout, name=f'layer{i}')(
            x, attention_mask, train)
    else:
      raise ValueError(f'temporal.encoder must be one of {ENCODERS}, got {self.encoder!r}')
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return TaskHeads(tuple(self.tasks), self.num_expr_classes, tuple(self.head_dims),
                     self.dropout, name='head')(x, train)


class TaskHeads(nn.Module):
  """One `TaskHead` per task, named by the task (parameters under 'head/<task>')."""
  tasks: Sequence[str]
  num_expr_classes: int
  dims: Sequence[int]
  dropout: float

  @nn.compact
  def __call__(self, x, train: bool):
    sizes = {'expr': self.num_expr_classes, 'au': labels.NUM_AUS, 'va': 2}
    out = {}
    for task in (t for t in labels.TASKS if t in self.tasks):
      y = TaskHead(self.dims, sizes[task], self.dropout, name=task)(x, train)
      out[task] = jnp.tanh(y) if task == 'va' else y
    return out


def create_model(temporal_config, tasks, num_expr_classes: int) -> TemporalModel:
  c = temporal_config
  return TemporalModel(encoder=c.encoder, hidden=c.hidden, num_layers=c.num_layers,
                       num_heads=c.num_heads, ff_dim=c.ff_dim, head_dims=tuple(c.head_dims),
                       dropout=c.dropout, tasks=tuple(tasks), num_expr_classes=num_expr_classes)
