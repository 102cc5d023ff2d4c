"""Benchmark: inference with each BatchNorm folded into its convolution, against unfolded.

The project's real eval step (`Run.eval_step` of configs/mtl3.py, the multi-task heads) twice
on the same state and batch: as the model runs it (`resnet.ConvNorm` folds every BatchNorm
into the convolution before it) and with `fold_bn=False` (a convolution, then a normalisation
pass). Timed interleaved after warm-up (medians; the ratio within each repetition), with the
largest difference between the two outputs.

  python benchmarks/bench_fold.py                      # ResNet50, 112 px, batch 32, the CPU
  python benchmarks/bench_fold.py --batch 256 --dtype bfloat16   # on a GPU
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


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--arch', default='resnet50')
  p.add_argument('--batch', type=int, default=32, help='images per device')
  p.add_argument('--image-size', type=int, default=112)
  p.add_argument('--width', type=int, default=64)
  p.add_argument('--dtype', default='auto', help="'auto': bf16 on accelerators, float32 on CPU")
  p.add_argument('--steps', type=int, default=3, help='steps per timed window')
  p.add_argument('--reps', type=int, default=5)
  args = p.parse_args(argv)
  args.variant = ''
  run, state, batch = accelerator.build(
      accelerator.image_config(args, args.arch, args.batch, args.dtype))
  model = run.model
  unfolded = state.replace(apply_fn=model.clone(
      backbone=model.backbone.clone(fold_bn=False)).apply)
  step = run.eval_step()
  outputs = {}

  def timed(name, s):
    def call():
      for _ in range(args.steps):
        outputs[name] = step(s, batch)
      jax.block_until_ready(outputs[name])
    return call

  runs = {'folded': timed('folded', state), 'unfolded': timed('unfolded', unfolded)}
  print(f'[fold] {args.arch}, {run.config.model.dtype}, batch {run.config.global_batch_size}: '
        f'compiling both, then {args.reps} x {args.steps} steps each ...', flush=True)
  times = common.interleaved_times(runs, args.reps, 1)[0]
  images = run.config.global_batch_size * args.steps
  rate = {k: images / statistics.median(v) for k, v in times.items()}
  diff = max(float(np.max(np.abs(np.asarray(outputs['folded'][k]) -
                                 np.asarray(outputs['unfolded'][k]))))
             for k in outputs['folded'])
  scale = max(float(np.max(np.abs(np.asarray(v)))) for v in outputs['unfolded'].values())
  result = {'date': f'{datetime.datetime.now():%Y-%m-%d %H:%M}', 'command': common.command_line(),
            'device': f'{jax.device_count()} x {jax.devices()[0].device_kind}, '
                      f'{platform.machine()}', 'dtype': run.config.model.dtype,
            'images_per_s': rate, 'folded_over_unfolded': common.paired_ratio(
                times, 'folded', 'unfolded'),
            'max_abs_output_difference': diff, 'largest_output': scale}
  print(common.format_table(
      ('eval step', 'img/s', 'of unfolded'),
      [(k, f'{v:.1f}', f"{v / rate['unfolded']:.3f}") for k, v in rate.items()]))
  print(f"folded / unfolded, paired within repetitions: {result['folded_over_unfolded']:.3f}; "
        f'largest output difference {diff:.2e} (largest output {scale:.3g}); {result["device"]}')
  return result


if __name__ == '__main__':
  main()
