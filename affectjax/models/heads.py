"""Multi-task heads: pooled features -> Dense(hidden) -> ReLU -> per-task outputs (float32)."""
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from affectjax import labels

# The temporal-statistical paper's 5-vector, in this order (targets: losses.va5_targets). Every
# entry lies in [-1, 1] when valence and arousal do (the differences are (a - v) / 2 and
# (v - a) / 2), so tanh fits all five.
VA5_NAMES = ('arousal', 'valence', 'mean', 'arousal_minus_mean', 'valence_minus_mean')


class MultiTaskHead(nn.Module):
  """Shared Dense(hidden)+ReLU, then one Dense per task.

  features [B, D] -> dict: 'embedding' [B, hidden] (after ReLU, before dropout), and per task
  'expr' [B, num_expr_classes] logits, 'au' [B, 12] logits, 'va' [B, 2] tanh (valence, arousal),
  'va5' [B, 5] tanh (VA5_NAMES) when va5. All float32 whatever the backbone's compute dtype.
  hidden=0 puts the task layers directly on the features (embedding = features).
  """
  tasks: Sequence[str] = labels.TASKS
  num_expr_classes: int = 7
  hidden: int = 512
  dropout: float = 0.0
  va5: bool = False

  @nn.compact
  def __call__(self, features, train: bool = False):
    unknown = set(self.tasks) - set(labels.TASKS)
    if unknown:
      raise ValueError(f'unknown tasks {sorted(unknown)}; expected a subset of {labels.TASKS}')
    if self.va5 and 'va' not in self.tasks:
      raise ValueError("va5 needs the 'va' task")
    dense = lambda n, name: nn.Dense(n, dtype=jnp.float32, param_dtype=jnp.float32, name=name)
    x = features.astype(jnp.float32)
    if self.hidden:
      x = nn.relu(dense(self.hidden, 'hidden')(x))
    out = {'embedding': x}
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    if 'expr' in self.tasks:
      labels.expr_classes(self.num_expr_classes)  # validates 7 or 8
      out['expr'] = dense(self.num_expr_classes, 'expr')(x)
    if 'au' in self.tasks:
      out['au'] = dense(labels.NUM_AUS, 'au')(x)
    if 'va' in self.tasks:
      out['va'] = jnp.tanh(dense(2, 'va')(x))
      if self.va5:
        out['va5'] = jnp.tanh(dense(len(VA5_NAMES), 'va5')(x))
    return out
