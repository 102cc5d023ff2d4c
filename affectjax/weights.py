"""Pretrained ResNet weights: safe loading of PyTorch / VGGFace2 files and mapping to Flax.

A torchvision-style state dict (name -> array) maps onto `affectjax.models.resnet.ResNet`
by renaming: `layer2.0.conv1.weight` -> params `layer2_0/conv1/kernel` (OIHW -> the template's
kernel layout, `resnet.KERNEL_LAYOUTS`),
`bn1.weight/bias` -> `bn1/scale/bias`, `bn1.running_mean/var` -> batch_stats `bn1/mean/var`,
`downsample.0/1` -> `downsample_conv/downsample_bn`. The classifier `fc` is dropped.
"""
import collections
import hashlib
import json
import os
import pickle
import re
from typing import Any, Callable, Mapping, Optional

from etils import epath
import numpy as np

from affectjax import files
from affectjax.models import resnet

try:
  from numpy._core import multiarray as _multiarray, numeric as _numeric
except ImportError:  # numpy < 2
  from numpy.core import multiarray as _multiarray, numeric as _numeric

# Globals a pickle of NumPy arrays in (ordered) dicts needs, numpy 1.x and 2.x spellings.
_ALLOWED_GLOBALS = {
    ('numpy', 'ndarray'): np.ndarray,
    ('numpy', 'dtype'): np.dtype,
    ('collections', 'OrderedDict'): collections.OrderedDict,
}
for _core in ('numpy.core', 'numpy._core'):
  _ALLOWED_GLOBALS[(f'{_core}.multiarray', '_reconstruct')] = _multiarray._reconstruct
  _ALLOWED_GLOBALS[(f'{_core}.multiarray', 'scalar')] = _multiarray.scalar
  _ALLOWED_GLOBALS[(f'{_core}.numeric', '_frombuffer')] = _numeric._frombuffer


class UnsafePickleError(pickle.UnpicklingError):
  """A pickle asked for a global outside the NumPy-array allow-list."""


class WeightsError(ValueError):
  """Weights that cannot be converted or written; one line starting with the file, saying what
  was expected."""


EXPECTED_SOURCE = ('expected a torchvision ResNet state dict (.pth/.pt, torch.save(model.'
                   'state_dict())) or a VGGFace2 pickle of NumPy arrays (.pkl)')


def check_source(path: str) -> None:
  """WeightsError unless `path` is a non-empty file."""
  if not os.path.exists(path):
    raise WeightsError(f'{path}: no such file; {EXPECTED_SOURCE}')
  if not os.path.isfile(path):
    raise WeightsError(f'{path}: not a file; {EXPECTED_SOURCE}')
  if os.path.getsize(path) == 0:
    raise WeightsError(f'{path}: an empty file; {EXPECTED_SOURCE}')


def _named_arrays(path: str, obj, to_numpy: Callable = np.asarray) -> dict:
  """name -> numeric np.ndarray from a loaded mapping; WeightsError for anything else."""
  if not isinstance(obj, Mapping):
    raise WeightsError(f'{path}: holds a {type(obj).__name__}, not a state dict; expected a dict '
                       'of name -> array, e.g. torch.save(model.state_dict(), path)')
  out = {}
  for name, value in obj.items():
    array = to_numpy(value)
    if not isinstance(name, str) or array.dtype.kind not in 'biuf':
      raise WeightsError(f'{path}: entry {name!r} is a {type(value).__name__}, not a numeric '
                         "array; expected a dict of name -> array (also found nested under "
                         "'state_dict' or 'model', as in training checkpoints)")
    out[name] = array
  return out


def _latin1_encode(text, encoding='latin1'):
  """Stand-in for _codecs.encode, which protocol-2 pickles use for bytes; latin-1 only."""
  if encoding.lower().replace('_', '-') not in ('latin1', 'latin-1'):
    raise UnsafePickleError(f'_codecs.encode with encoding {encoding!r} is not allowed')
  return text.encode('latin1')


class NumpyOnlyUnpickler(pickle.Unpickler):
  """Unpickler that builds NumPy arrays, dtypes and plain containers and nothing else."""

  def __init__(self, file, *, source: str = '<pickle>'):
    super().__init__(file, encoding='latin1')
    self._source = source

  def find_class(self, module, name):
    if (module, name) == ('_codecs', 'encode'):
      return _latin1_encode
    if (module, name) in _ALLOWED_GLOBALS:
      return _ALLOWED_GLOBALS[(module, name)]
    raise UnsafePickleError(
        f'{self._source}: refusing to load global {module}.{name}; only NumPy arrays in '
        'dicts are allowed in weight pickles (this file may try to run code)')


def load_numpy_pickle(path: str) -> dict:
  """name -> np.ndarray from a latin-1 pickle (e.g. resnet50_ft_weight.pkl), never running code."""
  check_source(path)
  with open(path, 'rb') as f:
    try:
      obj = NumpyOnlyUnpickler(f, source=str(path)).load()
    except UnsafePickleError:
      raise
    except Exception:  # pylint: disable=broad-except  (any damage of an untrusted file)
      raise WeightsError(f'{path}: not a pickle of NumPy arrays (it cannot be unpickled); '
                         'expected a VGGFace2 pickle (resnet50_ft_weight.pkl), or a torchvision '
                         'state dict with --format torch') from None
  return _named_arrays(path, obj)


