"""Tests for affectjax.losses against PyTorch, NumPy formulas and single-device gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from affectjax import losses

C = 7
NUM_AUS = 12


def _logits(rng, *shape, scale=3.0):
  return (scale * rng.standard_normal(shape)).astype(np.float32)


def _np_log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_ccc(x, y):
  """CCC from its definition in methods.md, population statistics, float64."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  cov = np.mean((x - x.mean()) * (y - y.mean()))
  return 2 * cov / (x.var() + y.var() + (x.mean() - y.mean()) ** 2)


def _mean(pair):
  total, count = pair
  return float(total) / max(float(count), 1.0)


def _random_batch(rng, b, num_classes=C, p_missing=0.3):
  """A batch with random missing labels and a few padding rows (labels are sentinels there)."""
  expr = rng.integers(0, num_classes, b).astype(np.int32)
  expr[rng.random(b) < p_missing] = -1
  au = rng.integers(0, 2, (b, NUM_AUS)).astype(np.int32)
  au[rng.random(b) < p_missing] = -1
  au[rng.random((b, NUM_AUS)) < 0.1] = -1
  va = rng.uniform(-1, 1, (b, 2)).astype(np.float32)
  va[rng.random(b) < p_missing] = -5.0
  valid = rng.random(b) > 0.1
  expr[~valid], au[~valid], va[~valid] = -1, -1, -5.0
  return {'expr': expr, 'au': au, 'va': va, 'valid': valid}


def _expr_case(seed, n=50):
  """Random EXPR logits, a batch, and its EXPR mask (labelled and valid rows)."""
  rng = np.random.default_rng(seed)
  logits, batch = _logits(rng, n, C), _random_batch(rng, n)
  return rng, logits, batch, (batch['expr'] >= 0) & batch['valid']


def test_masked_sum_ignores_masked_inf_and_weights():
  values = np.array([1.0, np.inf, 3.0, np.nan], np.float32)
  total, count = losses.masked_sum(values, np.array([True, False, True, False]))
  assert (float(total), float(count)) == (4.0, 2.0)
  total, count = losses.masked_sum(values, np.array([0.5, 0.0, 2.0, 0.0], np.float32))
  assert (float(total), float(count)) == (6.5, 2.5)


@pytest.mark.parametrize('use_weights,smoothing', [(False, 0.0), (True, 0.0), (False, 0.2)])
def test_cross_entropy_matches_torch(use_weights, smoothing):
  rng, logits, batch, mask = _expr_case(0)
  weights = rng.uniform(0.2, 3.0, C).astype(np.float32) if use_weights else None
  ours = _mean(losses.softmax_cross_entropy(logits, batch['expr'], mask, weights, smoothing))
  ref = torch.nn.CrossEntropyLoss(
      weight=None if weights is None else torch.tensor(weights), label_smoothing=smoothing)(
          torch.tensor(logits[mask]), torch.tensor(batch['expr'][mask]).long())
  np.testing.assert_allclose(ours, ref.item(), rtol=1e-5)


def test_cross_entropy_weighted_smoothed_is_weighted_mean_of_smoothed_ce():
  rng, logits, batch, mask = _expr_case(1)
  weights, eps = rng.uniform(0.2, 3.0, C), 0.1
  y = batch['expr'][mask]
  target = (1 - eps) * np.eye(C)[y] + eps / C
  ce = -(target * _np_log_softmax(logits[mask])).sum(-1)
  ref = (weights[y] * ce).sum() / weights[y].sum()
  ours = _mean(losses.softmax_cross_entropy(logits, batch['expr'], mask, weights, eps))
  np.testing.assert_allclose(ours, ref, rtol=1e-5)


def test_focal_gamma_zero_is_exactly_cross_entropy():
  _, logits, batch, mask = _expr_case(2)
  focal = losses.focal_loss(logits, batch['expr'], mask, gamma=0.0)
  ce = losses.softmax_cross_entropy(logits, batch['expr'], mask)
  np.testing.assert_array_equal(np.array(focal), np.array(ce))


