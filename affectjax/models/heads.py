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


class TaskHeads(nn.Module):
  """One `TaskHead` per task, named by the task (parameters under 'head/<task>'); with `va5`
  also the temporal statistical model's VA 5-vector branch ('head/va5', tanh)."""
  tasks: Sequence[str]
  num_expr_classes: int
  dims: Sequence[int]
  dropout: float
  va5: bool = False
  va_heads: str = 'tanh'  # 'tanh' | 'linear' (separate valence and arousal heads)

  @nn.compact
  def __call__(self, x, train: bool):
    """x: [..., F], or {task: [..., F]} (each task's own encoder output)."""
    if self.va_heads not in ('tanh', 'linear'):
      raise ValueError(f"temporal.va_heads must be 'tanh' or 'linear', got {self.va_heads!r}")
    out = {}
    for name, size, activation in labels.model_outputs(self.tasks, self.num_expr_classes,
                                                       self.va5):
      inputs = x[name] if isinstance(x, dict) else x
      if name == 'va' and self.va_heads == 'linear':
        out[name] = ValenceArousalHeads(self.dims, self.dropout, name=name)(inputs, train)
      else:
        out[name] = ACTIVATIONS[activation](
            TaskHead(self.dims, size, self.dropout, name=name)(inputs, train))
    return out


class ValenceArousalHeads(nn.Module):
  """The ABAW4 winners' VA output: a head each for valence and arousal, linear, [..., 2]."""
  dims: Sequence[int]
  dropout: float

  @nn.compact
  def __call__(self, x, train: bool):
    return jnp.concatenate([TaskHead(self.dims, 1, self.dropout, name=name)(x, train)
                            for name in ('valence', 'arousal')], axis=-1)
