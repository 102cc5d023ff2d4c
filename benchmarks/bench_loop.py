"""Training-loop overhead: the full loop against the bare jitted step on the same batches.

The full loop is `trainer.train_and_evaluate` (grain input pipeline with JPEG decoding,
prefetch to the devices, the step, asynchronous metric fetches, logging to metrics.jsonl and
TensorBoard, the checkpoint policy). Its steady-state rate is measured between its first and
last logged training step (so compilation and the final evaluation are excluded). The bare
step is the same jitted `train_step` fed the same batches already in host memory, timed with
`jax.block_until_ready`. A and B alternate; the table reports medians and the ratio
(target: the loop keeps at least 95% of the bare step's images/s).

  python benchmarks/bench_loop.py            # demo model (ResNet18/16, 64x64), 150 steps
  python benchmarks/bench_loop.py --reps 3 --steps 300
"""
import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

from affectjax import config as config_lib
from affectjax import parallel, train, trainer
from affectjax.data import pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench_config(args):
  c = config_lib.load_config_file(os.path.join(REPO, 'configs', 'mtl3.py:demo'))
  c.progress_bar = False
  c.log_every_steps = args.log_every
  c.checkpoint_every_steps = args.checkpoint_every
  c.eval_every_epochs = 1e9  # only the final evaluation, after the timed window
  c.data.worker_count = args.workers
  return c


def loop_images_per_second(config, steps: int) -> float:
  """Runs the full loop for `steps` steps; steady-state images/s from its own log records."""
  with tempfile.TemporaryDirectory() as workdir:
    c = config.copy_and_resolve_references()
    c.halt_after_steps = steps
    c.num_epochs = 1000.0  # a long schedule: the run is stopped by halt_after_steps
    trainer.train_and_evaluate(c, workdir)
    records = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  logged = [r for r in records if r['split'] == 'train']
  first, last = logged[0], logged[-1]
  return (last['step'] - first['step']) * config.global_batch_size / (last['time'] - first['time'])


def bare_step_images_per_second(config, batches: list, reps: int = 1) -> float:
  """The same jitted step on the same batches held in host memory (compiled beforehand)."""
  run = trainer.build_run(config, steps_per_epoch=1000)
  step_fn = parallel.data_parallel(
      functools.partial(train.train_step, config=run.config, lr_schedule=run.schedule),
      run.mesh, donate_state=True)
  state = parallel.replicate(run.state, run.mesh)
  state, _ = step_fn(state, parallel.global_batch(batches[0], run.mesh))
  jax.block_until_ready(state)
  rates = []
  for _ in range(reps):
    start = time.perf_counter()
    for batch in batches:
      state, metrics = step_fn(state, parallel.global_batch(batch, run.mesh))
    jax.block_until_ready((state, metrics))
    rates.append(len(batches) * config.global_batch_size / (time.perf_counter() - start))
  return statistics.median(rates)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=150)
  parser.add_argument('--reps', type=int, default=2)
  parser.add_argument('--log-every', type=int, default=20)
  parser.add_argument('--checkpoint-every', type=int, default=100)
  parser.add_argument('--workers', type=int, default=0)
  args = parser.parse_args()
  config = bench_config(args)
  tasks = config_lib.task_tuple(config.tasks)
  index = trainer.load_index(config, 'train', tasks)
  iterator = pipeline.make_train_iterator(index, config.data,
                                          global_batch_size=config.global_batch_size,
                                          seed=config.seed)
  batches = [next(iterator) for _ in range(min(args.steps, 60))]
  bare, loop = [], []
  for rep in range(args.reps):
    bare.append(bare_step_images_per_second(config, batches))
    loop.append(loop_images_per_second(config, args.steps))
    print(f'rep {rep}: bare step {bare[-1]:.1f} img/s, full loop {loop[-1]:.1f} img/s',
          flush=True)
  b, l = statistics.median(bare), statistics.median(loop)
  print('\n| what | images/s (median) |\n|---|---|')
  print(f'| bare jitted step, batches in memory | {b:.1f} |')
  print(f'| full training loop (data, step, logging, checkpoints) | {l:.1f} |')
  print(f'| ratio loop / bare | {l / b:.3f} (target >= 0.95) |')
  print(f'\ndevices: {jax.device_count()} x {jax.devices()[0].platform}; model '
        f'{config.model.arch}/{config.model.width} at {config.data.image_size}px, batch '
        f'{config.global_batch_size}, {args.steps} loop steps, {args.reps} reps')
  print('command: python ' + ' '.join(sys.argv))


if __name__ == '__main__':
  main()