def load_torch_state_dict(path: str) -> dict:
  """name -> np.ndarray from a torch .pth/.pt (weights_only), unnesting and unprefixing."""
  check_source(path)
  try:
    import torch  # pylint: disable=g-import-not-at-top  (optional dependency)
  except ImportError:
    raise WeightsError(f'{path}: reading PyTorch files needs torch (pip install '
                       '"affectjax[torch]"); VGGFace2 pickles (.pkl) need no torch') from None
  try:
    obj = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except  (never show torch's advice to unpickle)
    found = re.search(r'GLOBAL ([\w.]+)', str(e))
    problem = (f'holds the Python object {found.group(1)}, not only tensors (objects are not '
               'loaded: they could run code)' if found else
               'not a file written by torch.save (torch.load cannot read it)')
    raise WeightsError(f'{path}: {problem}; expected a torchvision ResNet state dict of tensors '
                       '(torch.save(model.state_dict(), path)), or a VGGFace2 pickle of NumPy '
                       'arrays with --format pickle') from None
  for key in ('state_dict', 'model'):
    if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
      obj = obj[key]

  def to_numpy(value):
    if isinstance(value, torch.Tensor):
      value = value.detach().cpu()
      return (value.float() if value.dtype == torch.bfloat16 else value).numpy()
    return np.asarray(value) if isinstance(value, (int, float, np.ndarray)) else np.asarray(None)

  arrays = _named_arrays(path, obj, to_numpy)
  return {k.removeprefix('module.'): v for k, v in arrays.items()}


def infer_architecture(state: Mapping[str, np.ndarray]) -> tuple:
  """(depth, width) from the parameter names and the stem kernel's shape."""
  if 'conv1.weight' not in state:
    names = sorted(state)
    shown = ', '.join(names[:5]) + (', ...' if len(names) > 5 else '')
    raise ValueError(f'not a ResNet state dict: no conv1.weight among its {len(names)} entries '
                     f'({shown or "none"}); expected torchvision ResNet names (conv1.weight, '
                     'bn1.weight, layer1.0.conv1.weight, ...)')
  if np.ndim(state['conv1.weight']) != 4:
    raise ValueError(f"conv1.weight has shape {np.shape(state['conv1.weight'])}; expected a "
                     'convolution kernel [width, 3, 7, 7]')
  blocks = collections.defaultdict(set)
  for name in state:
    m = re.match(r'layer(\d)\.(\d+)\.', name)
    if m:
      blocks[int(m.group(1))].add(int(m.group(2)))
  stage_sizes = tuple(len(blocks[i]) for i in range(1, 5))
  bottleneck = 'layer1.0.conv3.weight' in state
  for depth, (sizes, block_cls) in resnet.STAGE_SIZES.items():
    if sizes == stage_sizes and (block_cls is resnet.BottleneckBlock) == bottleneck:
      return depth, int(state['conv1.weight'].shape[0])
  raise ValueError(f'no ResNet depth has stage sizes {stage_sizes} '
                   f'({"bottleneck" if bottleneck else "basic"} blocks)')


_BN_FIELDS = {'weight': ('params', 'scale'), 'bias': ('params', 'bias'),
              'running_mean': ('batch_stats', 'mean'), 'running_var': ('batch_stats', 'var')}


def flax_path(torch_name: str) -> Optional[tuple]:
  """'layer1.0.downsample.1.running_var' -> ('batch_stats', 'layer1_0', 'downsample_bn', 'var').

  None for names that carry no weight we keep (num_batches_tracked, the fc classifier).
  """
  parts = torch_name.split('.')
  if parts[-1] == 'num_batches_tracked' or parts[0] == 'fc':
    return None
  if parts[0].startswith('layer') and len(parts) > 2:
    parts = [f'{parts[0]}_{parts[1]}'] + parts[2:]
  if len(parts) > 2 and parts[-3] == 'downsample':
    parts = parts[:-3] + [('downsample_conv', 'downsample_bn')[int(parts[-2])], parts[-1]]
  module, field = parts[:-1], parts[-1]
  if field == 'weight' and (module[-1].startswith('conv') or module[-1] == 'downsample_conv'):
    return ('params', *module, 'kernel')
  if field in _BN_FIELDS:
    collection, leaf = _BN_FIELDS[field]
    return (collection, *module, leaf)
  return ('unknown', *parts)


def _flatten(tree: Mapping, prefix=()) -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flatten(value, prefix + (key,)))
    else:
      out[prefix + (key,)] = value
  return out


def _unflatten(flat: Mapping[tuple, Any]) -> dict:
  out = {}
  for path, value in flat.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return out


