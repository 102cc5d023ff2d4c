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
from affectjax.models import affect, layers, resnet

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


def test_max_pool_gives_a_window_holding_a_nan_gradient_at_its_first_nan():
  """As PyTorch: a window's maximum is NaN where it holds one, and the NaN takes the gradient
  (JAX's derived gradient spreads it over other positions)."""
  x = jnp.zeros((1, 5, 5, 1)).at[0, 1, 1, 0].set(jnp.nan).at[0, 4, 4, 0].set(5.0)
  y, pull = jax.vjp(lambda x: layers.max_pool_3x3_s2(x, PADS['torch']), x)
  y = np.asarray(y)[0, :, :, 0]  # 3 x 3; the NaN lies in the windows of outputs (0..1, 0..1)
  np.testing.assert_array_equal(np.isnan(y), [[1, 1, 0], [1, 1, 0], [0, 0, 0]])
  assert y[2, 2] == 5.0
  g = np.asarray(pull(jnp.ones((1, 3, 3, 1)))[0])[0, :, :, 0]
  want = np.zeros((5, 5))
  want[1, 1] = 4.0  # the four windows holding the NaN
  want[4, 4] = 1.0  # the 5.0's window
  want[0, 3] = want[1, 3] = want[3, 0] = want[3, 1] = 1.0  # the first zero of the four others
  np.testing.assert_array_equal(g, want)


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
  mask_bits: bool = False

  @nn.compact
  def __call__(self, x, residual=None):
    return layers.BatchNorm(use_running_average=not self.train, momentum=0.9, dtype=self.dtype,
                            axis_name=self.axis_name, hand_grads=self.hand_grads,
                            mask_bits=self.mask_bits, name='bn')(x, residual, self.relu)


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
  # x's and the residual's gradients are bf16 when they are: within a few of its roundings.
  # The parameters' are float32 sums either way.
  tol = 1e-5 if dtype == jnp.float32 else 0.02
  for hand in (True, False):
    got = _apply_and_grad(_NormAddRelu(relu, dtype, True, hand_grads=hand), variables, x, res,
                          dy)
    assert got[0].dtype == want[0].dtype
    np.testing.assert_array_equal(np.asarray(got[0], np.float32),
                                  np.asarray(want[0], np.float32))
    assert jax.tree.structure(got[1:]) == jax.tree.structure(want[1:])
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
      np.testing.assert_array_equal(a, b)
    (params, *inputs), (params0, *inputs0) = got[2], want[2]
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params0)):
      assert a.dtype == b.dtype == jnp.float32
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())
    for a, b in zip(jax.tree.leaves(inputs), jax.tree.leaves(inputs0)):
      assert a.dtype == b.dtype == dtype
      a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
      np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max())


@pytest.mark.parametrize('channels', [16, 6])
def test_relu_mask_is_kept_as_bits_and_read_back(channels):
  mask = np.random.default_rng(4).random((2, 3, 5, channels)) > 0.5
  packed = layers.pack_bits(jnp.asarray(mask))
  if channels % 8:  # kept as it is
    assert packed.dtype == jnp.bool_ and packed.shape == mask.shape
  else:  # NumPy's little-endian bit order along the channels
    assert packed.dtype == jnp.uint8 and packed.shape == (2, 3, 5, channels // 8)
    np.testing.assert_array_equal(packed, np.packbits(mask, axis=-1, bitorder='little'))
  np.testing.assert_array_equal(layers.unpack_bits(packed, channels), mask)
  # What the written-out backward keeps of a ReLU: the bits, with the right gradient.
  x = jnp.asarray(np.random.default_rng(5).normal(size=mask.shape), jnp.float32)
  ones, zeros = jnp.ones(channels), jnp.zeros(channels)
  _, kept = layers._batch_norm_fwd(x, ones, zeros, None, 1e-5, None, jnp.float32, True, True)
  assert kept[-1].dtype == packed.dtype and kept[-1].shape == packed.shape
  dx = jax.grad(lambda x: jnp.sum(layers.batch_norm(x, ones, zeros, None, 1e-5, None,
                                                    jnp.float32, True, True) * x))(x)
  want = jax.grad(lambda x: jnp.sum(nn.relu(nn.BatchNorm(use_running_average=False).apply(
      {'params': {'scale': ones, 'bias': zeros}, 'batch_stats': {
          'mean': zeros, 'var': ones}}, x, mutable=['batch_stats'])[0]) * x))(x)
  np.testing.assert_allclose(dx, want, rtol=1e-5, atol=1e-5)


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


@pytest.mark.parametrize('check_vma', [True, False])
@pytest.mark.parametrize('layout', ['replicated x', 'replicated residual', 'varying bias',
                                    'varying parameters'])
def test_batch_norm_gradients_under_shard_map_layouts(layout, check_vma):
  """`batch_norm` in any mix of replicated and per-device inputs under shard_map, synchronised
  and not, the ReLU masks in bytes and in bits: the gradient JAX derives for the same
  computation (`hand_grads=False`)."""
  rng = np.random.default_rng(8)
  c, n = 8, 8
  split = {'replicated x': (False, True, False, False),
           'replicated residual': (True, False, False, False),
           'varying bias': (True, True, False, True),
           'varying parameters': (True, True, True, True)}[layout]  # x, residual, scale, bias
  # A per-device array holds n shards (P('data')), a replicated one the shape of one (P()).
  def array(per, shape, draw):
    return jnp.asarray(draw(size=(shape[0] * n, *shape[1:]) if per else shape), jnp.float32)
  activation = (2, 3, 3, c)
  arrays = [array(split[0], activation, lambda size: rng.normal(size=size) * 2 + 1),
            array(split[1], activation, rng.normal),
            array(split[2], (c,), lambda size: rng.uniform(0.5, 1.5, size)),
            array(split[3], (c,), rng.normal)]
  dy = array(split[0] or split[1], activation, rng.normal)
  mesh = Mesh(np.array(jax.devices()[:n]), ('data',))

  def grads(hand, axis_name, bits=False):
    module = _NormAddRelu(True, jnp.float32, True, axis_name=axis_name, hand_grads=hand,
                          mask_bits=bits)

    def step(x, res, scale, bias, dy):
      def loss(x, res, scale, bias):
        out, _ = module.apply({'params': {'bn': {'scale': scale, 'bias': bias}},
                               'batch_stats': {'bn': {'mean': jnp.zeros(c),
                                                      'var': jnp.ones(c)}}},
                              x, res, mutable=['batch_stats'])
        return jnp.sum(out * dy)
      return jax.grad(loss, argnums=(0, 1, 2, 3))(x, res, scale, bias)
    specs = tuple(P('data') if per else P() for per in split)
    dy_spec = P('data') if split[0] or split[1] else P()
    return jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(*specs, dy_spec), out_specs=specs,
                                 check_vma=check_vma))(*arrays, dy)

  for axis_name in (None, 'data'):
    if axis_name and not split[0]:
      continue  # (statistics averaged across devices that all hold the same x: not a use)
    want = grads(False, axis_name)
    for bits in (False, True):
      for a, b in zip(grads(True, axis_name, bits), want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())


