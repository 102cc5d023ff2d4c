"""ResNet backbones and multi-task heads: parameter counts, stride placement, pooling, outputs."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import Mesh, PartitionSpec as P

from affectjax import labels, losses
from affectjax.models import affect, heads, resnet

# torchvision's resnetN parameter counts minus the 1000-way fc (512 or 2048 inputs).
TORCHVISION_BACKBONE_PARAMS = {18: 11_689_512 - 513_000, 34: 21_797_672 - 513_000,
                               50: 25_557_032 - 2_049_000, 101: 44_549_160 - 2_049_000,
                               152: 60_192_808 - 2_049_000}


def _config(**overrides):
  config = affect.default_model_config()
  config.update(dict(arch='resnet18', width=4, head_hidden=16), **overrides)
  return config


def random_variables(model, x, seed=0):
  """Variables of `model` drawn with NumPy (fan-in scaled kernels, positive BN variances).

  Skips compiling `model.init`, whose threefry graph takes XLA's CPU compiler many seconds.
  """
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
  rng = np.random.default_rng(seed)

  def draw(path, s):
    name = jax.tree_util.keystr(path)
    if name.endswith("['kernel']"):
      return rng.normal(size=s.shape).astype(np.float32) / np.sqrt(np.prod(s.shape[:-1]))
    if name.endswith("['var']") or name.endswith("['scale']"):
      return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
    return rng.normal(scale=0.1, size=s.shape).astype(np.float32)
  return jax.tree_util.tree_map_with_path(draw, shapes)


def training_step(model, variables, x, loss) -> tuple:
  """((gradients of loss(outputs), (outputs, new batch_stats)), the jitted step's StableHLO)
  of `model` in training."""
  def step(params):
    out, new = model.apply(dict(variables, params=params), x, train=True,
                           mutable=['batch_stats'])
    return loss(out), (out, new['batch_stats'])
  fn = jax.jit(jax.grad(step, has_aux=True))
  return fn(variables['params']), fn.lower(variables['params']).as_text()


def assert_same_training(got, want, out_rtol=1e-5, grad_atol=1e-3):
  """Two `training_step` results agree: outputs, new statistics and gradients (atol relative
  to each gradient's largest entry)."""
  (grads, (out, stats)), (grads0, (out0, stats0)) = got, want
  np.testing.assert_allclose(out, out0, rtol=out_rtol, atol=out_rtol * np.abs(out0).max())
  assert jax.tree.structure(stats) == jax.tree.structure(stats0)
  for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(stats0)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert jax.tree.structure(grads) == jax.tree.structure(grads0)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads0)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=grad_atol * np.abs(b).max() + 1e-12)


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize('depth', sorted(TORCHVISION_BACKBONE_PARAMS))
def test_parameter_counts_match_torchvision(depth):
  model = resnet.resnet(depth)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  assert _count(shapes['params']) == TORCHVISION_BACKBONE_PARAMS[depth]
  # BatchNorm running statistics: a mean and a variance per BN channel (= 2 x BN params).
  bn_params = sum(int(np.prod(x.shape)) for path, x in
                  jax.tree_util.tree_leaves_with_path(shapes['params'])
                  if 'bn' in jax.tree_util.keystr(path))
  assert _count(shapes['batch_stats']) == bn_params


def test_partials_build_the_same_trees():
  x = jnp.zeros((1, 32, 32, 3))
  for depth, partial in ((18, resnet.ResNet18), (50, resnet.ResNet50)):
    a = jax.eval_shape(partial(width=8).init, jax.random.key(0), x)
    b = jax.eval_shape(resnet.resnet(depth, width=8).init, jax.random.key(0), x)
    assert jax.tree.map(lambda s: s.shape, a) == jax.tree.map(lambda s: s.shape, b)


