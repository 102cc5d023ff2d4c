"""Training-loop overhead: the full loop against the bare jitted step on the same batches.

The full loop is `trainer.train_and_evaluate` (grain input pipeline with JPEG decoding,
prefetch to the devices, the step, asynchronous metric fetches, logging to metrics.jsonl and
TensorBoard, the checkpoint policy). Its steady-state rate is measured between its first and
last logged training step (so compilation and the final evaluation are excluded). The bare
step is the same jitted `train_step` fed the same batches already in host memory (cycled to
the same number of steps), timed with `jax.block_until_ready`. A and B alternate; the table
reports medians and the ratio (target: the loop keeps at least 95% of the bare step's
images/s).

Checkpoint policy: by default a save every 100 steps (12 s of training here) and none at
epoch ends. An Orbax save has a fixed cost (about 1 ms of CPU per array, some 250 ms for the
demo state's 248 arrays) that competes with the XLA step for this machine's two cores, so the
overhead depends on how often the run saves; the demo's small synthetic set has 123-step
epochs, and `--checkpoint-every-epochs 1 --checkpoint-every 200` measures the demo config's own
policy (a save at each epoch end and every 200 steps). The loop's logging intervals are also split into those with and
without a save, which separates the input pipeline and logging from the saves (reported as
wall time added per save).

Two loop variants per repetition: `jpeg` decodes the crops every epoch (the default input
path) and `cached` reads them from the decoded-frame cache (`data.decoded_cache`, built before
timing), which takes the JPEG decoding off the two cores the XLA step runs on.
`--variant NAME:field=value,...` adds a loop with those config overrides on the JPEG loop's
config (Python literals), for example
`--variant cached-nothread:data.decoded_cache=True,prefetch_thread=False`. The overrides change
the loop, not the bare step it is measured against (that runs the base config).

`--launch-ms X` stands in for a GPU's launching: every train step call (the loop's and the
bare step's) then holds the thread that makes it X ms longer with the GIL released, as jaxlib
holds it while XLA's GPU runtime queues a step's kernels (the third GPU loan measured 12.6 ms
per ResNet50 step at batch 256). With a small model the loop is then bound by that thread, as
on a GPU, and the benchmark shows what the loop's other host work costs it. (A sleeping
thread leaves its core to the others, where launching would keep one busy: on this 2-core
machine the stand-in favours work done on other threads.)

  python benchmarks/bench_loop.py            # demo model (ResNet18/16, 64x64), 200 steps
  python benchmarks/bench_loop.py --reps 5 --steps 300
  python benchmarks/bench_loop.py --checkpoint-every-epochs 1 --checkpoint-every 200
  python benchmarks/bench_loop.py --launch-ms 30 --width 1 --inputs cached \
      --variant cached-nothread:data.decoded_cache=True,prefetch_thread=False
"""
import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from unittest import mock

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# pylint: disable=wrong-import-position
import common
from affectjax import config as config_lib
from affectjax import kinds, parallel, runs, trainer
from affectjax.data import pipeline, sources

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench_config(args):
  c = config_lib.load_config_file(os.path.join(REPO, 'configs', 'mtl3.py:demo'))
  c.progress_bar = False
  c.log_every_steps = args.log_every
  if args.checkpoint_every:
    c.checkpoint_every_steps = args.checkpoint_every
  if args.checkpoint_every_epochs is not None:
    c.checkpoint_every_epochs = args.checkpoint_every_epochs
  c.eval_every_epochs = 1e9  # only the final evaluation, after the timed window
  c.data.worker_count = args.workers
  if args.width:
    c.model.width = args.width
  return c


@contextlib.contextmanager
def held_dispatch(ms: float):
  """Every train step built inside holds its calling thread `ms` more milliseconds, the GIL
  released (`time.sleep`): a stand-in for the host time a GPU step takes to launch."""
  if not ms:
    yield
    return
  original = runs.Run.train_step

  def train_step(self):
    step_fn = original(self)

    def held(state, batch):
      out = step_fn(state, batch)
      time.sleep(ms / 1e3)
      return out
    return held

  with mock.patch.object(runs.Run, 'train_step', train_step):
    yield