def test_focal_with_alpha_matches_numpy():
  rng, logits, batch, mask = _expr_case(3)
  alpha, gamma = rng.uniform(0.1, 1.0, C), 2.0
  y = batch['expr'][mask]
  logp = _np_log_softmax(logits[mask])[np.arange(len(y)), y]
  ref = np.mean(-alpha[y] * (1 - np.exp(logp)) ** gamma * logp)
  ours = _mean(losses.focal_loss(logits, batch['expr'], mask, gamma, alpha))
  np.testing.assert_allclose(ours, ref, rtol=1e-5)


@pytest.mark.parametrize('use_pos_weight', [False, True])
def test_bce_matches_torch_including_extreme_logits(use_pos_weight):
  rng = np.random.default_rng(4)
  logits, batch = _logits(rng, 32, NUM_AUS), _random_batch(rng, 32)
  logits[:3] = 100.0 * np.sign(logits[:3])  # saturated logits must stay finite
  pos_weight = rng.uniform(0.5, 5.0, NUM_AUS).astype(np.float32) if use_pos_weight else None
  mask = (batch['au'] >= 0) & batch['valid'][:, None]
  ours = _mean(losses.sigmoid_bce(logits, batch['au'], mask, pos_weight))
  per_elem = torch.nn.BCEWithLogitsLoss(
      reduction='none', pos_weight=None if pos_weight is None else torch.tensor(pos_weight))(
          torch.tensor(logits), torch.tensor(np.maximum(batch['au'], 0)).float()).numpy()
  np.testing.assert_allclose(ours, per_elem[mask].mean(), rtol=1e-5)


def test_ccc_from_moments_matches_numpy_and_handles_constants():
  rng = np.random.default_rng(5)
  x, y = rng.uniform(-1, 1, 64).astype(np.float32), rng.uniform(-1, 1, 64).astype(np.float32)
  y = 0.6 * x + 0.4 * y
  mask = rng.random(64) > 0.3
  got = float(losses.ccc_from_moments(losses.ccc_moments(x, y, mask)))
  np.testing.assert_allclose(got, _np_ccc(x[mask], y[mask]), rtol=1e-4)
  # Constant prediction: CCC is 0 (cov 0) and its gradient is finite.
  const = np.full(64, 0.3, np.float32)
  value, grad = jax.jit(jax.value_and_grad(
      lambda p: losses.ccc_from_moments(losses.ccc_moments(p, y, mask))))(const)
  assert abs(float(value)) < 1e-6 and np.all(np.isfinite(grad))


def test_va5_targets():
  va = np.array([[0.2, -0.6]], np.float32)  # (valence, arousal)
  np.testing.assert_allclose(np.array(losses.va5_targets(va)),
                             [[-0.6, 0.2, -0.2, -0.4, 0.4]], atol=1e-7)


def _config(**overrides):
  cfg = losses.default_loss_config()
  weights = overrides.pop('weights', {})
  cfg.update(overrides)
  cfg.weights.update(weights)
  return cfg


CONFIGS = {
    'ce_ccc_va5': dict(expr='ce', expr_class_weights=[0.5, 1, 2, 3, 1, 1, 0.7],
                       label_smoothing=0.1, au_pos_weight=[2.0] * NUM_AUS, va='ccc',
                       weights={'expr': 1.0, 'au': 0.5, 'va': 0.4, 'va5': 0.2}),
    'focal_mse': dict(expr='focal', focal_alpha=[0.25, 1, 1, 1, 0.5, 1, 1], va='mse',
                      va_column_weights=(0.7, 1.3), weights={'au': 2.0}),
    'ccc_plus_mse': dict(expr='ce', va='ccc+mse', weights={'va': 0.5, 'va5': 1.0}),
}


