"""Temporal encoders over per-frame features (the ABAW4 2022 multi-task winners, method 4).

inputs {'features': float [B, L, D], 'mask': bool [B, L]} (a segment of L consecutive frames of
one video, padded at the end) -> per frame and task: 'expr' [B, L, C] logits, 'au' [B, L, 12]
logits, 'va' [B, L, 2] tanh (valence, arousal), all float32.

Encoders (`encoder`):
- 'gru' / 'lstm': `num_layers` unidirectional layers of `hidden` units (RecurrentLayer: PyTorch's
  GRU / LSTM equations, flax's GRUCell / OptimizedLSTMCell parameter layout, input projections
  hoisted out of the scan as cuDNN does); padded frames after a segment's end do not affect the
  valid ones.
- 'transformer': a Dense projection to `hidden`, sinusoidal positions, then `num_layers` post-norm
  encoder layers as PyTorch's `TransformerEncoderLayer` (self-attention with `num_heads` heads,
  ReLU feed-forward of `ff_dim`, dropout, LayerNorm after each residual); padded frames are
  masked out of the attention. Context stays within a segment.
Each task has its own head: `head_dims` Dense+ReLU+dropout layers (512, 256 in the paper), then
the task's output layer; parameters live under 'head/<task>' so heads can be masked by path.
Encoders are modules in the table `ENCODERS`; the paper's frameworks ('basic', 'share_bottom',
'feedback') are `TemporalModel.framework`. With `carry_state` (GRU / LSTM) each recurrent layer
starts a segment from the last state of the previous segment of its batch lane (the flax
collection 'carry', one row per lane), or from zeros where `inputs['reset']` is set (a video's
first segment): the paper's state carried across a video's consecutive segments, without
gradient between segments (`data/sequences.py` lays a video's segments out in order on a lane).
"""
from typing import ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from affectjax import labels
from affectjax.models import heads, stat

# A temporal model's per-frame input from the image run's features folder: 'embedding' (its
# heads' shared layer) or 'predictions' (its EXPR probabilities, AU probabilities and VA: the
# same quantities whichever network gives them, as out-of-fold features need).
INPUTS = ('embedding', 'predictions')


def default_temporal_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      'encoder': 'gru',  # 'gru' | 'lstm' | 'transformer'
      'inputs': 'embedding',  # INPUTS
      'hidden': 1024,
      'num_layers': 1,  # RNN layers; transformer encoder layers (the paper: 4)
      'num_heads': 4,  # transformer
      'ff_dim': 1024,  # transformer feed-forward width
      'head_dims': (512, 256),
      'dropout': 0.3,
      # The ABAW4 winners' frameworks (TemporalModel): 'basic' | 'share_bottom' | 'feedback';
      # top encoders of `top_layers` layers; feedback 'source>target' task pairs, e.g. 'au>expr'.
      'framework': 'basic',
      'top_layers': 1,
      'feedback': '',
      'va_heads': 'tanh',  # 'tanh' (one tanh pair) | 'linear' (separate valence, arousal heads)
      # GRU / LSTM: the last state of a video's segment starts its next segment (window
      # 'segment'; the segments of a video in order on one batch lane)
      'carry_state': False,
      # encoder 'stat' (the temporal statistical model, window 'block'): its modules
      'stat': True,  # mean / max / min over the block
      'lstm_layers': 1,  # bidirectional LSTM layers of `hidden` units over the probabilities
      'va5': True,  # the VA 5-vector branch
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
    # Dropout on the attention weights too, as PyTorch's MultiheadAttention(dropout=...).
    attended = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dropout_rate=self.dropout, name='attention')(
            x, x, mask=attention_mask, deterministic=not train)
    x = nn.LayerNorm(epsilon=1e-5, name='norm1')(x + drop(attended))
    y = nn.Dense(self.ff_dim, name='ff1')(x)
    y = nn.Dense(x.shape[-1], name='ff2')(drop(nn.relu(y)))
    return nn.LayerNorm(epsilon=1e-5, name='norm2')(x + drop(y))


