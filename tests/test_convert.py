"""Weight conversion: PyTorch / VGGFace2-pickle ResNets reproduce their outputs in Flax."""
import hashlib
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from affectjax import convert, weights
from affectjax.models import affect, preprocess
import torch_resnet  # tests/ is on sys.path (pytest rootdir-relative import)

torch.set_num_threads(1)


def _reference(depth, stride_on, stem_pool, width=8, seed=0):
  torch.manual_seed(seed)
  net = torch_resnet.TorchResNet(depth, width, stride_on, stem_pool, num_classes=11)
  torch_resnet.randomize_batchnorm(net, seed)
  return net.eval()


def _features(variables, meta, images_nhwc):
  """Backbone features of converted weights, the model built from the metadata."""
  config = affect.default_model_config()
  config.update({k: meta[k] for k in weights.ARCH_FIELDS})
  backbone = affect.create_backbone(config)
  v = {'params': variables['params']['backbone'],
       'batch_stats': variables['batch_stats']['backbone']}
  return np.asarray(jax.jit(backbone.apply)(v, jnp.asarray(images_nhwc)))


def _assert_same_outputs(net, variables, meta, size=64):
  images = np.random.default_rng(1).normal(size=(3, size, size, 3)).astype(np.float32)
  with torch.no_grad():
    want = net(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
  got = _features(variables, meta, images)
  rel = np.linalg.norm(got - want) / np.linalg.norm(want)
  assert rel < 1e-4, rel
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_torchvision_v15_basic_block_state_dict_round_trip(tmp_path, capsys):
  net = _reference(18, '3x3', 'torch')
  # A DataParallel-style checkpoint: nested under 'state_dict' with 'module.' prefixes.
  state = {'module.' + k: v for k, v in net.state_dict().items()}
  torch.save({'state_dict': state, 'epoch': 3}, tmp_path / 'r18.pth')
  out = tmp_path / 'converted'
  assert convert.main(['--source', str(tmp_path / 'r18.pth'), '--out', str(out)]) == 0
  assert 'missing keys (0)' in capsys.readouterr().out
  variables, meta = weights.load_converted(str(out))
  assert (meta['arch'], meta['width'], meta['stride_on'], meta['stem_pool']) == (
      'resnet18', 8, '3x3', 'torch')
  assert meta['preprocessing']['channel_order'] == 'RGB'
  np.testing.assert_allclose(meta['preprocessing']['mean'], preprocess.IMAGENET['mean'])
  assert sorted(meta['report']['dropped']) == sorted(
      [k for k in net.state_dict() if k.startswith('fc') or 'num_batches' in k])
  assert set(variables) == {'params', 'batch_stats'}
  _assert_same_outputs(net, variables, meta)


def _numpy_state(net):
  return {k: v.numpy() for k, v in net.state_dict().items() if 'num_batches' not in k}


def test_vggface2_pickle_v1_bottleneck_round_trip(tmp_path):
  net = _reference(50, '1x1', 'ceil')
  path = tmp_path / 'resnet50_ft_weight.pkl'
  with open(path, 'wb') as f:  # protocol 2, as the Python 2 era original
    pickle.dump(_numpy_state(net), f, protocol=2)
  meta = convert.convert(str(path), str(tmp_path / 'out'), strict=True)
  variables, loaded_meta = weights.load_converted(str(tmp_path / 'out'))
  assert loaded_meta == meta
  assert (meta['arch'], meta['stride_on'], meta['stem_pool']) == ('resnet50', '1x1', 'ceil')
  assert meta['preprocessing'] == {'channel_order': 'BGR', 'mean': [91.4953, 103.8827, 131.0912],
                                   'std': [1.0, 1.0, 1.0]}
  assert meta['source']['sha256'] == hashlib.sha256(path.read_bytes()).hexdigest()
  assert meta['report']['dropped'] == ['fc.bias', 'fc.weight']
  # 66x66 input: the stem gives 33x33, where ceil-mode and padded pooling differ in size.
  _assert_same_outputs(net, variables, meta, size=66)
  # The same weights in a v1.5 network compute something else.
  wrong = dict(meta, stride_on='3x3', stem_pool='torch')
  images = np.ones((1, 66, 66, 3), np.float32)
  assert not np.allclose(_features(variables, wrong, images), _features(variables, meta, images))


@pytest.mark.parametrize('protocol', [2, 4, 5])
def test_numpy_pickles_of_every_protocol_load(tmp_path, protocol):
  state = {'conv1.weight': np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2),
           'bn1.running_var': np.ones(2, np.float64), 'n': np.int64(3)}
  with open(tmp_path / 'w.pkl', 'wb') as f:
    pickle.dump(state, f, protocol=protocol)
  loaded = weights.load_numpy_pickle(str(tmp_path / 'w.pkl'))
  assert loaded.keys() == state.keys()
  for k in state:
    np.testing.assert_array_equal(loaded[k], state[k])
    assert loaded[k].dtype == np.asarray(state[k]).dtype


