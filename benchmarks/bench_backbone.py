"""Benchmark: the backbone's own optimisations against the plain versions, in the real steps.

The project's real steps (`Run.train_step` / `Run.eval_step` of configs/mtl3.py, the
multi-task heads and losses, the Adam update) twice each on the same state and batch, with the
ResNet as the project runs it, one option set both ways:
  - train: BatchNorm (with its residual add and ReLU) and the stem max-pool with their
    gradients written out (`models/layers.py`), against the same network differentiated by
    JAX (`hand_grads=False`);
  - mask: those BatchNorms keeping their ReLU's mask in bits (`mask_bits=True`), against a
    byte an element, the train step both times;
  - eval: each BatchNorm folded into the convolution before it (`resnet.ConvNorm`), against a
    convolution then a normalisation pass (`fold_bn=False`);
  - layout: the convolution kernels (and their Adam moments) kept output channel first
    (`kernel_layout='OHWI'`), against flax's HWIO, the train step both times.
Timed interleaved after warm-up (medians; the ratio within each repetition), with the largest
difference between the two outputs: the first train step's metrics, the eval outputs.

  python benchmarks/bench_backbone.py                     # ResNet50, 112 px, batch 32, the CPU
  python benchmarks/bench_backbone.py --batch 256 --dtype bfloat16   # on a GPU
"""
import argparse
import datetime
import os
import platform
import statistics
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# pylint: disable=wrong-import-position
import accelerator
import common
from affectjax.models import resnet

# part: (the step, the optimisation's name, the ResNet field that turns it on, its value
# there, the plain version's name, its value there)
COMPARISONS = {'train': ('train', 'written gradients', 'hand_grads', True, 'derived', False),
               'mask': ('train', 'mask in bits', 'mask_bits', True, 'mask in bytes', False),
               'eval': ('eval', 'folded', 'fold_bn', True, 'unfolded', False),
               'layout': ('train', 'kernels OHWI', 'kernel_layout', 'OHWI', 'kernels HWIO',
                          'HWIO')}


def compare(run, state, batch, part: str, args) -> dict:
  """Images/s of `part`'s step with COMPARISONS[part] turned on and off."""
  step, name, field, on, plain, off = COMPARISONS[part]
  model, states = run.model, {}
  for key, value in ((name, on), (plain, off)):
    backbone = model.backbone.clone(**{field: value})
    states[key] = resnet.relayout(state.replace(apply_fn=model.clone(backbone=backbone).apply),
                                  backbone.kernel_layout)  # (the kernels and their moments)
  fn = run.train_step() if step == 'train' else run.eval_step()
  # Train steps take their state (donated) and return the next: each candidate keeps its own
  # copy, and the first step's outputs (its metrics) are compared.
  first = {k: fn(jax.tree_util.tree_map(jax.numpy.copy, s), batch) for k, s in states.items()}
  first = {k: v[1] if step == 'train' else v for k, v in first.items()}
  holders = {k: {'state': jax.tree_util.tree_map(jax.numpy.copy, s)} for k, s in states.items()}

  def timed(key):
    def call():
      for _ in range(args.steps):
        out = fn(holders[key]['state'], batch)
        if step == 'train':
          holders[key]['state'] = out[0]
      jax.block_until_ready(out)
    return call

  times = common.interleaved_times({k: timed(k) for k in states}, args.reps, 1)[0]
  images = run.config.global_batch_size * args.steps
  rate = {k: images / statistics.median(v) for k, v in times.items()}
  leaves = {k: jax.tree_util.tree_leaves(v) for k, v in first.items()}
  diff = max(float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))
             for a, b in zip(leaves[name], leaves[plain]))
  scale = max(float(np.max(np.abs(np.asarray(v, np.float32)))) for v in leaves[plain])
  return {'compared': [name, plain], 'images_per_s': rate,
          'ratio': common.paired_ratio(times, name, plain),
          'max_abs_output_difference': diff, 'largest_output': scale}


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--arch', default='resnet50')
  p.add_argument('--batch', type=int, default=32, help='images per device')
  p.add_argument('--image-size', type=int, default=112)
  p.add_argument('--width', type=int, default=64)
  p.add_argument('--dtype', default='auto', help="'auto': bf16 on accelerators, float32 on CPU")
  p.add_argument('--steps', type=int, default=3, help='steps per timed window')
  p.add_argument('--reps', type=int, default=5)
  p.add_argument('--parts', default='train,mask,eval,layout', help=', '.join(COMPARISONS))
  args = p.parse_args(argv)
  args.variant = ''
  run, state, batch = accelerator.build(
      accelerator.image_config(args, args.arch, args.batch, args.dtype))
  result = {'date': f'{datetime.datetime.now():%Y-%m-%d %H:%M}', 'command': common.command_line(),
            'device': f'{jax.device_count()} x {jax.devices()[0].device_kind}, '
                      f'{platform.machine()}', 'arch': args.arch, 'dtype': run.config.model.dtype,
            'batch': run.config.global_batch_size, 'steps': {}}
  rows = []
  for part in args.parts.split(','):
    if part not in COMPARISONS:
      p.error(f'--parts: unknown part {part!r}; expected some of {", ".join(COMPARISONS)}')
    print(f'[backbone] {part}, {args.arch}, {result["dtype"]}, batch {result["batch"]}: '
          f'compiling both, then {args.reps} x {args.steps} steps each ...', flush=True)
    r = result['steps'][part] = compare(run, state, batch, part, args)
    name, plain = r['compared']
    rows.append((COMPARISONS[part][0], f'{name} / {plain}', f"{r['images_per_s'][name]:.1f}",
                 f"{r['images_per_s'][plain]:.1f}", f"{r['ratio']:.3f}",
                 f"{r['max_abs_output_difference']:.2e} (of {r['largest_output']:.3g})"))
  print(common.format_table(('step', 'compared', 'img/s', 'plain img/s', 'paired ratio',
                             'largest output difference'), rows))
  print(f"{result['device']}; ratio: the optimised step's images/s over the plain one's, the "
        'median of the repetitions')
  return result


if __name__ == '__main__':
  main()
