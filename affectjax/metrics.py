"""ABAW evaluation metrics on the host (NumPy): F1, accuracy, CCC, and a streaming accumulator.

Masking: a row counts for a task only when `batch['valid']` is true and its label is present
(`affectjax.labels` masks); AU counts per (frame, AU) element; VA counts a frame only when both
valence and arousal are annotated. Conventions shared with scikit-learn: an F1 whose
denominator 2TP + FP + FN is 0 (class or AU never present and never predicted) is 0, like
`zero_division=0` with `labels=range(C)`. AU predictions are positive where probability >= threshold.
"""
from typing import Iterable, Mapping, Sequence

import numpy as np

from affectjax import labels
from affectjax.data import index as index_lib

ABAW2_EXPR_WEIGHTS = (0.67, 0.33)  # (F1, accuracy)
ABAW2_AU_WEIGHTS = (0.5, 0.5)  # (F1, accuracy)
DEFAULT_THRESHOLD_GRID = tuple(np.round(np.arange(0.05, 0.951, 0.05), 2))


def f1_from_counts(tp, fp, fn):
  """Elementwise F1 = 2TP / (2TP + FP + FN), 0 where the denominator is 0; counts [...]."""
  tp, fp, fn = (np.asarray(a, np.float64) for a in (tp, fp, fn))
  denom = 2 * tp + fp + fn
  return np.divide(2 * tp, denom, out=np.zeros_like(denom), where=denom > 0)


def _ratio(num, den):
  """num / den as a float, 0 when den is 0 (an empty task)."""
  return float(num) / float(den) if den else 0.0


def ccc(x, y) -> float:
  """Concordance correlation coefficient of two 1-D arrays, population statistics, float64.

  Returns 0 for empty input and when both inputs are the same constant (0 / 0).
  """
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.size == 0:
    return 0.0
  mx, my = x.mean(), y.mean()
  cov = np.mean((x - mx) * (y - my))
  denom = x.var() + y.var() + (mx - my) ** 2
  return float(2 * cov / denom) if denom > 0 else 0.0