def state_dict_to_variables(state: Mapping[str, np.ndarray], template: Mapping,
                            *, strict: bool = False,
                            init_fn: Optional[Callable[[], Mapping]] = None) -> tuple:
  """Maps a torch ResNet state dict onto a Flax backbone's variables.

  template: {'params': ..., 'batch_stats': ...} of the backbone (anything with .shape, e.g.
  jax.eval_shape's output). Missing entries take their values from init_fn() (called only
  then; fresh initial variables of the same tree), or raise when strict or no init_fn.
  Returns (variables as NumPy float32, report) with report = {'missing': flax paths absent from
  the state dict, 'unexpected': torch names with no place, 'dropped': names ignored on purpose}.
  Shape mismatches always raise; missing/unexpected raise when strict.
  """
  target = _flatten(template)
  layout = resnet.kernel_layout_of(template) or 'HWIO'
  flat, seen, unexpected, dropped = {}, set(), [], []
  for name, value in state.items():
    path = flax_path(name)
    if path is None:
      dropped.append(name)
      continue
    if path not in target:
      unexpected.append(name)
      continue
    value = np.asarray(value, np.float32)
    if path[-1] == 'kernel' and value.ndim == 4:  # (other shapes fail the check below)
      value = resnet.from_hwio(value.transpose(2, 3, 1, 0), layout)  # OIHW -> HWIO -> layout
    if value.shape != tuple(target[path].shape):
      raise ValueError(f'{name}: shape {value.shape} does not fit {"/".join(path)} '
                       f'{tuple(target[path].shape)}; wrong --arch or width?')
    flat[path] = value
    seen.add(path)
  missing = ['/'.join(p) for p in target if p not in seen]
  report = {'missing': missing, 'unexpected': sorted(unexpected), 'dropped': sorted(dropped)}
  if strict and (missing or unexpected):
    raise ValueError(f'strict conversion: missing {missing}, unexpected {sorted(unexpected)}')
  if missing:
    if init_fn is None:
      raise ValueError(f'missing {missing} and no init_fn to fill them')
    initial = _flatten(init_fn())
    flat.update({p: np.asarray(initial[p], np.float32) for p in target if p not in seen})
  return _unflatten(flat), report


META_FILE = 'affectjax_weights.json'
VARIABLES_DIR = 'variables'
# Model config fields that must match the network the weights were converted for.
ARCH_FIELDS = ('arch', 'width', 'stride_on', 'stem_pool')


def check_output_dir(out_dir: str) -> None:
  """WeightsError unless out_dir is new, an empty folder or earlier converted weights."""
  expected = 'expected a new folder, an empty one or earlier converted weights to replace'
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise WeightsError(f'{out_dir}: a file, not a folder; {expected}')
  if os.path.isdir(out_dir) and os.listdir(out_dir) and not os.path.exists(
      os.path.join(out_dir, META_FILE)):
    names = sorted(os.listdir(out_dir))
    raise WeightsError(f'{out_dir}: a folder of other files ({", ".join(names[:5])}'
                       f'{", ..." if len(names) > 5 else ""}); {expected}')


def save_converted(out_dir: str, variables: Mapping, meta: Mapping) -> None:
  """Writes out_dir/variables (Orbax StandardCheckpointer) and out_dir/affectjax_weights.json.

  Both go to a temporary folder next to out_dir, renamed to out_dir when complete (replacing
  earlier converted weights there); a failure removes it, so out_dir is never partial.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  check_output_dir(out_dir)
  out = os.path.abspath(out_dir)
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with files.atomic_path(out) as tmp:
    os.mkdir(tmp)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(epath.Path(tmp) / VARIABLES_DIR, variables)
    checkpointer.wait_until_finished()
    with open(os.path.join(tmp, META_FILE), 'w') as f:
      f.write(json.dumps(meta, indent=2, sort_keys=True) + '\n')


def load_converted(path: str) -> tuple:
  """(variables, meta) from a directory written by `python -m affectjax.convert`.

  variables = {'params': {'backbone': ...}, 'batch_stats': {'backbone': ...}} of NumPy float32;
  meta holds arch, width, stride_on, stem_pool (model config fields), bn_epsilon,
  preprocessing (for models.preprocess.normalize), source {file, kind, sha256}, report.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  root = epath.Path(path).absolute()
  if not (root / META_FILE).exists():
    raise FileNotFoundError(f'{root} holds no {META_FILE}; convert weights with '
                            '`python -m affectjax.convert` first')
  meta = json.loads((root / META_FILE).read_text())
  variables = ocp.StandardCheckpointer().restore(root / VARIABLES_DIR)
  return variables, meta


def check_model_config(model_config, meta: Mapping) -> None:
  """Raises when a model config's architecture fields differ from the converted weights'."""
  diffs = [f'{k}: config {model_config[k]!r} vs weights {meta[k]!r}' for k in ARCH_FIELDS
           if model_config[k] != meta[k]]
  if diffs:
    raise ValueError('model config does not match the converted weights (' + '; '.join(diffs)
                     + '); set these fields from the weights metadata')


def sha256(path: str) -> str:
  """Hex SHA-256 of a file."""
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()
