"""Benchmark: the host's time per train step on the thread that dispatches the steps.

What the training loop's thread spends on each step besides waiting: the call of the compiled
train step (taking the state's arrays and the batch, returning the new state and the metrics)
and the metrics' copies to the host (`trainer.StepLedger.add_step`), each timed without
waiting for the device (the device is idle before each step, so nothing queues). Beside it, in
the same run, the reference: a jitted function of as many small arrays as the train state,
donated, that adds one to each, whose call is the per-array part of the step call.

The step's own compute does not enter the figures, so a tiny network (the demo's ResNet18 at
width 1 by default) shows the host's share; the array count is the network's, whatever its width.

  python benchmarks/bench_dispatch.py                          # demo config, ResNet18 width 1
  python benchmarks/bench_dispatch.py --arch resnet50          # ResNet50's 611 state arrays
"""
import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# pylint: disable=wrong-import-position
import accelerator
import common
from affectjax import config as config_lib


def host_times(fn, state, batch, steps: int) -> tuple:
  """Median seconds of the step call and of its metrics' copies to the host."""
  call, copy = [], []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = fn(state, batch)
    called = time.perf_counter()
    for leaf in jax.tree_util.tree_leaves(metrics):
      leaf.copy_to_host_async()
    copy.append(time.perf_counter() - called)
    call.append(called - start)
    jax.block_until_ready((state, metrics))
  return statistics.median(call), statistics.median(copy), metrics


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--arch', default='resnet18')
  p.add_argument('--width', type=int, default=1)
  p.add_argument('--steps', type=int, default=200, help='timed steps (after 3 of warm-up)')
  args = p.parse_args(argv)
  config = config_lib.load_config_file(os.path.join(accelerator.REPO, 'configs', 'mtl3.py:demo'))
  config.model.arch, config.model.width, config.num_devices = args.arch, args.width, 0
  run, state, batch = accelerator.build(config)
  fn = run.train_step()
  for _ in range(3):
    state, _ = fn(state, batch)
  call, copy, metrics = host_times(fn, state, batch, args.steps)
  arrays = len(jax.tree_util.tree_leaves(state))
  bump = jax.jit(lambda tree: [x + 1 for x in tree], donate_argnums=0)
  tree = bump([jnp.ones((8,)) for _ in range(arrays)])
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    tree = bump(tree)
    times.append(time.perf_counter() - start)
    jax.block_until_ready(tree)
  result = {'date': f'{datetime.datetime.now():%Y-%m-%d %H:%M}', 'command': common.command_line(),
            'device': f'{jax.device_count()} x {jax.devices()[0].device_kind}, '
                      f'{platform.machine()}', 'arch': args.arch, 'width': args.width,
            'state_arrays': arrays, 'metrics_outputs': len(jax.tree_util.tree_leaves(metrics)),
            'step_call_ms': call * 1e3, 'metrics_copies_ms': copy * 1e3,
            'reference_call_ms': statistics.median(times) * 1e3}
  print(common.format_table(
      ('network', 'state arrays', 'metrics outputs', 'step call ms', 'metrics copies ms',
       f'{arrays} donated arrays: call ms'),
      [(f'{args.arch} width {args.width}', arrays, result['metrics_outputs'], f'{call * 1e3:.3f}',
        f'{copy * 1e3:.3f}', f"{result['reference_call_ms']:.3f}")]))
  print(f"{result['device']}; medians of {args.steps} steps, each timed without waiting for "
        'the device')
  return result


if __name__ == '__main__':
  main()