class SequenceEncoder(nn.Module):
  """Base of the temporal encoders: `(x [B, L, D], mask [B, L], train) -> [B, L, hidden]`,
  dropout applied to the output. Each encoder uses the fields it needs."""
  hidden: int
  num_layers: int
  dropout: float
  num_heads: int = 4
  ff_dim: int = 1024
  stateful: bool = False  # recurrent encoders: carry the state across calls ('carry')


class _Weights(nn.Module):
  """A recurrent kernel [fan_in, features] (orthogonal init) and optional bias, as parameters."""
  features: int
  use_bias: bool

  @nn.compact
  def __call__(self, fan_in: int):
    kernel = self.param('kernel', nn.initializers.orthogonal(), (fan_in, self.features))
    return kernel, (self.param('bias', nn.initializers.zeros_init(), (self.features,))
                    if self.use_bias else None)


class RecurrentLayer(nn.Module):
  """One unidirectional GRU or LSTM layer over [B, L, D] -> [B, L, hidden], with PyTorch's
  equations and flax's GRUCell / OptimizedLSTMCell parameter layout (gates 'ir', 'iz', 'in' /
  'ii', 'if', 'ig', 'io' for the input, 'hr', ... for the state).

  As cuDNN does, the input projections of all frames are one matrix product before the scan;
  the scan does only the state's [B, hidden] x [hidden, gates x hidden] product per frame (flax's
  cells project the input inside the scan, frame by frame). Causal: a frame's output never sees
  later (padded) frames.
  """
  hidden: int
  cell: str  # 'gru' | 'lstm'
  stateful: bool = False  # start from the 'carry' collection's state, except where `reset`

  @nn.compact
  def __call__(self, x, reset=None):
    gates = ('r', 'z', 'n') if self.cell == 'gru' else ('i', 'f', 'g', 'o')
    # GRU: biases on the input side and on 'hn' (inside the reset gate); LSTM: on the state side.
    inputs = jnp.concatenate([nn.Dense(self.hidden, use_bias=self.cell == 'gru',
                                       name=f'i{g}')(x) for g in gates], axis=-1)
    weights = [_Weights(self.hidden, self.cell == 'lstm' or g == 'n', name=f'h{g}')(self.hidden)
               for g in gates]
    kernel = jnp.concatenate([k for k, _ in weights], axis=-1)
    h = self.hidden
    # A zero initial state derived from the input: under shard_map it is then per-device
    # ('varying') like the scan's outputs, as jax.lax.scan requires.
    zero = jnp.zeros_like(inputs[:, 0, :h])
    names = ('h',) if self.cell == 'gru' else ('c', 'h')
    held = [self.variable('carry', n, jnp.zeros, zero.shape, zero.dtype) for n in names
            ] if self.stateful else []
    start = [zero if reset is None else jnp.where(jnp.asarray(reset, bool)[:, None], zero,
                                                  jax.lax.stop_gradient(v.value)) for v in held]
    if self.cell == 'gru':
      bias_n = weights[2][1]

      def step(state, projected):
        recurrent = state @ kernel
        r = nn.sigmoid(projected[:, :h] + recurrent[:, :h])
        z = nn.sigmoid(projected[:, h:2 * h] + recurrent[:, h:2 * h])
        n = jnp.tanh(projected[:, 2 * h:] + r * (recurrent[:, 2 * h:] + bias_n))
        state = (1.0 - z) * n + z * state
        return state, state
      init = start[0] if held else zero
    else:
      bias = jnp.concatenate([b for _, b in weights])

      def step(state, projected):
        c, hs = state
        pre = projected + hs @ kernel + bias
        i, f, o = (nn.sigmoid(pre[:, k * h:(k + 1) * h]) for k in (0, 1, 3))
        c = f * c + i * jnp.tanh(pre[:, 2 * h:3 * h])
        hs = o * jnp.tanh(c)
        return (c, hs), hs
      init = tuple(start) if held else (zero, zero)
    last, outputs = jax.lax.scan(step, init, jnp.swapaxes(inputs, 0, 1))
    for variable, value in zip(held, (last,) if self.cell == 'gru' else last):
      variable.value = value  # a padded segment's is never used: a reset follows it
    return jnp.swapaxes(outputs, 0, 1)


