"""Multi-task heads: pooled features -> Dense(hidden) -> ReLU -> per-task outputs (float32)."""
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from affectjax import labels

# Output activations by the name labels.TASK_TABLE (and labels.VA5_OUTPUT) give them.
ACTIVATIONS = {'linear': lambda y: y, 'tanh': jnp.tanh}


class MultiTaskHead(nn.Module):
  """Shared Dense(hidden)+ReLU, then one Dense per task.

  features [B, D] -> dict: 'embedding' [B, hidden] (after ReLU, before dropout), and per task
  'expr' [B, num_expr_classes] logits, 'au' [B, 12] logits, 'va' [B, 2] tanh (valence, arousal),
  'va5' [B, 5] tanh (labels.VA5_NAMES) when va5 (`labels.model_outputs`). All float32 whatever
  the backbone's compute dtype. hidden=0 puts the task layers directly on the features
  (embedding = features).
  """
  tasks: Sequence[str] = labels.TASKS
  num_expr_classes: int = 7
  hidden: int = 512
  dropout: float = 0.0
  va5: bool = False

  @nn.compact
  def __call__(self, features, train: bool = False):
    labels.parse_tasks(self.tasks)  # validates the names
    if self.va5 and 'va' not in self.tasks:
      raise ValueError("va5 needs the 'va' task")
    if 'expr' in self.tasks:
      labels.expr_classes(self.num_expr_classes)  # validates 7 or 8
    dense = lambda n, name: nn.Dense(n, dtype=jnp.float32, param_dtype=jnp.float32, name=name)
    x = features.astype(jnp.float32)
    if self.hidden:
      x = nn.relu(dense(self.hidden, 'hidden')(x))
    out = {'embedding': x}
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    for name, size, activation in labels.model_outputs(self.tasks, self.num_expr_classes,
                                                       self.va5):
      out[name] = ACTIVATIONS[activation](dense(size, name)(x))
    return out
