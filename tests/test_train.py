"""The pure train step: data-parallel equivalence, frozen heads in the alternating scheme, optax."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from affectjax import config as config_lib
from affectjax import optim, parallel, train
from affectjax.data import sampling
from affectjax.models import affect, preprocess

IMAGE = 16
BATCH = 16


def tiny_config(**overrides):
  c = config_lib.base_config()
  c.model.arch = 'resnet18'
  c.model.width = 4
  c.model.head_hidden = 8
  c.model.sync_bn = True
  c.input_preprocessing = dict(preprocess.UNIT)
  c.optim.learning_rate = 1e-2
  for k, v in overrides.items():
    node = c
    *path, leaf = k.split('.')
    for p in path:
      node = node[p]
    node[leaf] = v
  return c


def random_batch(seed: int, phase: int = sampling.PHASE_JOINT, n: int = BATCH):
  rng = np.random.default_rng(seed)
  expr = rng.integers(0, 7, n).astype(np.int32)
  expr[rng.random(n) < 0.3] = -1
  au = rng.integers(0, 2, (n, 12)).astype(np.int32)
  au[rng.random(n) < 0.3] = -1
  va = rng.uniform(-1, 1, (n, 2)).astype(np.float32)
  va[rng.random(n) < 0.3] = -5.0
  return {'image': rng.integers(0, 256, (n, IMAGE, IMAGE, 3), dtype=np.uint8), 'expr': expr,
          'au': au, 'va': va, 'valid': np.ones(n, bool),
          'phase': np.full(n, phase, np.int32), 'index': np.arange(n, dtype=np.int32)}


def make_state_and_step(config, num_devices, tasks=('expr', 'au', 'va')):
  config = config.copy_and_resolve_references()
  config.model.bn_axis_name = parallel.DATA_AXIS if config.model.sync_bn else None
  schedule = optim.learning_rate_schedule(config.optim, steps_per_epoch=10, num_epochs=1)
  model = affect.create_model(config.model, tasks, 7)
  state = train.create_train_state(model, optim.create_optimizer(config.optim, schedule),
                                   0, (IMAGE, IMAGE, 3))
  mesh = parallel.make_mesh(num_devices)
  step = parallel.data_parallel(
      functools.partial(train.train_step, config=config, lr_schedule=schedule,
                        model_inputs=train.image_inputs), mesh)
  return parallel.replicate(state, mesh), step, mesh


def run_steps(config, num_devices, batches, tasks=('expr', 'au', 'va')):
  state, step, mesh = make_state_and_step(config, num_devices, tasks)
  history = []
  for batch in batches:
    state, metrics = step(state, parallel.global_batch(batch, mesh))
    history.append(jax.device_get(metrics))
  return jax.device_get(state), history


def assert_trees_close(a, b, rtol, atol):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol,
                               err_msg=jax.tree_util.keystr(path))


def test_eight_devices_give_the_single_device_update():
  assert jax.device_count() == 8
  config = tiny_config()
  batches = [random_batch(s) for s in range(3)]
  state1, metrics1 = run_steps(config, 1, batches)
  state8, metrics8 = run_steps(config, 8, batches)
  for m1, m8 in zip(metrics1, metrics8):
    for k in ('loss', 'loss_expr', 'loss_au', 'loss_va', 'grad_norm', 'count_expr'):
      np.testing.assert_allclose(m8[k], m1[k], rtol=2e-5, atol=1e-6, err_msg=k)
  # The summation order differs across devices, and float32 rounding differs with it (and
  # with the CPU: Adam's m / (sqrt(v) + eps) amplifies it for gradients near eps, so single
  # elements differ by up to a few 1e-5 after three 1e-2 steps). So each parameter's total
  # update is compared as a vector: 8 devices must give the 1-device update to within 0.1 %
  # of its norm (measured: at most 6e-5, with Adam and with SGD + momentum).
  state0, _, _ = make_state_and_step(config, 1)
  params0 = jax.device_get(state0.params)
  for (path, p8), p1, p0 in zip(jax.tree_util.tree_leaves_with_path(state8.params),
                                jax.tree_util.tree_leaves(state1.params),
                                jax.tree_util.tree_leaves(params0)):
    p8, p1, p0 = (np.asarray(x, np.float64) for x in (p8, p1, p0))
    update = np.linalg.norm(p1 - p0)
    assert update > 0, jax.tree_util.keystr(path)
    assert np.linalg.norm(p8 - p1) <= 1e-3 * update, jax.tree_util.keystr(path)
  assert_trees_close(state8.batch_stats, state1.batch_stats, rtol=1e-4, atol=1e-6)
  # The update really moved the parameters (the comparison is not between two no-ops).
  moved = jax.tree_util.tree_map(lambda a, b: np.abs(np.asarray(a) - np.asarray(b)).max(),
                                 state1.params, jax.device_get(state0.params))
  assert max(jax.tree_util.tree_leaves(moved)) > 1e-4


def test_single_device_step_matches_a_plain_jax_gradient():
  """The shard_map step on 1 device equals optax applied to jax.grad of the loss."""
  from affectjax import losses
  config = tiny_config(**{'model.sync_bn': False, 'optim.optimizer': 'sgd',
                          'optim.momentum': 0.0, 'optim.schedule': 'constant'})
  batch = random_batch(7)
  state, step, mesh = make_state_and_step(config, 1)
  state = jax.device_get(state)
  new_state, _ = step(parallel.replicate(state, mesh), parallel.global_batch(batch, mesh))
  _, aug_rng = jax.random.split(state.rng)
  del aug_rng  # no augmentation configured

  def loss_fn(params):
    images = preprocess.normalize(jnp.asarray(batch['image']), config.input_preprocessing)
    outputs, _ = state.apply_fn({'params': params, 'batch_stats': state.batch_stats}, images,
                                train=True, mutable=['batch_stats'])
    return losses.multitask_loss(outputs, batch, config.loss)[0]

  grads = jax.grad(loss_fn)(state.params)
  expected = optax.apply_updates(state.params, jax.tree_util.tree_map(
      lambda g: -config.optim.learning_rate * g, grads))
  assert_trees_close(jax.device_get(new_state.params), expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize('phase,frozen,trained', [(sampling.PHASE_EXPR_ONLY, 'au', 'expr'),
                                                  (sampling.PHASE_AU_ONLY, 'expr', 'au')])
def test_alternating_phase_freezes_the_absent_head_and_its_optimizer_state(phase, frozen,
                                                                           trained):
  config = tiny_config(**{'optim.optimizer': 'adam'})
  tasks = ('expr', 'au')
  # A joint step first, so the frozen head has non-zero Adam moments that would move it.
  batches = [random_batch(0, sampling.PHASE_BOTH), random_batch(1, phase)]
  state, step, mesh = make_state_and_step(config, 2, tasks)
  state, _ = step(state, parallel.global_batch(batches[0], mesh))
  before = jax.device_get(state)
  state, _ = step(state, parallel.global_batch(batches[1], mesh))
  after = jax.device_get(state)
  assert_trees_close(after.params['head'][frozen], before.params['head'][frozen], 0, 0)
  mu_before = optax.tree_utils.tree_get(before.opt_state, 'mu')['head'][frozen]
  mu_after = optax.tree_utils.tree_get(after.opt_state, 'mu')['head'][frozen]
  assert_trees_close(mu_after, mu_before, 0, 0)
  delta = np.abs(after.params['head'][trained]['kernel'] -
                 before.params['head'][trained]['kernel']).max()
  assert delta > 0
  assert np.abs(after.params['head']['hidden']['kernel'] -
                before.params['head']['hidden']['kernel']).max() > 0


def test_non_finite_loss_leaves_the_state_unchanged():
  config = tiny_config()
  batch = random_batch(3)
  batch['image'][:] = 0
  state, step, mesh = make_state_and_step(config, 1)
  before = jax.device_get(state)
  config_bad = config.copy_and_resolve_references()
  # (0 - mean) / 0 = -inf: the forward pass is not finite.
  config_bad.input_preprocessing.std = (0.0, 0.0, 0.0)
  _, step_bad, _ = make_state_and_step(config_bad, 1)
  after, metrics = step_bad(state, parallel.global_batch(batch, mesh))
  after = jax.device_get(after)
  assert float(metrics['finite']) == 0.0
  assert_trees_close(after.params, before.params, 0, 0)
  assert_trees_close(after.opt_state, before.opt_state, 0, 0)
  assert_trees_close(after.batch_stats, before.batch_stats, 0, 0)
  assert int(after.step) == int(before.step)
  assert not np.array_equal(after.rng, before.rng)


def test_the_train_step_holds_no_conditional():
  """A GPU runs an HLO conditional by copying its predicate to the host and blocking the host
  until the device gets there: a step holding one keeps the host from queueing steps ahead.
  The non-finite skip is a select instead (checked above). (optim.plateau watching train_loss
  brings optax's conditionals back: BUILD.md.)"""
  config = tiny_config()
  state, step, mesh = make_state_and_step(config, 1)
  hlo = step.lower(state, parallel.global_batch(random_batch(3), mesh)).compile().as_text()
  assert ' conditional(' not in hlo


def test_step_metrics_are_one_vector_read_by_name():
  """The step's metrics leave it as one float32 vector (one output, one copy to the host per
  step), read by name on the device and after `jax.device_get`, the values those of the
  separate scalars they pack."""
  state, step, mesh = make_state_and_step(tiny_config(), 1)
  _, metrics = step(state, parallel.global_batch(random_batch(4), mesh))
  assert isinstance(metrics, train.StepMetrics)
  (vector,) = jax.tree_util.tree_leaves(metrics)
  assert vector.shape == (len(metrics),) and vector.dtype == jnp.float32
  assert {'loss', 'finite', 'grad_norm', 'learning_rate', 'count_expr'} <= set(metrics)
  assert list(metrics) == sorted(metrics) and 'nothing' not in metrics
  host = jax.device_get(metrics)
  assert isinstance(host, train.StepMetrics) and isinstance(host.vector, np.ndarray)
  for name in metrics:
    assert float(metrics[name]) == float(host[name]) == host.vector[host.names.index(name)]
  assert float(host['finite']) == 1.0 and float(host['count_expr']) == np.sum(
      random_batch(4)['expr'] >= 0)
  with pytest.raises(KeyError):
    host['nothing']  # pylint: disable=pointless-statement
  packed = train.StepMetrics.pack({'b': jnp.int32(3), 'a': jnp.float32(0.5), 'c': True})
  assert packed.names == ('a', 'b', 'c') and dict(jax.device_get(packed)) == {
      'a': 0.5, 'b': 3.0, 'c': 1.0}


def test_schedule_warmup_then_cosine_and_decay_mask():
  c = config_lib.base_config().optim
  c.learning_rate, c.warmup_epochs, c.end_lr_factor = 0.1, 1.0, 0.0
  schedule = optim.learning_rate_schedule(c, steps_per_epoch=10, num_epochs=3)
  assert float(schedule(0)) == 0.0
  np.testing.assert_allclose(float(schedule(5)), 0.05, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(10)), 0.1, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(20)), 0.05, rtol=1e-5)  # cosine midpoint
  np.testing.assert_allclose(float(schedule(30)), 0.0, atol=1e-7)
  params = {'conv': {'kernel': 1.0}, 'bn': {'scale': 1.0, 'bias': 0.0}, 'dense': {'bias': 0.0}}
  assert optim.decay_mask(params) == {'conv': {'kernel': True}, 'bn': {'scale': False,
                                      'bias': False}, 'dense': {'bias': False}}