def confusion_matrix(pred, target, num_classes, mask=None):
  """Counts [C,C] (rows target, columns prediction) over rows with target >= 0 and mask."""
  pred, target = np.asarray(pred).ravel(), np.asarray(target).ravel()
  keep = labels.expr_mask(target)
  if mask is not None:
    keep &= np.asarray(mask, bool).ravel()
  flat = target[keep].astype(np.int64) * num_classes + pred[keep].astype(np.int64)
  return np.bincount(flat, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def _expr_from_confusion(conf):
  """EXPR metrics from a confusion matrix [C,C] (rows target)."""
  tp = np.diag(conf)
  f1 = f1_from_counts(tp, conf.sum(0) - tp, conf.sum(1) - tp)
  total = int(conf.sum())
  out = {'expr_f1': float(f1.mean()), 'expr_acc': _ratio(tp.sum(), total)}
  out['expr_abaw2'] = ABAW2_EXPR_WEIGHTS[0] * out['expr_f1'] + ABAW2_EXPR_WEIGHTS[1] * out['expr_acc']
  out.update(expr_f1_per_class=f1.tolist(), expr_confusion=conf.tolist(), count_expr=total)
  return out


def expr_metrics(pred, target, num_classes):
  """EXPR F1 (macro over all C classes), accuracy, ABAW2 score; pred int [N], target int [N] (-1)."""
  return _expr_from_confusion(confusion_matrix(pred, target, num_classes))


def binary_counts(pred, target, mask=None):
  """Per-column (TP, FP, FN, TN) int64 arrays [K]; pred bool [N,K], target 0/1/-1 [N,K]."""
  pred, target = np.asarray(pred, bool), np.asarray(target)
  keep = labels.au_mask(target)
  if mask is not None:
    keep &= np.asarray(mask, bool)
  pos, neg = keep & (target == 1), keep & (target == 0)
  return tuple(np.sum(a, axis=0, dtype=np.int64)
               for a in (pos & pred, neg & pred, pos & ~pred, neg & ~pred))


def _au_from_counts(tp, fp, fn, tn):
  """AU metrics from per-AU counts [12]; accuracy pools all labelled (frame, AU) elements."""
  f1 = f1_from_counts(tp, fp, fn)
  total = int(tp.sum() + fp.sum() + fn.sum() + tn.sum())
  out = {'au_f1': float(f1.mean()), 'au_f1_per_au': f1.tolist(), 'au_support': (tp + fn).tolist(),
         'au_acc': _ratio(tp.sum() + tn.sum(), total)}
  out['au_abaw2'] = ABAW2_AU_WEIGHTS[0] * out['au_f1'] + ABAW2_AU_WEIGHTS[1] * out['au_acc']
  out['count_au'] = total
  return out


def au_metrics(probs, target, thresholds=0.5):
  """AU F1 (mean over AUs), accuracy, ABAW2 score; probs float [N,12], target 0/1/-1 [N,12].

  thresholds: a scalar or one per AU [12] (e.g. from `tune_au_thresholds`). au_acc is the fraction
  of correct predictions over all labelled (frame, AU) elements, as in the ABAW2 baseline.
  """
  pred = np.asarray(probs) >= np.asarray(thresholds)
  return _au_from_counts(*binary_counts(pred, target))


def tune_au_thresholds(probs, target, grid: Sequence[float] = DEFAULT_THRESHOLD_GRID):
  """Per-AU threshold from `grid` maximising that AU's F1 on (probs, target); returns float [12].

  Ties go to the grid value closest to 0.5. Choose on one split, apply on another with
  `au_metrics(probs, target, thresholds)`.
  """
  probs, grid = np.asarray(probs), np.asarray(grid, np.float64)
  f1 = np.stack([f1_from_counts(*binary_counts(probs >= t, target)[:3]) for t in grid])  # [G,K]
  order = np.argsort(np.abs(grid - 0.5), kind='stable')  # try central thresholds first on ties
  best = order[np.argmax(f1[order], axis=0)]
  return grid[best]


DEFAULT_VA_WINDOWS = (1, 3, 5, 9, 15, 25, 41, 61)


def smooth_per_video(values, video, window: int, frame=None, causal: bool = False):
  """Centred moving average within each run of equal `video` ids (rows of a video contiguous, in
  time order); near a video's ends the window shrinks to what is available. values float
  [N, ...]; video int [N]. `causal`: the window is the row and the `window - 1` before it (what
  a causal temporal model sees), not centred.

  `window` (odd; 1 = unchanged) counts video frames when `frame` (int [N], ascending within each
  video) is given: a row averages the rows of its video whose frame number is within half a
  window of its own, so where frames are sparse (no face, no label) the window never reaches
  further in time than `window` frames. Without `frame` it counts rows."""
  values = np.asarray(values, np.float64)
  window = int(window)
  if window <= 1 or len(values) == 0:
    return values
  back, ahead = (window - 1, 0) if causal else (window // 2, window // 2)
  video = np.asarray(video)
  if frame is None:
    first, last = index_lib.run_bounds(video)
    rows = np.arange(len(values))
    lo, hi = np.maximum(rows - back, first), np.minimum(rows + ahead + 1, last)
  else:
    run = np.cumsum(np.r_[True, video[1:] != video[:-1]]) - 1
    frame = np.asarray(frame, np.int64)
    if np.any((np.diff(frame) <= 0) & (np.diff(run) == 0)):
      raise ValueError('smooth_per_video: frame numbers must ascend within each video')
    key = (run.astype(np.int64) << 32) + frame  # ascending over all rows
    lo = np.searchsorted(key, key - back, side='left')
    hi = np.searchsorted(key, key + ahead, side='right')
  cumulative = np.concatenate([np.zeros((1,) + values.shape[1:]), np.cumsum(values, axis=0)])
  counts = (hi - lo).reshape((-1,) + (1,) * (values.ndim - 1))
  return (cumulative[hi] - cumulative[lo]) / counts


def tune_va_window(pred, target, video, windows: Sequence[int] = DEFAULT_VA_WINDOWS,
                   frame=None) -> int:
  """The smoothing window (from `windows`) maximising the mean VA CCC of
  `smooth_per_video(pred, video, w, frame)` against target (float [N, 2]); ties go to the
  smaller."""
  scores = [va_metrics(smooth_per_video(pred, video, w, frame), target)['va_ccc']
            for w in windows]
  return int(windows[int(np.argmax(scores))])


def va_metrics(pred, target):
  """VA CCC per dimension, their mean and the MSE; pred, target float [N,2] (valence, arousal)."""
  pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
  out = {f'va_ccc_{key}': ccc(pred[:, col], target[:, col])
         for col, key in enumerate(labels.VA_NAMES)}
  out['va_ccc'] = 0.5 * (out['va_ccc_valence'] + out['va_ccc_arousal'])
  out['va_mse'] = float(np.mean(np.square(pred - target))) if len(pred) else 0.0
  out['count_va'] = len(pred)
  return out


def abaw_mtl_score(va_ccc: float, expr_f1: float, au_f1: float) -> float:
  """ABAW3/4 multi-task score P = mean CCC + EXPR macro F1 + AU mean F1 (at most 3)."""
  return float(va_ccc + expr_f1 + au_f1)


_SCORE_KEYS = {
    'abaw2': {'expr': 'expr_abaw2', 'au': 'au_abaw2', 'va': 'va_ccc'},
    'abaw3': {'expr': 'expr_f1', 'au': 'au_f1', 'va': 'va_ccc'},
}
EDITIONS = tuple(_SCORE_KEYS)  # config.edition


def score(metrics: Mapping[str, float], tasks: Iterable[str], edition: str = 'abaw3') -> float:
  """Validation score for checkpoint selection: sum of the trained tasks' ABAW scores.

  edition 'abaw2': 0.67 F1 + 0.33 Acc (EXPR), 0.5 F1 + 0.5 Acc (AU), mean CCC (VA);
  'abaw3' (and later): EXPR macro F1, AU mean F1, mean CCC.
  """
  if edition not in _SCORE_KEYS:
    raise ValueError(f'edition must be one of {sorted(_SCORE_KEYS)}, got {edition!r}')
  return float(sum(metrics[_SCORE_KEYS[edition][task]] for task in tasks))


def sigmoid(x):
  """Numerically stable logistic function in float64."""
  return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, np.float64)))