class RecurrentEncoder(SequenceEncoder):
  """`num_layers` unidirectional RNN layers of `hidden` units (`cell`, RecurrentLayer), dropout
  after each; padded frames after a segment's end do not affect the valid ones."""
  cell: ClassVar[str] = 'gru'

  @nn.compact
  def __call__(self, x, mask, train: bool, reset=None):
    del mask  # causal layers: the valid frames come first in a segment
    for i in range(self.num_layers):
      x = RecurrentLayer(self.hidden, self.cell, self.stateful, name=f'{self.cell}{i}')(x, reset)
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return x


class GRUEncoder(RecurrentEncoder):
  cell: ClassVar[str] = 'gru'


class LSTMEncoder(RecurrentEncoder):
  cell: ClassVar[str] = 'lstm'


class TransformerEncoder(SequenceEncoder):
  """A Dense projection to `hidden`, sinusoidal positions, `num_layers` post-norm
  `EncoderLayer`s (`num_heads`, `ff_dim`) with a padding mask, then dropout."""

  @nn.compact
  def __call__(self, x, mask, train: bool, reset=None):
    del reset  # context stays within a segment
    x = nn.Dense(self.hidden, name='project')(x)
    x = x + sinusoidal_positions(x.shape[1], self.hidden)[None]
    attention_mask = nn.make_attention_mask(mask, mask)
    for i in range(self.num_layers):
      x = EncoderLayer(self.num_heads, self.ff_dim, self.dropout, name=f'layer{i}')(
          x, attention_mask, train)
    return nn.Dropout(self.dropout, deterministic=not train)(x)


# temporal.encoder -> its module. A new encoder is one `SequenceEncoder` and one entry here
# ('stat', the temporal statistical model, is a model of its own: `StatModel`).
ENCODERS = {'gru': GRUEncoder, 'lstm': LSTMEncoder, 'transformer': TransformerEncoder}


FRAMEWORKS = ('basic', 'share_bottom', 'feedback')


def parse_feedback(pairs: str) -> tuple:
  """'au>expr,expr>va' -> (('au', 'expr'), ('expr', 'va')): (source, target) task pairs."""
  out = []
  for pair in (p.strip() for p in (pairs or '').split(',') if p.strip()):
    source, sep, target = pair.partition('>')
    if not sep or not source or not target or source == target:
      raise ValueError(f"temporal.feedback: {pair!r} is not 'source>target' with two tasks")
    out.append((source, target))
  return tuple(out)


def check_framework(framework: str, feedback: Sequence[tuple], tasks: Sequence[str]) -> None:
  """Raises ValueError unless `framework`, its `feedback` pairs and `tasks` go together."""
  if framework not in FRAMEWORKS:
    raise ValueError(f'temporal.framework must be one of {FRAMEWORKS}, got {framework!r}')
  if bool(feedback) != (framework == 'feedback'):
    raise ValueError("temporal.feedback (source>target pairs) is needed by, and only by, "
                     f"temporal.framework='feedback' (got {framework!r})")
  top_order(tasks, feedback)


def top_order(tasks: Sequence[str], feedback: Sequence[tuple]) -> list:
  """The tasks in an order where every feedback source comes before its targets."""
  unknown = {t for pair in feedback for t in pair} - set(tasks)
  if unknown:
    raise ValueError(f'temporal.feedback names {sorted(unknown)}, not tasks of this run '
                     f'({",".join(tasks)})')
  order = []
  while len(order) < len(tasks):
    ready = [t for t in tasks if t not in order
             and all(s in order for s, target in feedback if target == t)]
    if not ready:
      raise ValueError(f'temporal.feedback pairs {feedback} form a cycle')
    order += ready
  return order


