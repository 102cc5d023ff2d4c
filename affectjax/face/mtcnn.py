"""MTCNN's three nets (P-Net, R-Net, O-Net) in Flax, with the weights the MIT-licensed `mtcnn`
wheel (1.0.0, by Iván de Paz Centeno) ships, read without TensorFlow, joblib or arbitrary
pickle code.

The nets reproduce `mtcnn.network.{pnet,rnet,onet}` exactly, in float32: images are NHWC,
normalised as (x - 127.5) / 128 (the caller does it; no H/W transposition of the image), PReLU
with one slope per channel, TF 'SAME' max pooling (pads at the end, -inf), and before the first
Dense layer the Keras Permute((2, 1, 3)): the [B, h, w, C] map is flattened in (w, h, C) order.
The pipeline that uses them is affectjax.face.detect.

The wheel stores each net's Keras weights (`model.get_weights()`, in layer order) as a joblib
pickle compressed with LZ4 (mtcnn/assets/weights/{pnet,rnet,onet}.lz4). `read_joblib_lz4`
decompresses one with lz4.frame and unpickles it with a restricted unpickler that only builds
numpy dtypes and joblib's array placeholders, reading each array's raw bytes from the stream
the way joblib writes them. `load_weights` converts the three files once into a .npz cache.
"""
import hashlib
import importlib.util
import io
import os
import pickle
from typing import Dict, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from affectjax import files

NETS = ('pnet', 'rnet', 'onet')
INSTALL_HINT = 'pip install affectjax[video] (it installs the mtcnn wheel for its weights)'
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser('~'), '.cache', 'affectjax', 'mtcnn')
HIGHEST = jax.lax.Precision.HIGHEST  # float32 matmuls and convolutions, also on TPUs and GPUs

# Each net's layers with weights, in the Keras order of its weight list: (name, kind), where a
# 'conv' or 'dense' layer holds (kernel, bias) and a 'prelu' layer its slopes.
LAYERS = {
    'pnet': (('conv1', 'conv'), ('prelu1', 'prelu'), ('conv2', 'conv'), ('prelu2', 'prelu'),
             ('conv3', 'conv'), ('prelu3', 'prelu'), ('conv4_1', 'conv'), ('conv4_2', 'conv')),
    'rnet': (('conv1', 'conv'), ('prelu1', 'prelu'), ('conv2', 'conv'), ('prelu2', 'prelu'),
             ('conv3', 'conv'), ('prelu3', 'prelu'), ('fc4', 'dense'), ('prelu4', 'prelu'),
             ('fc5_1', 'dense'), ('fc5_2', 'dense')),
    'onet': (('conv1', 'conv'), ('prelu1', 'prelu'), ('conv2', 'conv'), ('prelu2', 'prelu'),
             ('conv3', 'conv'), ('prelu3', 'prelu'), ('conv4', 'conv'), ('prelu4', 'prelu'),
             ('fc5', 'dense'), ('prelu5', 'prelu'), ('fc6_1', 'dense'), ('fc6_2', 'dense'),
             ('fc6_3', 'dense')),
}


class PReLU(nn.Module):
  """max(x, 0) + alpha * min(x, 0), one alpha per channel (the last axis); float32."""

  @nn.compact
  def __call__(self, x):
    alpha = self.param('alpha', nn.initializers.constant(0.25), (x.shape[-1],), jnp.float32)
    return jnp.maximum(x, 0.0) + alpha * jnp.minimum(x, 0.0)


def _conv(features: int, kernel: int, name: str) -> nn.Conv:
  return nn.Conv(features, (kernel, kernel), padding='VALID', precision=HIGHEST, name=name)


def _dense(features: int, name: str) -> nn.Dense:
  return nn.Dense(features, precision=HIGHEST, name=name)


def _pool(x, size: int, padding: str):
  return nn.max_pool(x, (size, size), strides=(2, 2), padding=padding)


def _flatten_wh(x):
  """[B, h, w, C] -> [B, w * h * C] in Keras' Permute((2, 1, 3)) + Flatten order."""
  return jnp.transpose(x, (0, 2, 1, 3)).reshape(x.shape[0], -1)


class PNet(nn.Module):
  """Proposal net, fully convolutional.

  x: float32 [B, H, W, 3] normalised (H, W >= 12) -> (reg [B, h, w, 4] box offsets in units of
  the 12-pixel window, prob [B, h, w, 2] softmax (not face, face)), h = (H - 1) // 2 - 4 and
  likewise w: one window every 2 pixels. mask: optional bool [H - 2, W - 2]; where False, the
  first layer's output is replaced by -1e9 before the max pooling (as outside the image), so
  that images packed side by side (at even offsets) are each processed as if alone.
  """

  @nn.compact
  def __call__(self, x, mask=None):
    x = PReLU(name='prelu1')(_conv(10, 3, 'conv1')(x))
    if mask is not None:
      x = jnp.where(mask[..., None], x, -1e9)
    x = _pool(x, 2, 'SAME')
    x = PReLU(name='prelu2')(_conv(16, 3, 'conv2')(x))
    x = PReLU(name='prelu3')(_conv(32, 3, 'conv3')(x))
    return _conv(4, 1, 'conv4_1')(x), jax.nn.softmax(_conv(2, 1, 'conv4_2')(x), axis=-1)