def _intermediate_shapes(stride_on):
  # Unfolded, so the convolution submodules run in inference (their outputs are captured).
  model = resnet.resnet(50, width=8, stride_on=stride_on, fold_bn=False)
  x = jnp.zeros((1, 32, 32, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  _, state = jax.eval_shape(functools.partial(model.apply, capture_intermediates=True,
                                              mutable=['intermediates']), variables, x)
  return jax.tree.map(lambda s: s.shape, state['intermediates'])


def test_stride_sits_on_1x1_for_v1_and_on_3x3_for_v15():
  v1, v15 = _intermediate_shapes('1x1'), _intermediate_shapes('3x3')
  for stage, size in (('layer2_0', 4), ('layer3_0', 2), ('layer4_0', 1)):
    # Input to each stage is 2*size; v1 halves at conv1, v1.5 at conv2.
    assert v1[stage]['conv1']['__call__'][0][1:3] == (size, size)
    assert v15[stage]['conv1']['__call__'][0][1:3] == (2 * size, 2 * size)
    assert v1[stage]['conv2']['__call__'][0][1:3] == (size, size)
    assert v15[stage]['conv2']['__call__'][0][1:3] == (size, size)
    assert v1[stage]['__call__'][0] == v15[stage]['__call__'][0]


def _moved_statistics(variables, seed=0):
  """The variables with every BatchNorm's running statistics and affine parameters moved away
  from their initial values (mean 0, var 1, scale 1, bias 0 would hide a wrong fold)."""
  rng = np.random.default_rng(seed)
  moved = {'mean': lambda s: rng.normal(0, 0.5, s), 'var': lambda s: rng.uniform(0.3, 2.0, s),
           'scale': lambda s: rng.uniform(0.5, 1.5, s), 'bias': lambda s: rng.normal(0, 0.2, s)}
  def move(path, x):
    name = path[-1].key
    return jnp.asarray(moved[name](x.shape), x.dtype) if x.ndim == 1 and name in moved else x
  return jax.tree_util.tree_map_with_path(move, variables)


@pytest.mark.parametrize('depth,stride_on', [(18, '3x3'), (50, '1x1'), (50, '3x3')])
def test_inference_folds_each_batchnorm_into_its_convolution(depth, stride_on):
  """Folded inference (one convolution with a bias per layer) against convolution then
  BatchNorm from the same variables: float32 to rounding, bf16 within its precision."""
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 32, 32, 3)), jnp.float32)
  model = resnet.resnet(depth, width=8, stride_on=stride_on)
  variables = _moved_statistics(model.init(jax.random.key(0), x))
  plain = np.asarray(model.clone(fold_bn=False).apply(variables, x))
  assert np.abs(plain).mean() > 0.1  # the features are not vanishing
  np.testing.assert_allclose(np.asarray(model.apply(variables, x)), plain, rtol=1e-4,
                             atol=1e-4 * np.abs(plain).max())
  bf16 = model.clone(dtype=jnp.bfloat16)
  folded16 = np.asarray(bf16.apply(variables, x))
  plain16 = np.asarray(bf16.clone(fold_bn=False).apply(variables, x))
  for got in (folded16, plain16):  # both as far from float32 as bf16 rounding puts them
    assert np.linalg.norm(got - plain) / np.linalg.norm(plain) < 0.03
  # Training normalises with the batch's statistics: folding never applies there.
  train = functools.partial(model.apply, variables, x, train=True, mutable=['batch_stats'])
  np.testing.assert_array_equal(
      np.asarray(train()[0]),
      np.asarray(model.clone(fold_bn=False).apply(variables, x, train=True,
                                                   mutable=['batch_stats'])[0]))


@pytest.mark.parametrize('depth', [18, 50])
def test_kernel_layouts_start_equal_and_compute_the_same(depth):
  """OHWI kernels (the default) against HWIO (flax's nn.Conv): the same initial values
  transposed, the same outputs folded (inference) and in training, frozen parts included, and
  the same gradients and new statistics."""
  x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 32, 32, 3)), jnp.float32)
  ohwi = resnet.resnet(depth, width=4, frozen_parts=1)
  hwio = ohwi.clone(kernel_layout='HWIO')
  v_hwio = _moved_statistics(hwio.init(jax.random.key(0), x), seed=5)
  v_ohwi = _moved_statistics(ohwi.init(jax.random.key(0), x), seed=5)
  assert ohwi.kernel_layout == 'OHWI' and resnet.kernel_layout_of(v_ohwi) == 'OHWI'
  assert v_ohwi['params']['conv1']['kernel'].shape == (4, 7, 7, 3)
  assert jax.tree.structure(v_ohwi) == jax.tree.structure(v_hwio)
  for a, b in zip(jax.tree.leaves(v_ohwi), jax.tree.leaves(resnet.relayout(v_hwio, 'OHWI'))):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(ohwi.apply(v_ohwi, x), hwio.apply(v_hwio, x), rtol=1e-5,
                             atol=1e-6)

  def loss(out):
    return jnp.sum(out ** 2)
  (grads, aux), want = (training_step(ohwi, v_ohwi, x, loss)[0],
                        training_step(hwio, v_hwio, x, loss)[0])
  assert_same_training((grads, aux), (resnet.relayout(want[0], 'OHWI'), want[1]))
  assert grads['layer1_0']['conv2']['kernel'].shape == (4, 3, 3, 4)
  with pytest.raises(ValueError, match='kernel_layout must be one of OHWI, HWIO'):
    ohwi.clone(kernel_layout='OIHW').init(jax.random.key(0), x)


