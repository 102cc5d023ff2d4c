"""BatchNorm and the stem max-pool with written-out gradients (`models.layers`), against flax's
`nn.BatchNorm` and `nn.max_pool` differentiated by JAX: values, running statistics and
gradients, on one device and synchronised across eight."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

import test_models
from affectjax.models import layers, resnet

PADS = {'torch': ((1, 1), (1, 1)), 'ceil_odd': ((0, 0), (0, 0)), 'ceil_even': ((0, 1), (0, 1))}


def _ulp(dtype) -> float:
  return float(jnp.finfo(dtype).eps)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('pads,shape', [('torch', (2, 9, 11, 3)), ('torch', (2, 8, 8, 4)),
                                        ('ceil_odd', (2, 9, 7, 3)), ('ceil_even', (2, 10, 8, 3))])
def test_max_pool_matches_flax_values_and_gradient(dtype, pads, shape):
  """After a ReLU, many windows hold several zeros: the gradient goes to the first maximum,
  as in select-and-scatter."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(np.maximum(rng.normal(size=shape), 0), dtype)
  assert np.mean(np.asarray(x) == 0) > 0.3
  dy = jnp.asarray(rng.normal(size=(shape[0], (shape[1] + sum(PADS[pads][0]) - 3) // 2 + 1,
                                    (shape[2] + sum(PADS[pads][1]) - 3) // 2 + 1, shape[3])),
                   dtype)
  mine = functools.partial(layers.max_pool_3x3_s2, padding=PADS[pads])
  derived = functools.partial(layers.max_pool_3x3_s2, padding=PADS[pads], hand_grads=False)
  y, pull = jax.vjp(mine, x)
  y0, pull0 = jax.vjp(derived, x)
  assert y.dtype == y0.dtype == dtype and y.shape == dy.shape
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y0, np.float32))
  g, g0 = (np.asarray(p(dy)[0], np.float32) for p in (pull, pull0))
  assert np.count_nonzero(g0) > 0
  np.testing.assert_array_equal(g == 0, g0 == 0)  # the same positions receive the gradient
  # Up to four windows overlap: their sum may round differently in bf16.
  np.testing.assert_allclose(g, g0, rtol=2 * _ulp(dtype), atol=1e-7)


def _variables(module, x, seed):
  variables = module.init(jax.random.key(0), x)
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda a: jnp.asarray(rng.uniform(0.5, 1.5, a.shape), jnp.float32),
                        variables['params'])
  stats = jax.tree.map(lambda a: jnp.asarray(rng.uniform(0.5, 1.5, a.shape), jnp.float32),
                       variables['batch_stats'])
  return {'params': params, 'batch_stats': stats}


class _FlaxNormAddRelu(nn.Module):
  """The reference: flax's BatchNorm, then the residual add and the ReLU."""
  relu: bool
  dtype: object
  train: bool
  axis_name: object = None

  @nn.compact
  def __call__(self, x, residual=None):
    y = nn.BatchNorm(use_running_average=not self.train, momentum=0.9, dtype=self.dtype,
                     axis_name=self.axis_name, name='bn')(x)
    return layers.add_relu(y, residual, self.relu)


class _NormAddRelu(nn.Module):
  relu: bool
  dtype: object
  train: bool
  axis_name: object = None
  hand_grads: bool = True

  @nn.compact
  def __call__(self, x, residual=None):
    return layers.BatchNorm(use_running_average=not self.train, momentum=0.9, dtype=self.dtype,
                            axis_name=self.axis_name, hand_grads=self.hand_grads,
                            name='bn')(x, residual, self.relu)


def _apply_and_grad(module, variables, x, residual, dy):
  """(output, new batch_stats, gradients of sum(output * dy) in params, x and residual)."""
  def loss(params, x, residual):
    out, new = module.apply(dict(variables, params=params), x, residual,
                            mutable=['batch_stats'])
    return jnp.sum(out.astype(jnp.float32) * dy), (out, new['batch_stats'])
  grads, (out, stats) = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(
      variables['params'], x, residual)
  return out, stats, grads


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('residual,relu', [(False, False), (False, True), (True, True),
                                           (True, False)])