class TemporalModel(nn.Module):
  """A sequence encoder of `ENCODERS` and per-task heads, a prediction per frame.

  Frameworks (ABAW4 winners): 'basic', the encoder shared by every task's head; 'share_bottom',
  the encoder as a shared bottom with one top encoder per task (`top_layers` layers, parameters
  'top_<task>/...'); 'feedback', share-bottom where a target task's top encoder also reads its
  `feedback` sources' top-encoder outputs (concatenated; no gradient flows back into a source).
  `va_heads`: 'tanh' (one head, a tanh pair) or 'linear' (the paper's separate valence and
  arousal heads, linear outputs, parameters 'head/va/valence', 'head/va/arousal').
  """
  encoder: str = 'gru'
  hidden: int = 1024
  num_layers: int = 1
  num_heads: int = 4
  ff_dim: int = 1024
  head_dims: Sequence[int] = (512, 256)
  dropout: float = 0.3
  tasks: Sequence[str] = labels.TASKS
  num_expr_classes: int = 8
  framework: str = 'basic'
  top_layers: int = 1
  feedback: Sequence[tuple] = ()
  va_heads: str = 'tanh'
  carry_state: bool = False

  @nn.compact
  def __call__(self, inputs, train: bool = False):
    check_framework(self.framework, self.feedback, self.tasks)
    if self.encoder not in ENCODERS:
      raise ValueError(f'temporal.encoder must be one of {(*ENCODERS, "stat")}, got '
                       f'{self.encoder!r}')
    encoder = ENCODERS[self.encoder](self.hidden, self.num_layers, self.dropout, self.num_heads,
                                     self.ff_dim, self.carry_state, name='encoder')
    # The encoder's layers live directly under this model (`gru0`, `layer0`, `project`...), as
    # they did before encoders were modules of their own: existing checkpoints restore.
    nn.share_scope(self, encoder)
    mask = jnp.asarray(inputs['mask'], bool)
    # Without lanes (initialisation, a plain call) every segment starts a video.
    reset = inputs.get('reset', jnp.ones(mask.shape[:1], bool)) if self.carry_state else None
    x = encoder(jnp.asarray(inputs['features'], jnp.float32), mask, train, reset)
    if self.framework != 'basic':
      tops = {}
      for task in top_order(self.tasks, self.feedback):
        fed = [jax.lax.stop_gradient(tops[s]) for s, target in self.feedback if target == task]
        tops[task] = ENCODERS[self.encoder](
            self.hidden, self.top_layers, self.dropout, self.num_heads, self.ff_dim,
            self.carry_state, name=f'top_{task}')(jnp.concatenate([x] + fed, axis=-1), mask,
                                                  train, reset)
      x = tops
    return heads.TaskHeads(tuple(self.tasks), self.num_expr_classes, tuple(self.head_dims),
                     self.dropout, va_heads=self.va_heads, name='head')(x, train)


def create_model(temporal_config, tasks, num_expr_classes: int) -> nn.Module:
  c = temporal_config
  if c.encoder == 'stat':
    return stat.StatModel(stat=c.stat, lstm_layers=c.lstm_layers, lstm_hidden=c.hidden,
                     branch_hidden=c.head_dims[0], dropout=c.dropout, va5=c.va5,
                     tasks=tuple(tasks), num_expr_classes=num_expr_classes)
  return TemporalModel(encoder=c.encoder, hidden=c.hidden, num_layers=c.num_layers,
                       num_heads=c.num_heads, ff_dim=c.ff_dim, head_dims=tuple(c.head_dims),
                       dropout=c.dropout, tasks=tuple(tasks), num_expr_classes=num_expr_classes,
                       framework=c.framework, top_layers=c.top_layers,
                       feedback=parse_feedback(c.feedback), va_heads=c.va_heads,
                       carry_state=c.carry_state)
