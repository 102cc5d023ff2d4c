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
  # Missing entries keep their initial values: unit variances, a fresh He-normal kernel (kept
  # output channel first, resnet.KERNEL_LAYOUTS).
  np.testing.assert_array_equal(variables['batch_stats']['backbone']['layer1_0']['bn1']['var'],
                                np.ones(4))
  kernel = variables['params']['backbone']['layer2_0']['conv1']['kernel']
  assert kernel.shape == (8, 3, 3, 4) and 0 < kernel.std() < 1


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


class _Module(torch.nn.Module):  # a whole pickled model, not a state dict
  def __init__(self):
    super().__init__()
    self.conv1 = torch.nn.Conv2d(3, 4, 7)


def _noise(size: int) -> bytes:
  """Fixed noise bytes: unseeded ones made the pickle case flaky (some byte strings make
  CPython print an unraisable SystemError while the unpickler fails)."""
  return np.random.default_rng(0).bytes(size)


_BAD_SOURCES = {
    'random.pth': (lambda p: p.write_bytes(_noise(2048)),
                   'not a file written by torch.save (torch.load cannot read it); expected a '
                   'torchvision ResNet state dict of tensors'),
    'random.pkl': (lambda p: p.write_bytes(b'\x80\x05' + _noise(2048)),
                   'not a pickle of NumPy arrays (it cannot be unpickled); expected a VGGFace2 '
                   'pickle'),
    'missing.pth': (lambda p: None, 'no such file; expected a torchvision ResNet state dict'),
    'empty.pth': (lambda p: p.write_bytes(b''), 'an empty file; expected a torchvision ResNet'),
    'unrelated.pth': (lambda p: torch.save({'foo': torch.zeros(3), 'bar': torch.ones(2)}, p),
                      'not a ResNet state dict: no conv1.weight among its 2 entries (bar, foo); '
                      'expected torchvision ResNet names (conv1.weight, bn1.weight'),
    'tensor.pth': (lambda p: torch.save(torch.zeros(3, 4), p),
                   'holds a Tensor, not a state dict; expected a dict of name -> array'),
    'nested.pth': (lambda p: torch.save({'conv1.weight': torch.zeros(1), 'meta': {'a': 1}}, p),
                   "entry 'meta' is a dict, not a numeric array; expected a dict of name -> "
                   'array'),
    'model.pth': (lambda p: torch.save(_Module(), p),
                  'holds the Python object test_convert._Module, not only tensors (objects are '
                  'not loaded: they could run code); expected a torchvision ResNet state dict'),
    'stem.pth': (lambda p: torch.save({'conv1.weight': torch.zeros(4)}, p),
                 'conv1.weight has shape (4,); expected a convolution kernel'),
}


@pytest.mark.parametrize('name', sorted(_BAD_SOURCES))
def test_a_file_that_is_no_weights_is_one_line_and_writes_nothing(name, tmp_path, capsys):
  make, expected = _BAD_SOURCES[name]
  source = tmp_path / name
  make(source)
  assert convert.main(['--source', str(source), '--out', str(tmp_path / 'out')]) == 1
  captured = capsys.readouterr()
  assert captured.err.startswith(f'error: {source}: {expected}'), captured.err
  assert captured.err.count('\n') == 1 and 'weights_only' not in captured.err
  assert sorted(os.listdir(tmp_path)) == ([name] if source.exists() else [])


def _tiny_variables():
  return {'params': {'backbone': {'conv1': {'kernel': np.ones((1, 1, 3, 2), np.float32)}}},
          'batch_stats': {'backbone': {}}}


def test_converted_weights_appear_whole_or_not_at_all(tmp_path, monkeypatch):
  out = tmp_path / 'weights' / 'r18'
  weights.save_converted(str(out), _tiny_variables(), {'arch': 'resnet18', 'run': 1})
  assert sorted(os.listdir(out)) == [weights.META_FILE, weights.VARIABLES_DIR]
  # A second conversion replaces the first one whole.
  weights.save_converted(str(out), _tiny_variables(), {'arch': 'resnet18', 'run': 2})
  assert weights.load_converted(str(out))[1]['run'] == 2
  assert os.listdir(tmp_path / 'weights') == ['r18']
  # A failure while writing leaves the earlier weights and no temporary folder.

  def fail(*args, **kwargs):
    raise OSError('disk full')

  monkeypatch.setattr(weights.json, 'dumps', fail)
  with pytest.raises(OSError, match='disk full'):
    weights.save_converted(str(out), _tiny_variables(), {'run': 3})
  with pytest.raises(OSError, match='disk full'):
    weights.save_converted(str(tmp_path / 'weights' / 'new'), _tiny_variables(), {'run': 3})
  assert os.listdir(tmp_path / 'weights') == ['r18']
  monkeypatch.undo()
  assert weights.load_converted(str(out))[1]['run'] == 2


def test_the_output_folder_must_be_new_empty_or_converted_weights(tmp_path, capsys):
  (tmp_path / 'results').mkdir()
  (tmp_path / 'results' / 'notes.txt').write_text('mine')
  (tmp_path / 'w.pkl').write_bytes(b'not read')
  args = ['--source', str(tmp_path / 'w.pkl'), '--out', str(tmp_path / 'results')]
  assert convert.main(args) == 1
  assert capsys.readouterr().err == (
      f'error: {tmp_path / "results"}: a folder of other files (notes.txt); expected a new '
      'folder, an empty one or earlier converted weights to replace\n')
  assert os.listdir(tmp_path / 'results') == ['notes.txt']
  (tmp_path / 'empty').mkdir()
  weights.save_converted(str(tmp_path / 'empty'), _tiny_variables(), {})
  assert sorted(os.listdir(tmp_path / 'empty')) == [weights.META_FILE, weights.VARIABLES_DIR]