def test_bfloat16_compute_keeps_float32_parameters_and_optimizer_state():
  config = tiny_config(**{'model.dtype': 'bfloat16', 'model.sync_bn': False})
  batches = [random_batch(s) for s in range(2)]
  state, history = run_steps(config, 2, batches)
  for leaf in jax.tree_util.tree_leaves((state.params, state.opt_state, state.batch_stats)):
    if np.issubdtype(np.asarray(leaf).dtype, np.floating):
      assert np.asarray(leaf).dtype == np.float32
  assert all(np.isfinite(m['loss']) and m['finite'] == 1.0 for m in history)
  # That bf16 and float32 compute agree on the first loss (same state and batch, the real
  # multi-task step) is the accelerator check's `bf16_vs_float32_loss`, which
  # tests/test_smoke_accelerator.py asserts.


def test_plateau_scales_the_update_after_patience_epochs_without_improvement():
  c = tiny_config(**{'optim.schedule': 'constant', 'optim.plateau.enabled': True,
                     'optim.plateau.patience': 1})
  tx = optim.create_optimizer(c.optim, optax.constant_schedule(0.1), steps_per_epoch=2)
  params = {'w': jnp.ones(3)}
  state = tx.init(params)
  grads = {'w': jnp.ones(3)}
  scales = []
  for value in (3.0, 3.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0):  # epochs: 3, 2, 2, 2 (mean loss)
    updates, state = tx.update(grads, state, params, value=jnp.asarray(value))
    scales.append(float(optim.plateau_scale(state)))
  # Epoch 2 improves; epochs 3 and 4 do not. As PyTorch's ReduceLROnPlateau(patience=1): one
  # bad epoch is tolerated, the second reduces the scale.
  assert scales == [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, pytest.approx(0.1)]
  # Adam on constant gradients steps by the learning rate; the plateau scales that step.
  np.testing.assert_allclose(updates['w'], -0.1 * 0.1 * np.ones(3), rtol=1e-5)