def test_batchnorm_matches_flax_in_training(dtype, residual, relu):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(4, 5, 6, 8)) * 3 + 1, dtype)
  res = jnp.asarray(rng.normal(size=x.shape), dtype) if residual else None
  dy = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  ref = _FlaxNormAddRelu(relu, dtype, train=True)
  variables = _variables(ref, x, seed=2)
  # The same variables as flax's, by name, shape and dtype.
  assert (jax.tree.map(lambda a: (a.shape, a.dtype), _NormAddRelu(relu, dtype, True).init(
      jax.random.key(0), x, res)) == jax.tree.map(lambda a: (a.shape, a.dtype), variables))
  want = _apply_and_grad(ref, variables, x, res, dy)
  tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=0.02, atol=0.02)
  for hand in (True, False):
    got = _apply_and_grad(_NormAddRelu(relu, dtype, True, hand_grads=hand), variables, x, res,
                          dy)
    assert got[0].dtype == want[0].dtype
    np.testing.assert_array_equal(np.asarray(got[0], np.float32),
                                  np.asarray(want[0], np.float32))
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
      np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(got[2]), jax.tree.leaves(want[2])):
      assert a.dtype == b.dtype
      a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
      np.testing.assert_allclose(a, b, rtol=tol['rtol'], atol=tol['atol'] * np.abs(b).max())


def test_batchnorm_with_running_statistics_matches_flax():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 3, 3, 8)), jnp.float32)
  res = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  ref = _FlaxNormAddRelu(True, jnp.float32, train=False)
  variables = _variables(ref, x, seed=4)
  np.testing.assert_array_equal(
      _NormAddRelu(True, jnp.float32, train=False).apply(variables, x, res),
      ref.apply(variables, x, res))


@pytest.mark.parametrize('check_vma', [True, False])
def test_sync_batchnorm_gradients_match_flax_and_one_device(check_vma):
  """BatchNorm synchronised over eight devices under shard_map, as the train step runs it:
  the gradients (parameters averaged across devices, as `train.py` does; inputs per shard)
  equal flax's under the same shard_map, and the gradient of the whole batch's loss on one
  device."""
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(16, 3, 3, 4)) * 2 + 1, jnp.float32)
  res = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  dy = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  mesh = Mesh(np.array(jax.devices()[:8]), ('data',))
  variables = _variables(_FlaxNormAddRelu(True, jnp.float32, True), x, seed=6)

  def sharded(module):
    def step(variables, x, res, dy):
      params, (gx, gres), stats = _grads(module, variables, x, res, dy)
      return jax.lax.pmean(params, 'data'), gx, gres, stats
    return jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P('data'), P('data'),
                                                            P('data')),
                                 out_specs=(P(), P('data'), P('data'), P()),
                                 check_vma=check_vma))(variables, x, res, dy)

  def _grads(module, variables, x, res, dy):
    def loss(params, x, res):
      out, new = module.apply(dict(variables, params=params), x, res, mutable=['batch_stats'])
      return jnp.sum(out * dy), new['batch_stats']
    (gp, gx, gres), stats = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(
        variables['params'], x, res)
    return gp, (gx, gres), stats

  want = sharded(_FlaxNormAddRelu(True, jnp.float32, True, axis_name='data'))
  got = sharded(_NormAddRelu(True, jnp.float32, True, axis_name='data'))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())
  one_params, (one_gx, one_gres), one_stats = _grads(
      _NormAddRelu(True, jnp.float32, True), variables, x, res, dy)
  np.testing.assert_allclose(got[1], one_gx, rtol=1e-4, atol=1e-5 * np.abs(one_gx).max())
  np.testing.assert_allclose(got[2], one_gres, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(got[3]), jax.tree.leaves(one_stats)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # Under check_vma the derived parameter gradient is the sum over the shards' losses; the
  # trainer's pmean leaves it so. Without it, it is this shard's: the mean over shards.
  scale = 1.0 if check_vma else 1.0 / 8
  for a, b in zip(jax.tree.leaves(got[0]), jax.tree.leaves(one_params)):
    np.testing.assert_allclose(a, np.asarray(b) * scale, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('depth,stem_pool', [(18, 'torch'), (50, 'ceil')])
def test_resnet_training_with_written_gradients_matches_derived(depth, stem_pool):
  """A whole ResNet's training step: outputs, new statistics and gradients with the written
  gradients against JAX's derived ones, and no select-and-scatter left in the program."""
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(size=(4, 33, 33, 3)), jnp.float32)
  model = resnet.resnet(depth, width=4, stem_pool=stem_pool)
  variables = model.init(jax.random.key(0), x)
  def loss(out):
    return jnp.sum(jnp.sin(out))
  got, text = test_models.training_step(model, variables, x, loss)
  want, text0 = test_models.training_step(model.clone(hand_grads=False), variables, x, loss)
  test_models.assert_same_training(got, want, grad_atol=1e-4)
  assert 'select_and_scatter' in text0 and 'select_and_scatter' not in text