def loop_configs(config, index, specs) -> dict:
  """{name: loop config} of 'jpeg', 'cached' (data.decoded_cache, built here before any
  timing, as a previous run would have) or 'NAME:field=value,...' (overrides on jpeg's)."""
  configs = {}
  for name, overrides in common.named_settings(specs).items():
    c = config.copy_and_resolve_references()
    c.data.decoded_cache = name == 'cached'
    c.update_from_flattened_dict(overrides)
    if c.data.decoded_cache:
      sources.make_source(index, c.data)
    configs[name] = c
  return configs


def save_steps(config, steps_per_epoch: int, steps: int) -> set:
  """Steps at which the loop saves a checkpoint (the trainer's policy)."""
  return {s for s in range(1, steps + 1)
          if trainer.is_periodic_save(config, s, steps_per_epoch)}


def loop_images_per_second(config, steps: int) -> dict:
  """Runs the full loop for `steps` steps; steady-state images/s from its own log records.

  Returns the window's rate, the rate of the logging intervals without a checkpoint save,
  and the wall time the saves added (per save, relative to those intervals).
  """
  with tempfile.TemporaryDirectory() as workdir:
    c = config.copy_and_resolve_references()
    c.halt_after_steps = steps
    c.num_epochs = 1000.0  # a long schedule: the run is stopped by halt_after_steps
    trainer.train_and_evaluate(c, workdir)
    records = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  logged = [r for r in records if r['split'] == 'train']
  steps_per_epoch = int(round(logged[-1]['step'] / logged[-1]['epoch']))
  saves = save_steps(config, steps_per_epoch, steps)
  batch = config.global_batch_size
  first, last = logged[0], logged[-1]
  window = last['time'] - first['time']
  # A save at a logging step s is made after interval s is written, so its cost lands in the
  # next interval: an interval (a, b] is clean when no save step lies in [a, b].
  saves_in_window = sum(1 for s in saves if first['step'] <= s < last['step'])
  clean_steps, clean_time = 0, 0.0
  for a, b in zip(logged, logged[1:]):
    if not any(a['step'] <= s <= b['step'] for s in saves):
      clean_steps += b['step'] - a['step']
      clean_time += b['time'] - a['time']
  clean_rate = clean_steps * batch / clean_time
  window_steps = last['step'] - first['step']
  per_save = ((window - window_steps * batch / clean_rate) / saves_in_window
              if saves_in_window else float('nan'))
  return {'rate': window_steps * batch / window, 'clean_rate': clean_rate,
          'saves': saves_in_window, 'seconds_per_save': per_save,
          'input_wait': statistics.median(r['input_wait_fraction'] for r in logged[1:] or logged)}


def bare_step_images_per_second(config, batches: list, steps: int) -> float:
  """The same jitted step on the same batches held in host memory (compiled beforehand)."""
  run = runs.build_run(runs.resolve_config(config), data=None, steps_per_epoch=1000)
  step_fn = run.train_step()
  state = parallel.replicate(run.state, run.mesh)
  state, _ = step_fn(state, parallel.global_batch(batches[0], run.mesh))
  jax.block_until_ready(state)
  start = time.perf_counter()
  for i in range(steps):
    state, metrics = step_fn(state, parallel.global_batch(batches[i % len(batches)], run.mesh))
  jax.block_until_ready((state, metrics))
  return steps * config.global_batch_size / (time.perf_counter() - start)


