"""The ABAW tasks and their label conventions: the one place that says what each task is.

`TASK_TABLE` holds one `Task` per task, in the canonical order (expr, au, va): its label's shape,
dtypes and missing-label sentinel, which labels are present, the model output (size and
activation), the annotation / submission header and the submission name. The rest of the
package reads these facts from here (`parse_tasks`, `missing_labels`, `mask_untrained`,
`has_label`, `model_outputs`) rather than spelling them out per task.

Missing labels: expr -1, au -1 (per AU), va -5 (per column). NumPy only: the data modules that
import this one do not import jax; the masks work on NumPy and jax.numpy arrays alike.
"""
import dataclasses
from typing import Callable

import numpy as np

EXPR_CLASSES_7 = ('Neutral', 'Anger', 'Disgust', 'Fear', 'Happiness', 'Sadness', 'Surprise')
EXPR_CLASSES_8 = EXPR_CLASSES_7 + ('Other',)
AU_NAMES = ('AU1', 'AU2', 'AU4', 'AU6', 'AU7', 'AU10', 'AU12', 'AU15', 'AU23', 'AU24', 'AU25',
            'AU26')
NUM_AUS = len(AU_NAMES)
VA_NAMES = ('valence', 'arousal')  # column order of VA labels and outputs

EXPR_MISSING = -1
AU_MISSING = -1
VA_MISSING = -5.0

# The temporal statistical model's auxiliary VA output (an output, not a task: its targets are
# computed from the VA labels, losses.va5_targets), in this order. Every entry lies in [-1, 1]
# when valence and arousal do (the differences are (a - v) / 2 and (v - a) / 2), so tanh fits.
VA5_NAMES = ('arousal', 'valence', 'mean', 'arousal_minus_mean', 'valence_minus_mean')
VA5_OUTPUT = ('va5', len(VA5_NAMES), 'tanh')  # (name, size, activation), beside the 'va' output


def expr_classes(num_classes: int) -> tuple:
  """Class names for the 7-class (ABAW1/2) or 8-class (ABAW3+, with Other) expression task."""
  if num_classes not in (7, 8):
    raise ValueError(f'num_expr_classes must be 7 or 8, got {num_classes}')
  return EXPR_CLASSES_8 if num_classes == 8 else EXPR_CLASSES_7


def expr_mask(expr):
  """True where an expression label is present; expr int [...]."""
  return expr >= 0


def au_mask(au):
  """True per AU where a label is present; au int [..., 12]."""
  return au >= 0


def va_mask(va):
  """True per column where valence / arousal is present; va float [..., 2]."""
  return va > VA_MISSING + 0.5


@dataclasses.dataclass(frozen=True)
class Task:
  """What one task is, for every module that handles its labels or outputs."""
  name: str  # key of the task in configs, batches, outputs and parameter paths ('head/<name>')
  submission_name: str  # its name in the ABAW submission files and folders
  columns: tuple | None  # the label's columns (header names); None: one EXPR class index
  index_dtype: type  # the label's dtype in the frame index (compact)
  batch_dtype: type  # in input batches
  decision_dtype: type  # in the decisions written as predictions (argmax, thresholds: int64)
  missing: float  # sentinel of a missing label (per column)
  mask: Callable  # labels -> bool per column: present
  activation: str  # of the model output: 'linear' (logits) or 'tanh'

  @property
  def shape(self) -> tuple:
    """Shape of one frame's label: () for a class index, else (columns,)."""
    return () if self.columns is None else (len(self.columns),)

  def dtype(self, kind: str) -> type:
    """The label's dtype where it is held: kind 'index', 'batch' or 'decision'."""
    return {'index': self.index_dtype, 'batch': self.batch_dtype,
            'decision': self.decision_dtype}[kind]

  def header(self, num_expr_classes: int) -> tuple:
    """Column names of its annotation and submission files: the classes, AUs or VA names."""
    return expr_classes(num_expr_classes) if self.columns is None else self.columns

  def output_size(self, num_expr_classes: int) -> int:
    """Width of the model output: one logit per class, else one value per label column."""
    return num_expr_classes if self.columns is None else len(self.columns)

  def has_label(self, values):
    """bool [N]: the rows of values ([N, *shape]) that carry this task's label (any column)."""
    present = self.mask(values)
    return present if self.columns is None else present.any(axis=-1)


TASK_TABLE = {task.name: task for task in (
    Task(name='expr', submission_name='EXPR', columns=None, index_dtype=np.int8,
         batch_dtype=np.int32, decision_dtype=np.int64, missing=EXPR_MISSING, mask=expr_mask,
         activation='linear'),
    Task(name='au', submission_name='AU', columns=AU_NAMES, index_dtype=np.int8,
         batch_dtype=np.int32, decision_dtype=np.int64, missing=AU_MISSING, mask=au_mask,
         activation='linear'),
    Task(name='va', submission_name='VA', columns=VA_NAMES, index_dtype=np.float32,
         batch_dtype=np.float32, decision_dtype=np.float64, missing=VA_MISSING, mask=va_mask,
         activation='tanh'),
)}
TASKS = tuple(TASK_TABLE)


def parse_tasks(tasks) -> tuple:
  """'expr,au' or ('expr', 'au') -> ('expr', 'au'): a non-empty set of tasks, in TASKS order."""
  names = [t.strip() for t in tasks.split(',') if t.strip()] if isinstance(tasks, str) else tasks
  unknown = [t for t in names if t not in TASK_TABLE]
  if unknown or not names:
    problem = f'unknown task {unknown[0]!r}' if unknown else 'no task'
    raise ValueError(f'tasks={tasks!r}: {problem}; expected a non-empty subset of '
                     f'{",".join(TASKS)}')
  return tuple(t for t in TASKS if t in names)


def has_label(task: str, values):
  """bool [N]: rows of `values` (task's labels, [N, *shape]) that carry a label."""
  return TASK_TABLE[task].has_label(values)


def missing_labels(n: int, kind: str = 'batch') -> dict:
  """{task: sentinel-filled labels [n, *shape]} of every task, with the dtypes of `kind`
  ('index', 'batch' or 'decision')."""
  return {t.name: np.full((n,) + t.shape, t.missing, t.dtype(kind)) for t in TASK_TABLE.values()}


def mask_untrained(batch: dict, tasks) -> None:
  """Sets the labels of the tasks not in `tasks` to their sentinels, in place."""
  for task in TASK_TABLE.values():
    if task.name not in tasks:
      batch[task.name][...] = task.missing


def model_outputs(tasks, num_expr_classes: int, va5: bool = False) -> tuple:
  """(name, size, activation) of a model's per-task outputs: `tasks` in TASKS order, then with
  `va5` (and the 'va' task) the VA 5-vector."""
  outputs = [(t.name, t.output_size(num_expr_classes), t.activation)
             for t in TASK_TABLE.values() if t.name in tasks]
  if va5 and 'va' in tasks:
    outputs.append(VA5_OUTPUT)
  return tuple(outputs)