def _numpy_total(outputs, batch, cfg):
  """The multitask loss from the NumPy/PyTorch-checked formulas above, computed directly."""
  valid, w = batch['valid'], cfg.weights
  m = (batch['expr'] >= 0) & valid
  y, logp = batch['expr'][m], _np_log_softmax(outputs['expr'][m])
  logp_y = logp[np.arange(len(y)), y]
  if cfg.expr == 'ce':
    cw = np.ones(C) if cfg.expr_class_weights is None else np.array(cfg.expr_class_weights)
    ce = -(1 - cfg.label_smoothing) * logp_y - cfg.label_smoothing * logp.mean(-1)
    expr = (cw[y] * ce).sum() / max(cw[y].sum(), 1)
  else:
    alpha = np.array(cfg.focal_alpha)
    expr = np.sum(-alpha[y] * (1 - np.exp(logp_y)) ** cfg.focal_gamma * logp_y) / max(len(y), 1)
  total = w.expr * expr
  am = (batch['au'] >= 0) & valid[:, None]
  pw = 1.0 if cfg.au_pos_weight is None else np.array(cfg.au_pos_weight)
  t, x = batch['au'], outputs['au'].astype(np.float64)
  bce = pw * t * np.logaddexp(0, -x) + (1 - t) * np.logaddexp(0, x)
  if cfg.au == 'mse':  # of the probability against the 0/1 label
    bce = (1 / (1 + np.exp(-x)) - t) ** 2
  total += w.au * (bce[am].sum() / max(am.sum(), 1))
  vm = (batch['va'] > -5).all(-1) & valid
  pred, target = outputs['va'][vm].astype(np.float64), batch['va'][vm]
  for col, cw in enumerate(cfg.va_column_weights):
    if vm.any() and 'ccc' in cfg.va:
      total += w.va * cw * (1 - _np_ccc(pred[:, col], target[:, col]))
    if vm.any() and 'mse' in cfg.va:
      total += w.va * cw * np.mean((pred[:, col] - target[:, col]) ** 2)
  v, a = target[:, 0], target[:, 1]
  t5 = np.stack([a, v, (a + v) / 2, (a - v) / 2, (v - a) / 2], -1)
  if vm.any():
    total += w.va5 * np.mean((outputs['va5'][vm] - t5) ** 2)
  return total


def _linear_outputs(params, x):
  """A tiny linear multi-task model: features [B,D] -> the model's output dict."""
  h = x @ params['w'] + params['b']
  return {'expr': h[:, :C], 'au': h[:, C:C + NUM_AUS], 'va': jnp.tanh(h[:, C + 12:C + 14]),
          'va5': jnp.tanh(h[:, C + 14:])}


def _linear_problem(seed, b=64, d=5):
  rng = np.random.default_rng(seed)
  params = {'w': (0.5 * rng.standard_normal((d, C + NUM_AUS + 7))).astype(np.float32),
            'b': (0.1 * rng.standard_normal(C + NUM_AUS + 7)).astype(np.float32)}
  batch = _random_batch(rng, b)
  batch['x'] = rng.standard_normal((b, d)).astype(np.float32)
  return params, batch