def test_plateau_on_the_validation_score_moves_only_at_evaluations():
  c = tiny_config(**{'optim.plateau.enabled': True, 'optim.plateau.patience': 1,
                     'optim.plateau.monitor': 'val_score'})
  tx = optim.create_optimizer(c.optim, optax.constant_schedule(0.1), steps_per_epoch=2)
  params, grads = {'w': jnp.ones(3)}, {'w': jnp.ones(3)}
  state, scales = tx.init(params), []
  for score in (0.3, 0.4, 0.4, 0.35, 0.2):  # evaluations: better, then three not better
    for loss in (5.0, 9.0, 1.0):  # the training loss does not move it
      updates, state = tx.update(grads, state, params, value=jnp.asarray(loss))
    state = optim.observe_plateau(c.optim, state, score)
    scales.append(float(optim.plateau_scale(state)))
  # As ReduceLROnPlateau(mode='max', patience=1): the second evaluation without improvement
  # reduces the scale; the third, after it, starts a new count.
  assert scales == [1.0, 1.0, 1.0, pytest.approx(0.1), pytest.approx(0.1)]
  updates, _ = tx.update(grads, state, params, value=jnp.asarray(0.0))
  np.testing.assert_allclose(updates['w'], -0.1 * 0.1 * np.ones(3), rtol=1e-5)
  c.optim.plateau.monitor = 'train_loss'  # observe_plateau leaves that rule to the steps
  assert optim.observe_plateau(c.optim, state, 0.0) is state
