"""Converts pretrained ResNet weights (torchvision .pth, VGGFace2 .pkl) for affectjax.

  python -m affectjax.convert --source resnet50_ft_weight.pkl --out weights/vggface2_r50
  python -m affectjax.convert --source resnet18-f37072fd.pth --out weights/imagenet_r18

The output directory holds `variables/` (an Orbax checkpoint of {'params': {'backbone'},
'batch_stats': {'backbone'}}) and `affectjax_weights.json` (architecture, the input
preprocessing that belongs to the weights, source file and sha256). `--config.init_from=<out>`
loads them (`affectjax.checkpoint.init_from`, through `affectjax.weights.load_converted`).
A file that holds no ResNet weights ends the command with one line `error: <file>: ...` (what
was expected) and exit status 1. The output directory is written under a temporary name next
to it and renamed when complete, so it never holds a partial conversion.
"""
import argparse
import os
import sys
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from affectjax import weights
from affectjax.models import affect
from affectjax.models import preprocess

# Per source kind: stride placement, stem pool and input preprocessing of the original network.
SOURCE_DEFAULTS = {
    'torch': {'stride_on': '3x3', 'stem_pool': 'torch', 'preprocessing': 'imagenet'},
    'pickle': {'stride_on': '1x1', 'stem_pool': 'ceil', 'preprocessing': 'vggface2'},
}


def source_kind(path: str) -> str:
  """'pickle' for .pkl/.pickle (NumPy arrays, VGGFace2 port), else 'torch' (.pth/.pt)."""
  return 'pickle' if path.lower().endswith(('.pkl', '.pickle')) else 'torch'


def convert_state_dict(state, *, arch: Optional[str] = None, stride_on: str = '3x3',
                       stem_pool: str = 'torch', bn_epsilon: float = 1e-5,
                       strict: bool = False) -> tuple:
  """torch-style state dict -> (variables {'params','batch_stats'} of the backbone, report, config).

  Depth and width come from the names and shapes unless arch ('resnet50') is given.
  """
  depth, width = weights.infer_architecture(state)
  config = affect.default_model_config()
  config.arch = arch or f'resnet{depth}'
  config.width, config.stride_on, config.stem_pool = width, stride_on, stem_pool
  config.bn_epsilon = bn_epsilon
  backbone = affect.create_backbone(config)
  images = jnp.zeros((1, 64, 64, 3), jnp.float32)
  # rbg: XLA's CPU compiler takes ~10x longer on the threefry graph of a whole ResNet init.
  init = lambda: backbone.init(jax.random.key(0, impl='rbg'), images, train=False)
  template = jax.eval_shape(init)
  variables, report = weights.state_dict_to_variables(
      state, template, strict=strict, init_fn=jax.jit(init))
  return variables, report, config


def convert(source: str, out_dir: str, *, kind: Optional[str] = None,
            arch: Optional[str] = None, stride_on: Optional[str] = None,
            stem_pool: Optional[str] = None, preprocessing: Optional[str] = None,
            bn_epsilon: float = 1e-5, strict: bool = False) -> dict:
  """Converts one weights file into out_dir; returns the metadata written next to it."""
  kind = kind or source_kind(source)
  defaults = SOURCE_DEFAULTS[kind]
  weights.check_output_dir(out_dir)  # before the work, not after it
  if kind == 'pickle':
    state = weights.load_numpy_pickle(source)
  else:
    state = weights.load_torch_state_dict(source)
  try:
    variables, report, config = convert_state_dict(
        state, arch=arch, stride_on=stride_on or defaults['stride_on'],
        stem_pool=stem_pool or defaults['stem_pool'], bn_epsilon=bn_epsilon, strict=strict)
  except ValueError as e:  # names and shapes that make no ResNet: the message names the file
    raise weights.WeightsError(f'{source}: {e}') from None
  preset = preprocessing or defaults['preprocessing']
  meta = {field: config[field] for field in weights.ARCH_FIELDS}
  meta.update(
      format_version=1, bn_epsilon=bn_epsilon,
      preprocessing={k: list(v) if isinstance(v, tuple) else v
                     for k, v in preprocess.PRESETS[preset].items()},
      preprocessing_name=preset,
      source={'file': os.path.abspath(source), 'kind': kind, 'sha256': weights.sha256(source)},
      report=report)
  weights.save_converted(out_dir, {
      'params': {'backbone': variables['params']},
      'batch_stats': {'backbone': variables['batch_stats']}}, meta)
  return meta


def print_report(report: dict, stream=None) -> None:
  """Lists missing, unexpected and deliberately dropped keys (on stdout by default)."""
  stream = stream or sys.stdout
  for what in ('missing', 'unexpected', 'dropped'):
    names = report[what]
    print(f'{what} keys ({len(names)}){":" if names else ""}', file=stream)
    for name in names:
      print(f'  {name}', file=stream)


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m affectjax.convert', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--source', required=True, help='.pth/.pt state dict or .pkl of arrays')
  parser.add_argument('--out', required=True, help='output directory')
  parser.add_argument('--format', choices=('auto', 'torch', 'pickle'), default='auto')
  parser.add_argument('--arch', choices=[f'resnet{d}' for d in (18, 34, 50, 101, 152)],
                      help='default: inferred from the keys')
  parser.add_argument('--stride-on', choices=('3x3', '1x1'),
                      help='default: 3x3 for torch files, 1x1 for VGGFace2 pickles')
  parser.add_argument('--stem-pool', choices=('torch', 'ceil'),
                      help='default: torch for torch files, ceil for VGGFace2 pickles')
  parser.add_argument('--preprocessing', choices=sorted(preprocess.PRESETS),
                      help='default: imagenet for torch files, vggface2 for pickles')
  parser.add_argument('--bn-epsilon', type=float, default=1e-5)
  parser.add_argument('--strict', action='store_true',
                      help='fail on missing or unexpected keys')
  args = parser.parse_args(argv)
  try:
    meta = convert(args.source, args.out, kind=None if args.format == 'auto' else args.format,
                   arch=args.arch, stride_on=args.stride_on, stem_pool=args.stem_pool,
                   preprocessing=args.preprocessing, bn_epsilon=args.bn_epsilon,
                   strict=args.strict)
  except (ValueError, OSError, weights.UnsafePickleError) as e:
    # One line: WeightsError and UnsafePickleError start with the file; nothing is written.
    print(f'error: {e}', file=sys.stderr)
    return 1
  print_report(meta['report'])
  print(f"wrote {meta['arch']} (width {meta['width']}, stride on {meta['stride_on']}, "
        f"stem pool {meta['stem_pool']}, {meta['preprocessing_name']} preprocessing) "
        f'to {os.path.abspath(args.out)}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