def test_au_mse_of_the_probability_matches_numpy():
  """loss.au='mse' (method 3's naive multi-task model): (sigmoid(logit) - label)^2 averaged
  over the labelled (frame, AU) entries."""
  cfg = _config(expr='ce', au='mse', va='mse')
  params, batch = _linear_problem(8)
  outputs = _linear_outputs(params, batch['x'])
  total, aux = losses.multitask_loss(outputs, batch, cfg)
  np.testing.assert_allclose(float(total), _numpy_total(
      {k: np.asarray(v) for k, v in outputs.items()}, batch, cfg), rtol=2e-5)
  x, t = np.asarray(outputs['au'], np.float64), batch['au']
  m = (t >= 0) & batch['valid'][:, None]
  np.testing.assert_allclose(float(aux['loss_au']), np.mean(((1 / (1 + np.exp(-x)) - t) ** 2)[m]),
                             rtol=1e-5)


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_multitask_loss_matches_numpy_formula(name):
  cfg = _config(**CONFIGS[name])
  params, batch = _linear_problem(6)
  outputs = _linear_outputs(params, batch['x'])
  total, aux = jax.jit(lambda o, b: losses.multitask_loss(o, b, cfg))(outputs, batch)
  ref = _numpy_total({k: np.asarray(v) for k, v in outputs.items()}, batch, cfg)
  np.testing.assert_allclose(float(total), ref, rtol=2e-5)
  assert float(aux['count_expr']) == np.sum((batch['expr'] >= 0) & batch['valid'])
  assert float(aux['count_va']) == np.sum((batch['va'] > -5).all(-1) & batch['valid'])


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_batch_without_labels_contributes_zero_with_zero_gradient(name):
  cfg = _config(**CONFIGS[name])
  params, batch = _linear_problem(7, b=8)
  batch.update(expr=np.full(8, -1, np.int32), au=np.full((8, NUM_AUS), -1, np.int32),
               va=np.full((8, 2), -5.0, np.float32))
  batch['x'][:2] = 1e6  # garbage features (saturated outputs) on rows that carry no labels

  def loss(p):
    return losses.multitask_loss(_linear_outputs(p, batch['x']), batch, cfg)[0]

  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  assert float(value) == 0.0
  for g in jax.tree.leaves(grads):
    np.testing.assert_array_equal(np.asarray(g), 0.0)


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_shard_map_gradients_match_single_device(name):
  """8 devices: in-loss psum gives the global gradient; pmean keeps it, psum would scale by 8."""
  cfg = _config(**CONFIGS[name])
  params, batch = _linear_problem(8, b=64)
  # Shards of 8 rows: shard 1 has no EXPR labels, 2 no AU, 3 no VA, 4 only padding.
  batch['expr'][8:16] = -1
  batch['au'][16:24] = -1
  batch['va'][24:32] = -5.0
  batch['valid'][32:40] = False
  for key, missing in (('expr', -1), ('au', -1), ('va', -5.0)):
    batch[key][32:40] = missing

  def global_loss(p, b):
    return losses.multitask_loss(_linear_outputs(p, b['x']), b, cfg)

  (ref_loss, ref_aux), ref_grad = jax.jit(jax.value_and_grad(global_loss, has_aux=True))(
      params, batch)

  def per_device(p, b):
    (loss, aux), grad = jax.value_and_grad(
        lambda q: losses.multitask_loss(_linear_outputs(q, b['x']), b, cfg, axis_name='data'),
        has_aux=True)(p)
    combined = (grad, jax.lax.pmean(grad, 'data'), jax.lax.psum(grad, 'data'))
    return loss, aux, combined

  mesh = jax.make_mesh((8,), ('data',))
  sharded = jax.device_put(batch, NamedSharding(mesh, P('data')))
  replicated = jax.device_put(params, NamedSharding(mesh, P()))
  step = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P('data')),
                               out_specs=P()))
  loss, aux, (raw, pmeaned, psummed) = step(replicated, sharded)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
  for key in ref_aux:
    np.testing.assert_allclose(float(aux[key]), float(ref_aux[key]), rtol=1e-5, atol=1e-6)
  for got, scale in ((raw, 1.0), (pmeaned, 1.0), (psummed, 8.0)):
    jax.tree.map(lambda g, r, s=scale: np.testing.assert_allclose(g, s * r, rtol=1e-4, atol=1e-6),
                 got, ref_grad)

  # Without vma checking, psum transposes to psum: the per-device gradient is 8x the local part,
  # and pmean is again the combination that reproduces the single-device gradient.
  def per_device_unchecked(p, b):
    grad = jax.grad(lambda q: losses.multitask_loss(
        _linear_outputs(q, b['x']), b, cfg, axis_name='data')[0])(p)
    return jax.lax.pmean(grad, 'data')

  unchecked = jax.jit(jax.shard_map(per_device_unchecked, mesh=mesh, in_specs=(P(), P('data')),
                                    out_specs=P(), check_vma=False))(replicated, sharded)
  jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6),
               unchecked, ref_grad)