def test_model_config_reaches_the_backbone():
  config = affect.default_model_config()
  assert affect.create_backbone(config).hand_grads
  assert not affect.create_backbone(config).mask_bits
  config.mask_bits = True
  assert affect.create_backbone(config).mask_bits
  config.hand_grads = False
  assert not affect.create_backbone(config).hand_grads


@pytest.mark.parametrize('depth,stem_pool,frozen,bits', [(18, 'torch', 0, True),
                                                         (18, 'torch', 2, True),
                                                         (18, 'torch', 0, False),
                                                         (50, 'ceil', 0, True)])
def test_resnet_training_with_written_gradients_matches_derived(depth, stem_pool, frozen, bits):
  """A whole ResNet's training step: outputs, new statistics and gradients with the written
  gradients (the ReLU masks kept in bits, and in bytes) against JAX's derived ones (with frozen
  parts too), and no select-and-scatter left in the program. (bf16: the layer tests above,
  against flax.)"""
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(size=(4, 33, 33, 3)), jnp.float32)
  model = resnet.resnet(depth, width=4, stem_pool=stem_pool, frozen_parts=frozen,
                        mask_bits=bits)
  variables = model.init(jax.random.key(0), x)

  def loss(out):
    return jnp.sum(jnp.sin(out))
  got, text = test_models.training_step(model, variables, x, loss)
  want, text0 = test_models.training_step(model.clone(hand_grads=False), variables, x, loss)
  test_models.assert_same_training(got, want, grad_atol=1e-4)
  assert ('select_and_scatter' in text0) == (frozen == 0) and 'select_and_scatter' not in text
  # Width 4: the 4-channel layers keep a byte an element, those of 8 and more channels bits.
  assert ('xui8>' in text) == bits and 'xui8>' not in text0


def test_sync_batchnorm_resnet_gradients_match_derived():
  """ResNet18 with BatchNorm synchronised over eight devices (`bn_axis_name`), under shard_map
  with its replication checks as the train step runs it: the gradients and new statistics
  with the written gradients against the derived ones."""
  x = jnp.asarray(np.random.default_rng(9).normal(size=(16, 32, 32, 3)), jnp.float32)
  model = resnet.resnet(18, width=4, bn_axis_name='data')
  variables = resnet.resnet(18, width=4).init(jax.random.key(0), x[:2])
  mesh = Mesh(np.array(jax.devices()[:8]), ('data',))

  def run(m):
    def step(variables, x):
      def loss(params):
        out, new = m.apply(dict(variables, params=params), x, train=True,
                           mutable=['batch_stats'])
        return jax.lax.psum(jnp.sum(jnp.sin(out)), 'data'), new['batch_stats']
      grads, stats = jax.grad(loss, has_aux=True)(variables['params'])
      return jax.lax.pmean(grads, 'data'), stats
    return jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P('data')),
                                 out_specs=(P(), P())))(variables, x)

  (grads, stats), (grads0, stats0) = run(model), run(model.clone(hand_grads=False))
  assert jax.tree.structure(grads) == jax.tree.structure(grads0)
  for a, b in zip(jax.tree.leaves((grads, stats)), jax.tree.leaves((grads0, stats0))):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * np.abs(b).max() + 1e-12)
