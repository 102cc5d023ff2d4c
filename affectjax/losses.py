"""Masked multi-task losses for EXPR, AU and VA (pure jax.numpy, jit- and shard_map-friendly).

Every per-task loss returns a `(sum, count)` pair of float32 scalars, so the mean over the valid
labels of the global batch is `psum(sum) / max(psum(count), 1)` and a shard (or batch) without labels
for a task contributes exactly zero, with a zero (not NaN) gradient. CCC is not a mean of per-frame
terms; it reduces through `ccc_moments` (six sums that psum) and `ccc_from_moments`.

Gradients under `jax.shard_map` (JAX 0.10, default `check_vma=True`, parameters passed replicated
with in_spec `P()`): the gradient of the per-device `multitask_loss(..., axis_name='data')` with
respect to the replicated parameters is ALREADY the gradient of the global-batch loss, identical on
every device. The psum in the loss makes it device-invariant, and the transpose of the implicit
replicated-to-varying cast on the parameters is itself a psum. So the trainer needs no extra
collective; if it applies one, it must be `jax.lax.pmean` (a no-op on these device-invariant
gradients, and also the correct combination under `check_vma=False`, where the per-device gradient
is N times the local contribution). `jax.lax.psum` would multiply the update by the number of
devices. `tests/test_losses.py::test_shard_map_gradients_match_single_device` checks all of this.
"""
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import ml_collections

from affectjax import labels

CCC_EPS = 1e-8


def masked_sum(values, mask):
  """Returns (Σ mask·values, Σ mask) as float32 scalars.

  values: float [...]; mask: bool or non-negative float weights, broadcastable to values.
  Entries where mask is 0 are replaced by 0 before multiplying, so inf or NaN there cannot leak
  into the sum. Inputs to log / division must still be masked by the caller (a NaN in the
  backward pass of a masked entry would otherwise survive `where`).
  """
  mask = jnp.broadcast_to(jnp.asarray(mask, jnp.float32), jnp.shape(values))
  values = jnp.where(mask > 0, values.astype(jnp.float32) * mask, 0.0)
  return jnp.sum(values), jnp.sum(mask)


def _safe_classes(target, mask):
  """Replaces missing class labels (-1) by 0 so gathers stay in range; int [...]."""
  return jnp.where(mask, target, 0).astype(jnp.int32)


def _masked_log_softmax(logits, mask):
  """log_softmax of logits [B,C] with masked-out rows zeroed first (inf/NaN padding stays out)."""
  logits = jnp.where(mask[:, None], logits.astype(jnp.float32), 0.0)
  return jax.nn.log_softmax(logits, axis=-1)


def _label_weights(class_weights, target):
  """Per-label weight w_target (1 without class weights); target int [...] already safe."""
  if class_weights is None:
    return jnp.ones(target.shape, jnp.float32)
  return jnp.asarray(class_weights, jnp.float32)[target]