class RNet(nn.Module):
  """Refinement net. x: float32 [B, 24, 24, 3] normalised -> (reg [B, 4], prob [B, 2])."""

  @nn.compact
  def __call__(self, x):
    x = _pool(PReLU(name='prelu1')(_conv(28, 3, 'conv1')(x)), 3, 'SAME')
    x = _pool(PReLU(name='prelu2')(_conv(48, 3, 'conv2')(x)), 3, 'VALID')
    x = _flatten_wh(PReLU(name='prelu3')(_conv(64, 2, 'conv3')(x)))
    x = PReLU(name='prelu4')(_dense(128, 'fc4')(x))
    return _dense(4, 'fc5_1')(x), jax.nn.softmax(_dense(2, 'fc5_2')(x), axis=-1)


class ONet(nn.Module):
  """Output net. x: float32 [B, 48, 48, 3] normalised -> (reg [B, 4], landmarks [B, 10]: five
  x then five y, relative to the input box, prob [B, 2])."""

  @nn.compact
  def __call__(self, x):
    x = _pool(PReLU(name='prelu1')(_conv(32, 3, 'conv1')(x)), 3, 'SAME')
    x = _pool(PReLU(name='prelu2')(_conv(64, 3, 'conv2')(x)), 3, 'VALID')
    x = _pool(PReLU(name='prelu3')(_conv(64, 3, 'conv3')(x)), 2, 'SAME')
    x = _flatten_wh(PReLU(name='prelu4')(_conv(128, 2, 'conv4')(x)))
    x = PReLU(name='prelu5')(_dense(256, 'fc5')(x))
    return (_dense(4, 'fc6_1')(x), _dense(10, 'fc6_2')(x),
            jax.nn.softmax(_dense(2, 'fc6_3')(x), axis=-1))


MODULES = {'pnet': PNet, 'rnet': RNet, 'onet': ONet}


# ---- Reading the wheel's joblib pickles without joblib --------------------------------------

class _ArrayWrapper:
  """Stands in for joblib.numpy_pickle.NumpyArrayWrapper: the pickle sets its attributes
  (subclass, shape, order, dtype, allow_mmap, numpy_array_alignment_bytes); the array's raw
  bytes follow in the stream, after an optional padding (one length byte, then that many)."""

  def read(self, stream) -> np.ndarray:
    dtype, shape = getattr(self, 'dtype', None), getattr(self, 'shape', None)
    order = getattr(self, 'order', 'C')
    if (not isinstance(dtype, np.dtype) or dtype.hasobject or order not in ('C', 'F') or
        getattr(self, 'subclass', np.ndarray) is not np.ndarray or
        not isinstance(shape, tuple) or not all(isinstance(n, int) and n >= 0 for n in shape)):
      raise pickle.UnpicklingError(f'unsupported array in the pickle: {vars(self)}')
    if getattr(self, 'numpy_array_alignment_bytes', None) is not None:
      stream.read(int.from_bytes(stream.read(1), 'little'))
    count = int(np.prod(shape, dtype=np.int64))
    data = stream.read(count * dtype.itemsize)
    if len(data) != count * dtype.itemsize:
      raise pickle.UnpicklingError('the pickle ends inside an array')
    array = np.frombuffer(data, dtype=dtype, count=count).copy()
    array = array.reshape(shape[::-1]).T if order == 'F' else array.reshape(shape)
    return array.astype(dtype.newbyteorder('='), copy=False)


class _RestrictedUnpickler(pickle._Unpickler):  # pylint: disable=protected-access
  """Builds only numpy dtypes and joblib's array placeholders, each replaced by its array when
  built (as joblib's own NumpyUnpickler does, on the pure-Python unpickler, whose BUILD it
  extends); any other global is refused. (ndarray is allowed only as the placeholders'
  `subclass` attribute; joblib never pickles arrays through numpy's own reduce.)"""
  ALLOWED = {('numpy', 'dtype'): np.dtype, ('numpy', 'ndarray'): np.ndarray,
             ('joblib.numpy_pickle', 'NumpyArrayWrapper'): _ArrayWrapper}
  dispatch = pickle._Unpickler.dispatch.copy()  # pylint: disable=protected-access

  def __init__(self, stream):
    super().__init__(stream)
    self._stream = stream

  def find_class(self, module, name):
    if (module, name) not in self.ALLOWED:
      raise pickle.UnpicklingError(f'global {module}.{name} is not allowed in MTCNN weights')
    return self.ALLOWED[(module, name)]

  def load_build(self):
    super().load_build()
    if isinstance(self.stack[-1], _ArrayWrapper):
      self.stack.append(self.stack.pop().read(self._stream))

  dispatch[pickle.BUILD[0]] = load_build