class MetricsAccumulator:
  """Streams evaluation batches and computes the ABAW metrics of the tasks evaluated.

  State: an EXPR confusion matrix, per-AU TP/FP/FN/TN at threshold 0.5, and the valid VA
  predictions and targets (so CCC is exact). With keep_predictions=True it also keeps, per task,
  the masked-in rows' predictions (EXPR logits, AU probabilities, VA values), targets and
  `batch['index']`, e.g. for `tune_au_thresholds` or temporal smoothing.
  """

  def __init__(self, tasks: Iterable[str] = labels.TASKS, num_expr_classes: int = 7,
               keep_predictions: bool = False):
    self.tasks = tuple(t for t in labels.TASKS if t in set(tasks))
    self.num_expr_classes = num_expr_classes
    self.keep_predictions = keep_predictions
    self.reset()

  def reset(self):
    """Forgets every batch seen so far."""
    self._confusion = np.zeros((self.num_expr_classes,) * 2, np.int64)
    self._au_counts = [np.zeros(labels.NUM_AUS, np.int64) for _ in range(4)]
    self._kept = {task: {'pred': [], 'target': [], 'index': []} for task in self.tasks}

  def _keep(self, task, pred, target, index, force=False):
    if force or self.keep_predictions:
      kept = self._kept[task]
      kept['pred'].append(np.asarray(pred))
      kept['target'].append(np.asarray(target))
      if index is not None:
        kept['index'].append(np.asarray(index))

  def update(self, outputs: Mapping[str, np.ndarray], batch: Mapping[str, np.ndarray]):
    """Adds one batch: outputs 'expr' logits [B,C], 'au' logits [B,12], 'va' [B,2]; batch labels."""
    n = len(next(iter(batch.values())))
    valid = np.asarray(batch.get('valid', np.ones(n, bool)), bool)
    index = batch.get('index')
    if 'expr' in self.tasks:
      logits, target = np.asarray(outputs['expr']), np.asarray(batch['expr'])
      rows = valid & labels.has_label('expr', target)
      self._confusion += confusion_matrix(logits.argmax(-1), target, self.num_expr_classes, rows)
      self._keep('expr', logits[rows], target[rows], None if index is None else index[rows])
    if 'au' in self.tasks:
      probs, target = sigmoid(outputs['au']), np.asarray(batch['au'])
      rows = valid & labels.has_label('au', target)
      target = np.where(valid[:, None], target, labels.AU_MISSING)
      for total, count in zip(self._au_counts, binary_counts(probs >= 0.5, target)):
        total += count
      self._keep('au', probs[rows].astype(np.float32), target[rows],
                 None if index is None else index[rows])
    if 'va' in self.tasks:
      target = np.asarray(batch['va'])
      rows = valid & labels.va_mask(target).all(-1)
      self._keep('va', np.asarray(outputs['va'])[rows], target[rows],
                 None if index is None else index[rows], force=True)

  def predictions(self) -> dict:
    """Kept rows per task: {task: {'pred', 'target', 'index'}} concatenated arrays."""
    return {task: {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in kept.items()}
            for task, kept in self._kept.items() if kept['pred']}

  def compute(self) -> dict:
    """Metrics of the evaluated tasks (keys listed in docs/design.md), plus mtl_score."""
    out = {}
    if 'expr' in self.tasks:
      out.update(_expr_from_confusion(self._confusion))
    if 'au' in self.tasks:
      out.update(_au_from_counts(*self._au_counts))
    if 'va' in self.tasks:
      kept = self._kept['va']
      pred = np.concatenate(kept['pred']) if kept['pred'] else np.zeros((0, 2))
      target = np.concatenate(kept['target']) if kept['target'] else np.zeros((0, 2))
      out.update(va_metrics(pred, target))
    if set(self.tasks) == set(labels.TASKS):
      out['mtl_score'] = abaw_mtl_score(out['va_ccc'], out['expr_f1'], out['au_f1'])
    return out