def summarise(name: str, loops: list, bare: list) -> list:
  rate = statistics.median(r['rate'] for r in loops)
  clean = statistics.median(r['clean_rate'] for r in loops)
  b = statistics.median(bare)
  return [f'| full loop, {name}: data, step, logging, checkpoint saves | {rate:.1f} | '
          f'{rate / b:.3f} (target >= 0.95) |',
          f'| full loop, {name}, logging intervals without a save | {clean:.1f} | '
          f'{clean / b:.3f} |']


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=200)
  parser.add_argument('--reps', type=int, default=3)
  parser.add_argument('--log-every', type=int, default=20)
  parser.add_argument('--checkpoint-every', type=int, default=100,
                      help='checkpoint_every_steps (0 = the demo config\'s, 200)')
  parser.add_argument('--checkpoint-every-epochs', type=float, default=0.0,
                      help='checkpoint_every_epochs (the demo config saves every epoch, i.e. '
                      'every 123 steps: pass 1)')
  parser.add_argument('--workers', type=int, default=0)
  parser.add_argument('--inputs', default='jpeg,cached',
                      help='loop variants: jpeg (decode every epoch), cached (data.decoded_cache)')
  parser.add_argument('--variant', action='append', default=[], help='one more loop, as '
                      'NAME:field=value,... (config overrides on jpeg, Python literals)')
  parser.add_argument('--launch-ms', type=float, default=0.0,
                      help='host milliseconds each step call holds, GIL released (a GPU stand-in)')
  parser.add_argument('--width', type=int, default=0, help='model.width (0: the demo\'s)')
  args = parser.parse_args(argv)
  config = bench_config(args)
  index = kinds.load_index(config, 'train')
  iterator = pipeline.make_train_iterator(index, config.data,
                                          global_batch_size=config.global_batch_size,
                                          seed=config.seed)
  batches = [next(iterator) for _ in range(min(args.steps, 60))]
  variants = loop_configs(config, index, [*args.inputs.split(','), *args.variant])
  bare, loops = [], {name: [] for name in variants}
  for rep in range(args.reps):
    with held_dispatch(args.launch_ms):
      bare.append(bare_step_images_per_second(config, batches, args.steps))
      line = f'rep {rep}: bare step {bare[-1]:.1f} img/s'
      for name, c in variants.items():
        r = loop_images_per_second(c, args.steps)
        loops[name].append(r)
        line += (f'; loop ({name}) {r["rate"]:.1f} img/s ({r["clean_rate"]:.1f} without a '
                 f'save; {r["saves"]} saves, {1e3 * r["seconds_per_save"]:.0f} ms each)')
    print(line, flush=True)
  b = statistics.median(bare)
  print('\n| what | images/s (median) | of bare |\n|---|---|---|')
  print(f'| bare jitted step, batches in memory | {b:.1f} | 1.000 |')
  for name, results in loops.items():
    label = {'jpeg': 'JPEG decoded every epoch', 'cached': 'decoded-frame cache'}.get(name, name)
    print('\n'.join(summarise(label, results, bare)))
  for name, results in loops.items():
    per_save = statistics.median(r['seconds_per_save'] for r in results)
    ratios = ', '.join(f'{r["rate"] / x:.3f}' for r, x in zip(results, bare))
    print(f'\n{name}: wall time added per checkpoint save {1e3 * per_save:.0f} ms (median; '
          f'{results[0]["saves"]} saves in the {args.steps - args.log_every}-step window); '
          f'per-rep ratios loop / bare: {ratios}')
  print(f'\ndevices: {jax.device_count()} x {jax.devices()[0].platform}; model '
        f'{config.model.arch}/{config.model.width} at {config.data.image_size}px, batch '
        f'{config.global_batch_size}, {args.steps} loop steps, {args.reps} reps; log every '
        f'{config.log_every_steps} steps, checkpoint every {config.checkpoint_every_steps} '
        f'steps and every {config.checkpoint_every_epochs} epochs (0 = none); each step call '
        f'held {args.launch_ms} ms more, GIL released')
  print('command: ' + (common.command_line() if argv is None
                        else 'python benchmarks/bench_loop.py ' + ' '.join(argv)))


if __name__ == '__main__':
  main()