def test_training_folds_only_the_frozen_parts():
  """In training, a frozen part's BatchNorms use their running statistics and are folded; the
  outputs, the gradients and the new statistics equal the unfolded network's."""
  x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 32, 32, 3)), jnp.float32)
  model = resnet.resnet(18, width=8, frozen_parts=2)  # the stem and layer1
  variables = _moved_statistics(model.init(jax.random.key(0), x), seed=3)

  def loss(out):
    return jnp.sum(out ** 2)
  got = training_step(model, variables, x, loss)[0]
  assert_same_training(got, training_step(model.clone(fold_bn=False), variables, x, loss)[0],
                       out_rtol=1e-4)
  grads = got[0]
  # The frozen parts get no gradient; the parts after them do.
  assert not np.any(np.asarray(grads['layer1_0']['conv1']['kernel']))
  assert np.any(np.asarray(grads['layer2_0']['conv1']['kernel']))


@pytest.mark.parametrize('size', [5, 6, 7, 8, 9, 12, 27, 28])
def test_stem_pool_matches_torch_values_and_sizes(size):
  x = np.random.default_rng(size).normal(size=(2, size, size + 1, 3)).astype(np.float32)
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2))
  for mode, pool in (('ceil', torch.nn.MaxPool2d(3, 2, 0, ceil_mode=True)),
                     ('torch', torch.nn.MaxPool2d(3, 2, 1))):
    got = np.asarray(resnet.max_pool_3x3_s2(jnp.asarray(x), mode))
    want = pool(xt).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(got, want)
  ceil_out = resnet.max_pool_3x3_s2(jnp.asarray(x), 'ceil').shape[1:3]
  assert ceil_out == (-(-(size - 3) // 2) + 1, -(-(size - 2) // 2) + 1)


@pytest.mark.parametrize('tasks,va5,classes', [
    (('expr',), False, 7), (('au',), False, 7), (('va',), False, 7),
    (('expr', 'au'), False, 8), (('expr', 'au', 'va'), True, 8)])
def test_head_outputs_per_task_configuration(tasks, va5, classes):
  model = affect.create_model(_config(va5=va5, dtype='bfloat16', head_hidden=512), tasks,
                              num_expr_classes=classes)
  x = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
  variables = random_variables(model, x)
  out = jax.jit(model.apply)(variables, x)
  want = {'embedding': 512, 'expr': classes, 'au': labels.NUM_AUS, 'va': 2, 'va5': 5}
  keys = {'embedding', *tasks} | ({'va5'} if va5 else set())
  assert set(out) == keys
  for key in keys:
    assert out[key].shape == (3, want[key]) and out[key].dtype == jnp.float32, key
  for key in {'va', 'va5'} & keys:
    assert np.all(np.abs(np.asarray(out[key])) <= 1)
  assert set(variables['params']) == {'backbone', 'head'}
  assert set(variables['params']['head']) == {'hidden', *(keys - {'embedding'})}
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(shapes))


def test_bfloat16_computes_backbone_in_bf16_and_heads_in_f32():
  model = affect.create_model(_config(dtype='bfloat16'), ('expr',))
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  variables = random_variables(model, x)
  out, state = jax.jit(functools.partial(model.apply, capture_intermediates=True,
                                         mutable=['intermediates']))(variables, x)
  inter = state['intermediates']
  assert inter['backbone']['layer4_1']['__call__'][0].dtype == jnp.bfloat16  # a block's output
  assert inter['head']['hidden']['__call__'][0].dtype == jnp.float32
  assert out['expr'].dtype == jnp.float32
  # bf16 compute tracks the float32 model with the same parameters.
  ref = jax.jit(affect.create_model(_config(), ('expr',)).apply)(variables, x)
  np.testing.assert_allclose(out['expr'], ref['expr'], rtol=0.1, atol=0.1)


def test_heads_apply_dense_relu_dense_exactly():
  head = heads.MultiTaskHead(tasks=('expr', 'au', 'va'), num_expr_classes=7, hidden=8, va5=True)
  f = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
  variables = random_variables(head, f)
  out = head.apply(variables, jnp.asarray(f, jnp.bfloat16))
  p = jax.tree.map(np.asarray, variables['params'])
  f16 = np.asarray(jnp.asarray(f, jnp.bfloat16), np.float32)
  h = np.maximum(f16 @ p['hidden']['kernel'] + p['hidden']['bias'], 0)
  np.testing.assert_allclose(out['embedding'], h, rtol=1e-5, atol=1e-6)
  for key, act in (('expr', lambda z: z), ('au', lambda z: z), ('va', np.tanh),
                   ('va5', np.tanh)):
    want = act(h @ p[key]['kernel'] + p[key]['bias'])
    np.testing.assert_allclose(out[key], want, rtol=1e-5, atol=1e-6)


def test_head_dropout_acts_in_training_only():
  head = heads.MultiTaskHead(tasks=('au',), hidden=64, dropout=0.5)
  f = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
  variables = random_variables(head, f)
  evals = [head.apply(variables, f)['au'] for _ in range(2)]
  np.testing.assert_array_equal(*evals)
  train = head.apply(variables, f, train=True, rngs={'dropout': jax.random.key(0)})
  np.testing.assert_array_equal(train['embedding'], head.apply(variables, f)['embedding'])
  assert not np.allclose(train['au'], evals[0])
  # Inverted dropout is unbiased: averaged over many masks, training logits equal eval logits.
  keys = jax.random.split(jax.random.key(1), 4000)
  sample = lambda k: head.apply(variables, f, train=True, rngs={'dropout': k})['au']
  samples = jax.jit(jax.vmap(sample))(keys)
  err = np.abs(np.mean(samples, 0) - evals[0])
  assert np.all(err < 5 * np.std(samples, 0) / np.sqrt(len(keys)) + 1e-6)


def test_va5_targets_fit_the_tanh_range():
  """The losses' 5-vector (labels.VA5_NAMES order) stays in [-1, 1], the range of the va5 head."""
  corners = np.array([[1, 1], [1, -1], [-1, 1], [-1, -1], [0.2, -0.6]], np.float32)
  got = np.asarray(losses.va5_targets(jnp.asarray(corners)))
  v, a = corners[:, 0], corners[:, 1]
  np.testing.assert_allclose(got[:, :2], np.stack([a, v], -1))
  assert got.shape == (5, len(labels.VA5_NAMES)) and np.abs(got).max() == 1


def test_invalid_configs_raise():
  with pytest.raises(ValueError, match='arch'):
    affect.create_model(_config(arch='resnet19'))
  with pytest.raises(ValueError, match='va5'):
    jax.eval_shape(affect.create_model(_config(va5=True), ('expr',)).init,
                   jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(ValueError, match='stem_pool'):
    resnet.max_pool_3x3_s2(jnp.zeros((1, 8, 8, 1)), 'floor')


@pytest.mark.parametrize('block_cls,last_bn', [(resnet.BasicBlock, 'bn2'),
                                               (resnet.BottleneckBlock, 'bn3')])
def test_zero_init_last_bn_and_torch_like_init(block_cls, last_bn):
  # One stage of one block: the whole init graph compiles in about a second.
  model = resnet.ResNet(stage_sizes=(1,), block_cls=block_cls, width=32, zero_init_last_bn=True)
  init = jax.jit(model.init)
  params = init(jax.random.key(0, impl='rbg'), jnp.zeros((1, 16, 16, 3)))['params']
  assert not np.any(params['layer1_0'][last_bn]['scale'])
  assert np.all(params['layer1_0']['bn1']['scale'] == 1)
  # kaiming normal, fan_out: std sqrt(2 / (3*3*out)).
  kernel = np.asarray(params['layer1_0']['conv2']['kernel'])
  assert abs(kernel.std() / np.sqrt(2 / (9 * kernel.shape[-1])) - 1) < 0.1


def test_sync_batchnorm_uses_global_batch_statistics():
  """Training-mode BN under shard_map with bn_axis_name equals BN on the whole batch."""
  x = jax.random.normal(jax.random.key(2), (16, 16, 16, 3)) * 2 + 1
  model = affect.create_backbone(_config(bn_axis_name='data'))
  plain = affect.create_backbone(_config())
  variables = random_variables(plain, x)
  want, want_state = jax.jit(functools.partial(plain.apply, train=True, mutable=['batch_stats']))(
      variables, x)
  mesh = Mesh(np.array(jax.devices()[:8]), ('data',))

  def step(v, xs):
    out, state = model.apply(v, xs, train=True, mutable=['batch_stats'])
    return out, state

  sharded = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P('data')),
                                  out_specs=(P('data'), P()), check_vma=False))
  got, got_state = sharded(variables, x)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  for a, b in zip(jax.tree.leaves(got_state), jax.tree.leaves(want_state)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