def softmax_cross_entropy(logits, target, mask, class_weights=None, label_smoothing=0.0):
  """Masked softmax cross-entropy; logits [B,C], target int [B], mask bool [B].

  Returns (Σ w_y·ce, Σ w_y) over masked-in rows (w = class_weights or 1): the weighted mean of
  PyTorch's CrossEntropyLoss(weight=...). With label smoothing the target distribution is
  (1-ε)·onehot + ε/C and each row keeps the weight of its true class (PyTorch instead weights the
  smoothing term class by class; the two agree when either option is off).
  """
  y = _safe_classes(target, mask)
  logp = _masked_log_softmax(logits, mask)
  nll = -jnp.take_along_axis(logp, y[:, None], axis=-1)[:, 0]
  if label_smoothing:
    nll = (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(logp, axis=-1)
  return masked_sum(nll, mask * _label_weights(class_weights, y))


def focal_loss(logits, target, mask, gamma=2.0, alpha=None):
  """Masked multi-class focal loss -α_y (1 - p_y)^γ log p_y; logits [B,C], target int [B].

  Returns (Σ focal, number of masked-in rows): α is a per-class factor (Lin et al. 2017), not a
  re-normalising weight. γ = 0 and α = None give exactly `softmax_cross_entropy`.
  """
  y = _safe_classes(target, mask)
  logp = _masked_log_softmax(logits, mask)
  logp_y = jnp.take_along_axis(logp, y[:, None], axis=-1)[:, 0]
  loss = -logp_y
  if gamma:  # x**0 has a NaN derivative at x = 0 (p_y = 1), so γ = 0 skips the factor.
    loss = jnp.power(jnp.maximum(1.0 - jnp.exp(logp_y), 0.0), gamma) * loss
  if alpha is not None:
    loss = _label_weights(alpha, y) * loss
  return masked_sum(loss, mask)


def sigmoid_bce(logits, target, mask, pos_weight=None):
  """Masked per-element binary cross-entropy on logits; logits [B,K], target int/float [B,K].

  PyTorch BCEWithLogitsLoss(pos_weight=...) semantics: -[pw·y·log σ(x) + (1-y)·log(1-σ(x))],
  computed with log_sigmoid for stability. Returns (Σ over labelled (frame, AU) elements, count).
  """
  y = jnp.where(mask, target, 0).astype(jnp.float32)
  logits = jnp.where(mask, logits.astype(jnp.float32), 0.0)
  pw = 1.0 if pos_weight is None else jnp.asarray(pos_weight, jnp.float32)
  loss = -(pw * y * jax.nn.log_sigmoid(logits) + (1.0 - y) * jax.nn.log_sigmoid(-logits))
  return masked_sum(loss, mask)


def squared_error(pred, target, mask):
  """Masked sum of squared errors; pred, target float [...], mask broadcastable. (sum, count)."""
  diff = jnp.where(mask, pred.astype(jnp.float32) - target.astype(jnp.float32), 0.0)
  return masked_sum(jnp.square(diff), mask)


def ccc_moments(x, y, mask):
  """Sufficient statistics of CCC over masked-in entries: (n, Σx, Σy, Σx², Σy², Σxy) float32.

  x, y float [N], mask bool [N]. Each entry is a sum, so the tuple reduces across devices with psum.
  """
  m = jnp.asarray(mask, jnp.float32)
  x = jnp.where(mask, x, 0.0).astype(jnp.float32)
  y = jnp.where(mask, y, 0.0).astype(jnp.float32)
  return tuple(jnp.sum(v) for v in (m, m * x, m * y, m * x * x, m * y * y, m * x * y))


def ccc_from_moments(moments, eps=CCC_EPS):
  """Concordance correlation coefficient from `ccc_moments` (population statistics).

  2·cov / (var_x + var_y + (μx - μy)² + eps); eps keeps constant inputs finite. Returns 0 for n = 0.
  """
  n, sx, sy, sxx, syy, sxy = moments
  n_safe = jnp.maximum(n, 1.0)
  mx, my = sx / n_safe, sy / n_safe
  # E[x²] - E[x]² can round below 0 for (near-)constant inputs; a variance is never negative.
  var_x = jnp.maximum(sxx / n_safe - mx * mx, 0.0)
  var_y = jnp.maximum(syy / n_safe - my * my, 0.0)
  cov = sxy / n_safe - mx * my
  return 2.0 * cov / (var_x + var_y + jnp.square(mx - my) + eps)


def va5_targets(va):
  """The 5-vector regression target of the temporal statistical model; va float [B,2] (v, a).

  Returns [B,5]: arousal, valence, m = (a + v) / 2, a - m, v - m.
  """
  v, a = va[..., 0], va[..., 1]
  m = 0.5 * (a + v)
  return jnp.stack([a, v, m, a - m, v - m], axis=-1)


def default_loss_config() -> ml_collections.ConfigDict:
  """Loss knobs; see `multitask_loss` for how each published system is expressed."""
  return ml_collections.ConfigDict({
      'expr': 'ce',  # 'ce' | 'focal'
      'focal_gamma': 2.0,
      'focal_alpha': None,  # None or one factor per class
      # None, one weight per class (CE only), or 'balanced': n / (C * n_c) over the training
      # frames' EXPR labels (scikit-learn's 'balanced'; resolved by the trainer)
      'expr_class_weights': None,
      'label_smoothing': 0.0,
      'au': 'bce',  # 'bce' | 'mse' (of the AU probability against the 0/1 label)
      # None, 12 positive-class weights, or 'neg_pos_ratio': per AU, negatives / positives
      # among the training frames (the usual BCEWithLogitsLoss pos_weight; resolved by the trainer)
      'au_pos_weight': None,
      'va': 'ccc',  # 'ccc' | 'mse' | 'ccc+mse'
      'va_column_weights': (1.0, 1.0),  # (valence, arousal) factors on each VA term
      'weights': ml_collections.ConfigDict({'expr': 1.0, 'au': 1.0, 'va': 1.0, 'va5': 0.0}),
  })


def _mean(stat):
  """Mean from a (sum, count) pair; 0 when count is 0."""
  total, count = stat
  return total / jnp.maximum(count, 1.0)


def _local_stats(outputs, batch, cfg):
  """Per-device sums, counts and CCC moments of every task present in outputs (a flat dict)."""
  valid = jnp.asarray(batch['valid'], bool)
  stats = {}
  if 'expr' in outputs:
    mask = labels.has_label('expr', batch['expr']) & valid
    if cfg.expr == 'ce':
      pair = softmax_cross_entropy(outputs['expr'], batch['expr'], mask,
                                   cfg.expr_class_weights, cfg.label_smoothing)
    elif cfg.expr == 'focal':
      pair = focal_loss(outputs['expr'], batch['expr'], mask, cfg.focal_gamma, cfg.focal_alpha)
    else:
      raise ValueError(f'unknown expr loss {cfg.expr!r}')
    stats['expr'] = pair
    stats['expr_labels'] = jnp.sum(mask, dtype=jnp.float32)
  if 'au' in outputs:
    mask = labels.au_mask(batch['au']) & valid[:, None]
    if cfg.au == 'bce':
      stats['au'] = sigmoid_bce(outputs['au'], batch['au'], mask, cfg.au_pos_weight)
    elif cfg.au == 'mse':  # the probability against the 0/1 label (the naive MTL baseline)
      stats['au'] = squared_error(jax.nn.sigmoid(outputs['au'].astype(jnp.float32)),
                                  batch['au'], mask)
    else:
      raise ValueError(f'unknown au loss {cfg.au!r}')
  if 'va' in outputs or 'va5' in outputs:
    # A frame counts for VA only when both valence and arousal are annotated.
    mask = jnp.all(labels.va_mask(batch['va']), axis=-1) & valid
    stats['va_frames'] = jnp.sum(mask, dtype=jnp.float32)
    if 'va' in outputs:
      for col, key in enumerate(labels.VA_NAMES):
        pred, target = outputs['va'][:, col], batch['va'][:, col]
        stats[f'moments_{key}'] = ccc_moments(pred, target, mask)
        stats[f'se_{key}'] = squared_error(pred, target, mask)
    if 'va5' in outputs:
      target5 = va5_targets(jnp.where(mask[:, None], batch['va'], 0.0))
      stats['va5'] = squared_error(outputs['va5'], target5, mask[:, None])
  return stats


def multitask_loss(outputs: Mapping[str, Any], batch: Mapping[str, Any],
                   loss_config: ml_collections.ConfigDict, axis_name: Optional[str] = None):
  """Weighted sum of the per-task losses of the global batch; returns (total, aux).

  outputs: 'expr' [B,C] logits, 'au' [B,12] logits, 'va' [B,2] (valence, arousal), optional
  'va5' [B,5]; only the tasks present are computed. batch: 'expr' int [B] (-1 missing),
  'au' int [B,12] (-1 missing), 'va' float [B,2] (-5 missing), 'valid' bool [B] (padding false).
  With `axis_name`, sums, counts and CCC moments are psum'd, so every device returns the
  global-batch loss (see the module docstring for how to combine gradients).

    total = w.expr·L_expr + w.au·L_au
          + w.va·Σ_{c∈(v,a)} cw_c·[(1 - CCC_c) if 'ccc' in va] + [MSE_c if 'mse' in va]
          + w.va5·MSE(va5, va5_targets(va))

  with w = loss_config.weights and cw = loss_config.va_column_weights. Published systems:
    incomplete labels (ABAW2): expr='focal', focal_gamma=2, au='bce', weights expr=au=1
      (no VA head); the E/A/B phases come from the sampler, since a task without labels in
      a batch contributes zero.
    temporal statistical (ABAW 2020): expr='ce', va='ccc', weights expr=1.0, va=0.4, va5=0.2,
      i.e. 1.0 CE + 0.4(1-CCC_a) + 0.4(1-CCC_v) + 0.2 MSE5 (model with a 'va5' head).
    ABAW4 MTL: expr='ce', au='bce', va='mse', weights expr=c, au=d, va=1,
      va_column_weights=(a, b), i.e. a MSE(v) + b MSE(a) + c CE + d BCE.
    uni/multi-task study: expr_class_weights and au_pos_weight for the class-weighted losses.

  aux (global when axis_name is given): loss_<task> and count_<task> for expr, au, va, va5;
  ccc_valence, ccc_arousal, mse_valence, mse_arousal when 'va' is present; loss_total.
  """
  stats = _local_stats(outputs, batch, loss_config)
  if axis_name is not None:  # One all-reduce of a small vector carries every task's statistics.
    leaves, treedef = jax.tree.flatten(stats)
    stats = jax.tree.unflatten(treedef, list(jax.lax.psum(jnp.stack(leaves), axis_name)))
  weights = loss_config.weights
  aux, total = {}, jnp.zeros((), jnp.float32)
  if 'expr' in stats:
    aux['loss_expr'] = _mean(stats['expr'])
    aux['count_expr'] = stats['expr_labels']
    total += weights.expr * aux['loss_expr']
  if 'au' in stats:
    aux['loss_au'] = _mean(stats['au'])
    aux['count_au'] = stats['au'][1]
    total += weights.au * aux['loss_au']
  if 'va_frames' in stats:
    aux['count_va'] = stats['va_frames']
  if 'moments_valence' in stats:
    kinds = loss_config.va.split('+')
    if not set(kinds) <= {'ccc', 'mse'}:
      raise ValueError(f'unknown va loss {loss_config.va!r}')
    loss_va = jnp.zeros((), jnp.float32)
    for key, col_weight in zip(labels.VA_NAMES, loss_config.va_column_weights):
      aux[f'ccc_{key}'] = ccc_from_moments(stats[f'moments_{key}'])
      aux[f'mse_{key}'] = _mean(stats[f'se_{key}'])
      if 'ccc' in kinds:  # An empty VA batch has CCC 0; its 1 - CCC term must be 0, not 1.
        loss_va += col_weight * jnp.where(stats['va_frames'] > 0, 1.0 - aux[f'ccc_{key}'], 0.0)
      if 'mse' in kinds:
        loss_va += col_weight * aux[f'mse_{key}']
    aux['loss_va'] = loss_va
    total += weights.va * loss_va
  if 'va5' in stats:
    aux['loss_va5'] = _mean(stats['va5'])
    aux['count_va5'] = stats['va5'][1]
    total += weights.va5 * aux['loss_va5']
  aux['loss_total'] = total
  return total, aux


def balanced_class_weights(expr, num_classes: int) -> list:
  """n / (C * n_c) over the labelled entries of `expr` (int [...], -1 missing)."""
  expr = np.asarray(expr).reshape(-1)
  counts = np.bincount(expr[expr >= 0], minlength=num_classes)[:num_classes]
  if (counts == 0).any():
    raise ValueError(f'balanced EXPR class weights: classes {np.flatnonzero(counts == 0).tolist()} '
                     'have no training frame')
  return (counts.sum() / (num_classes * counts)).tolist()


def neg_pos_ratios(au) -> list:
  """Per AU, labelled negatives / labelled positives of `au` (int [N, 12], -1 missing)."""
  au = np.asarray(au)
  positives, negatives = (au == 1).sum(axis=0), (au == 0).sum(axis=0)
  if (positives == 0).any():
    raise ValueError(f'AU pos_weight neg_pos_ratio: AUs {np.flatnonzero(positives == 0).tolist()} '
                     'have no positive training frame')
  return (negatives / positives).tolist()


def resolve_label_weights(cfg: ml_collections.ConfigDict, expr, au, num_expr_classes: int
                          ) -> ml_collections.ConfigDict:
  """A copy of the loss config with 'balanced' / 'neg_pos_ratio' replaced by numbers computed
  from the training labels `expr` [N] and `au` [N, 12]."""
  cfg = cfg.copy_and_resolve_references()
  if isinstance(cfg.expr_class_weights, str):
    if cfg.expr_class_weights != 'balanced':
      raise ValueError(f"loss.expr_class_weights must be None, numbers or 'balanced', got "
                       f'{cfg.expr_class_weights!r}')
    with cfg.ignore_type():  # a str field becomes a list
      cfg.expr_class_weights = balanced_class_weights(expr, num_expr_classes)
  if isinstance(cfg.au_pos_weight, str):
    if cfg.au_pos_weight != 'neg_pos_ratio':
      raise ValueError(f"loss.au_pos_weight must be None, numbers or 'neg_pos_ratio', got "
                       f'{cfg.au_pos_weight!r}')
    with cfg.ignore_type():
      cfg.au_pos_weight = neg_pos_ratios(au)
  return cfg