class _RunsCode:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f'touch {self.marker}',))


@pytest.mark.parametrize('payload', ['top_level', 'inside_dict'])
def test_malicious_pickle_is_rejected_without_running_code(tmp_path, capsys, payload):
  marker = tmp_path / 'pwned'
  evil = _RunsCode(marker)
  obj = evil if payload == 'top_level' else {'conv1.weight': np.zeros(3), 'x': evil}
  path = tmp_path / 'resnet50_ft_weight.pkl'
  path.write_bytes(pickle.dumps(obj))
  with pytest.raises(weights.UnsafePickleError, match=r'posix\.system|os\.system') as err:
    weights.load_numpy_pickle(str(path))
  assert str(path) in str(err.value)
  assert convert.main(['--source', str(path), '--out', str(tmp_path / 'out')]) == 1
  assert 'refusing to load global' in capsys.readouterr().err
  assert not marker.exists()
  assert not (tmp_path / 'out').exists()


def test_builtins_and_codecs_tricks_are_rejected(tmp_path):
  for payload in (b"cbuiltins\neval\n(S'1+1'\ntR.", b"c_codecs\nencode\n(S'x'\nS'rot13'\ntR."):
    (tmp_path / 'p.pkl').write_bytes(payload)
    with pytest.raises(weights.UnsafePickleError):
      weights.load_numpy_pickle(str(tmp_path / 'p.pkl'))


def test_missing_and_unexpected_keys_are_reported_and_strict_fails(tmp_path, capsys):
  state = _numpy_state(_reference(18, '3x3', 'torch', width=4))
  del state['layer1.0.bn1.running_var'], state['layer2.0.conv1.weight']
  state['layer9.0.conv1.weight'] = np.zeros((1, 1, 1, 1), np.float32)
  path = tmp_path / 'partial.pkl'
  with open(path, 'wb') as f:
    pickle.dump(state, f)
  args = ['--source', str(path), '--out', str(tmp_path / 'out'), '--stride-on', '3x3',
          '--stem-pool', 'torch', '--preprocessing', 'imagenet']
  assert convert.main(args + ['--strict']) == 1
  err = capsys.readouterr().err
  assert 'layer1_0/bn1/var' in err and 'layer9.0.conv1.weight' in err
  assert convert.main(args) == 0
  printed = capsys.readouterr().out
  assert 'missing keys (2)' in printed and 'unexpected keys (1)' in printed
  variables, meta = weights.load_converted(str(tmp_path / 'out'))
  assert sorted(meta['report']['missing']) == ['batch_stats/layer1_0/bn1/var',
                                               'params/layer2_0/conv1/kernel']
  assert meta['report']['unexpected'] == ['layer9.0.conv1.weight']
  # Missing entries keep their initial values: unit variances, a fresh He-normal kernel.
  np.testing.assert_array_equal(variables['batch_stats']['backbone']['layer1_0']['bn1']['var'],
                                np.ones(4))
  kernel = variables['params']['backbone']['layer2_0']['conv1']['kernel']
  assert kernel.shape == (3, 3, 4, 8) and 0 < kernel.std() < 1


def test_shape_mismatch_and_architecture_inference():
  state = _numpy_state(_reference(18, '3x3', 'torch', width=4))
  assert weights.infer_architecture(state) == (18, 4)
  with pytest.raises(ValueError, match='does not fit'):
    convert.convert_state_dict(state, arch='resnet50')
  for depth in (34, 50, 101):
    names = _reference(depth, '3x3', 'torch', width=2).state_dict()
    assert weights.infer_architecture(names) == (depth, 2)
  with pytest.raises(ValueError, match='stage sizes'):
    weights.infer_architecture({'conv1.weight': np.zeros((4, 3, 7, 7)),
                                'layer1.0.conv1.weight': np.zeros(1)})


def test_flax_paths_of_torchvision_names():
  assert weights.flax_path('conv1.weight') == ('params', 'conv1', 'kernel')
  assert weights.flax_path('bn1.running_mean') == ('batch_stats', 'bn1', 'mean')
  assert weights.flax_path('layer3.5.bn2.weight') == ('params', 'layer3_5', 'bn2', 'scale')
  assert weights.flax_path('layer1.0.downsample.0.weight') == (
      'params', 'layer1_0', 'downsample_conv', 'kernel')
  assert weights.flax_path('layer1.0.downsample.1.running_var') == (
      'batch_stats', 'layer1_0', 'downsample_bn', 'var')
  assert weights.flax_path('fc.weight') is None
  assert weights.flax_path('layer1.0.bn1.num_batches_tracked') is None


def test_model_config_check_against_weights():
  meta = {'arch': 'resnet50', 'width': 64, 'stride_on': '1x1', 'stem_pool': 'ceil'}
  config = affect.default_model_config()
  with pytest.raises(ValueError, match='stride_on'):
    weights.check_model_config(config, meta)
  config.update(stride_on='1x1', stem_pool='ceil')
  weights.check_model_config(config, meta)