def read_joblib_lz4(path: str) -> List[np.ndarray]:
  """The list of arrays that joblib.load(path) returns for an LZ4-compressed joblib pickle of a
  list of numpy arrays (as the mtcnn wheel's weight files are), without joblib and without
  running pickle code: anything but dtypes and arrays raises pickle.UnpicklingError."""
  try:
    import lz4.frame  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f'reading the MTCNN weights {path} needs lz4; {INSTALL_HINT}') from e
  with open(path, 'rb') as f:
    raw = lz4.frame.decompress(f.read())
  result = _RestrictedUnpickler(io.BytesIO(raw)).load()
  if (not isinstance(result, list) or
      not all(isinstance(a, np.ndarray) and not a.dtype.hasobject for a in result)):
    raise pickle.UnpicklingError(f'{path}: expected a list of numeric arrays')
  return result


def weights_dir() -> str:
  """The mtcnn wheel's folder of weight files, found without importing `mtcnn` (its __init__
  imports TensorFlow). FileNotFoundError when the package is not installed."""
  spec = importlib.util.find_spec('mtcnn')
  locations = list(spec.submodule_search_locations or []) if spec is not None else []
  if not locations:
    raise FileNotFoundError(f'MTCNN weights: the mtcnn package is not installed; {INSTALL_HINT}')
  return os.path.join(locations[0], 'assets', 'weights')


def _net_params(net: str, arrays: Sequence[np.ndarray]) -> Dict[str, Dict[str, np.ndarray]]:
  """The Keras weight list of one net -> its Flax params {layer: {kernel, bias | alpha}}."""
  names = [(layer, leaf) for layer, kind in LAYERS[net]
           for leaf in (('alpha',) if kind == 'prelu' else ('kernel', 'bias'))]
  if len(arrays) != len(names):
    raise ValueError(f'{net}: {len(arrays)} weight arrays, expected {len(names)}')
  params = {}
  for (layer, leaf), array in zip(names, arrays):
    array = np.asarray(array, np.float32)
    params.setdefault(layer, {})[leaf] = array.reshape(-1) if leaf == 'alpha' else array
  return params


def _cache_file(sources: Sequence[str], cache_dir: Optional[str]) -> str:
  digest = hashlib.sha256()
  for source in sources:
    with open(source, 'rb') as f:
      digest.update(f.read())
  return os.path.join(cache_dir or DEFAULT_CACHE_DIR, f'mtcnn-{digest.hexdigest()[:16]}.npz')


def cache_path(path: Optional[str] = None, cache_dir: Optional[str] = None) -> str:
  """Where `load_weights(path, cache_dir)` caches the converted weights: a .npz named by the
  SHA-256 of the three source files, so other weights never reuse it."""
  return _cache_file(_sources(path), cache_dir)


def _sources(path: Optional[str]) -> List[str]:
  folder = path if path is not None else weights_dir()
  sources = [os.path.join(folder, f'{net}.lz4') for net in NETS]
  for source in sources:
    if not os.path.isfile(source):
      raise FileNotFoundError(f'MTCNN weights file {source} is missing; {INSTALL_HINT}')
  return sources


def load_weights(path: Optional[str] = None,
                 cache_dir: Optional[str] = None) -> Dict[str, Dict[str, dict]]:
  """The three nets' Flax variables: {'pnet' | 'rnet' | 'onet': {'params': {...}}}, float32
  NumPy arrays (Keras layouts: conv kernels HWIO, dense kernels [in, out]).

  path: a folder holding pnet.lz4, rnet.lz4 and onet.lz4 (default: the installed mtcnn wheel's
  assets/weights). The first call converts them into `cache_path(path, cache_dir)` (cache_dir
  default ~/.cache/affectjax/mtcnn; written to a temporary name, then renamed); later calls read
  that .npz. Nothing is downloaded. FileNotFoundError naming the file when one is missing.
  """
  sources = _sources(path)
  cache = _cache_file(sources, cache_dir)
  if not os.path.isfile(cache):
    flat = {}
    for net, source in zip(NETS, sources):
      for layer, leaves in _net_params(net, read_joblib_lz4(source)).items():
        flat.update({f'{net}/{layer}/{leaf}': array for leaf, array in leaves.items()})
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    with files.atomic_write(cache, 'wb') as f:
      np.savez(f, **flat)
  variables = {net: {'params': {}} for net in NETS}
  with np.load(cache, allow_pickle=False) as data:
    for key in data.files:
      net, layer, leaf = key.split('/')
      variables[net]['params'].setdefault(layer, {})[leaf] = np.asarray(data[key])
  return variables


def param_shapes(net: str) -> Dict[str, Dict[str, Tuple[int, ...]]]:
  """The shapes Flax gives `net`'s params ({layer: {leaf: shape}}), to check loaded weights."""
  size = {'pnet': 12, 'rnet': 24, 'onet': 48}[net]
  shapes = jax.eval_shape(MODULES[net]().init, jax.random.PRNGKey(0),
                          jnp.zeros((1, size, size, 3), jnp.float32))['params']
  return jax.tree_util.tree_map(lambda s: tuple(s.shape), shapes)
