"""Accelerator check: affectjax's steps, loop and temporal encoders against PyTorch, one call.

Each figure has its reference from the same run (medians of timed windows after warm-up,
compile time apart). Parts (`--parts`):
  step/eval  the project's multi-task train step (`Run.train_step`: masked CE + BCE + CCC, Adam,
             donated state) and eval step, bf16, 112x112, ResNet50 and ResNet18, per-device batch
             256 and the largest of 512 / 1024 that fits: images/s, ms/step, the host's ms to
             queue a step, TFLOP/s (XLA's FLOP count of the lowered steps, taken on the CPU) and
             its fraction of the bf16 matrix-product rate measured in the run; against PyTorch
             (torchvision's ResNet; channels_last, bf16 autocast, Adam), eager, `torch.compile`.
  loop       `trainer.train_and_evaluate` (grain workers over the synthetic JPEG tree, and the
             decoded cache) against the bare step on the same batches; input CPU per image.
  profile    a `jax.profiler` trace of the first train step's steady state, summarised by
             benchmarks/utilisation.py: device busy and idle time, time by kind of operation.
  temporal   GRU / LSTM / Transformer training steps on 250 x 512 segments against nn.GRU /
             nn.LSTM / nn.TransformerEncoder: segments/s and frames/s.
`--xla-variant NAME:xla_option=VALUE,...` times the first network's train and eval steps again
under XLA options (e.g. `xla_gpu_graph_min_graph_size=1`), beside the default rows; what such an
option does to the GPU program can be seen without a GPU with benchmarks/deviceless.py.
Recorded checks: compilations in the timed windows (0), donation warnings (0), timed steps under
`jax.transfer_guard('disallow')`, and the first loss in bf16 against float32.

  python benchmarks/accelerator.py --out results/          # the GPU check (about 8 minutes)
  python benchmarks/accelerator.py --smoke --out /tmp/acc  # every part, tiny, on the CPU
Writes `accelerator.json` and `accelerator.md` under --out after each part.
"""
import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [HERE, os.path.join(REPO, 'tests')]  # bench_loop; the PyTorch reference ResNet

# pylint: disable=wrong-import-position
import bench_loop
import accelerator_tables
import bench_step
import common
import utilisation
import torch_refs
from affectjax import kinds, parallel, runs
from affectjax import config as config_lib
from affectjax.data import iterator as iterator_lib, pipeline
from affectjax.models import temporal

COMPILES = []  # backend compilations seen (jax.monitoring), for the recompilation check

jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **_: COMPILES.append(duration)
    if event == '/jax/core/compile/backend_compile_duration' else None)


@contextlib.contextmanager
def steady_state(checks: dict, where: str):
  """The timed windows: counts compilations and donation warnings, forbids implicit
  host transfers; records them in `checks[where]`."""
  before = len(COMPILES)
  with warnings.catch_warnings(record=True) as caught, jax.transfer_guard('disallow'):
    warnings.simplefilter('always')
    try:
      yield
      guard = 'ok'
    except Exception as e:  # pylint: disable=broad-except  (recorded, then re-raised)
      guard = f'{type(e).__name__}: {e}'[:300]
      raise
    finally:
      checks[where] = {'compilations': len(COMPILES) - before, 'transfer_guard': guard,
                       'donation_warnings': sum('donat' in str(w.message) for w in caught)}


def image_config(args, arch: str, batch: int, dtype: str = 'bfloat16', variant: str = ''):
  """configs/mtl3.py (its `variant`) at the benchmark's network, image size, batch, dtype."""
  c = config_lib.load_config_file(
      os.path.join(REPO, 'configs', 'mtl3.py' + (f':{variant}' if variant else '')))
  c.model.arch, c.model.width, c.data.image_size = arch, args.width, args.image_size
  c.dtype, c.global_batch_size = dtype, batch * jax.device_count()
  c.eval_batch_size = c.global_batch_size
  c.num_devices = 0
  return c


def build(config):
  """(run, replicated state, device batch) of a config's real train and eval steps."""
  run = runs.build_run(runs.resolve_config(config), data=None, steps_per_epoch=1000)
  return (run, parallel.replicate(run.state, run.mesh),
          parallel.global_batch(host_batch(config), run.mesh))


def host_batch(config) -> dict:
  """A global host batch of the config's size, image size and classes (bench_step's)."""
  host = bench_step.multitask_batch(config.global_batch_size, config.data.image_size)
  host['expr'] = np.minimum(host['expr'], config.num_expr_classes - 1)
  return host


def jax_image_rows(args, arch: str, batch: int, checks: dict, xla: str = '') -> dict:
  """Train and eval step figures of one (arch, per-device batch), compiled with the XLA
  options of `args.xla_variants[xla]` where given."""
  config = image_config(args, arch, batch, args.dtype, args.variant)
  start = time.perf_counter()  # the run's initial state: one compiled program, then replicated
  run, state, device_batch = build(config)
  jax.block_until_ready(state)
  out, options, where = ({'init_s': time.perf_counter() - start}, args.xla_variants.get(xla),
                         f' {xla}' if xla else '')
  for name, fn in (('train', run.train_step()), ('eval', run.eval_step())):
    start = time.perf_counter()
    compiled, _ = bench_step.compile_step(fn, state, device_batch, options)
    compile_s = time.perf_counter() - start
    holder = {'state': state}

    def call(compiled=compiled, name=name, issued=None):
      start = time.perf_counter()
      for _ in range(args.steps):
        result = compiled(holder['state'], device_batch)
        if name == 'train':
          holder['state'] = result[0]
      if issued is not None:  # the host's time to queue a step (far below the step's time)
        issued.append((time.perf_counter() - start) / args.steps)
      jax.block_until_ready(result)

    if name == 'train' and not xla:  # the first step's loss (initial state): the bf16 check's
      out['first_loss'] = float(jax.device_get(
          compiled(jax.tree_util.tree_map(jnp.copy, state), device_batch)[1]['loss']))
    call()  # warm-up outside the guarded window
    with steady_state(checks, f'{name} {arch} b{batch}{where}'):
      times = common.interleaved_times({'jax': call}, args.reps, 0)[0]['jax']
    if name == 'train' and 'profile' in args.parts and not args.profiled:  # the first only
      args.profiled = True
      out['profile'] = utilisation.profile(call, args.steps, os.path.join(args.out, 'trace'))
    issued = []
    for _ in range(args.reps):
      call(issued=issued)
    step_s, images = statistics.median(times) / args.steps, config.global_batch_size
    out[name] = {'images_per_s': images / step_s, 'step_ms': step_s * 1e3,
                 'host_ms': statistics.median(issued) * 1e3,
                 'compile_s': compile_s,
                 'spread': [images * args.steps / t for t in (max(times), min(times))]}
    state = holder['state']
  return out


def flops_models(args) -> dict:
  """{arch: {'train', 'eval': [FLOPs per step, per image]}} of one device's steps, by XLA's cost
  analysis on the CPU (a GPU's counts no cuDNN FLOPs); lowered at 2 and 4 images (linear)."""
  models = {}
  for arch in args.archs:
    config = image_config(args, arch, 2, args.dtype, args.variant)
    run, state, _ = build(config)
    counts = {}
    for b in (2, 4):
      host = bench_step.multitask_batch(b * jax.device_count(), config.data.image_size)
      device_batch = parallel.global_batch(host, run.mesh)
      for name, fn in (('train', run.train_step()), ('eval', run.eval_step())):
        cost = fn.lower(state, device_batch).cost_analysis()
        counts.setdefault(name, []).append(
            dict(cost[0] if isinstance(cost, list) else cost)['flops'] / jax.device_count())
    models[arch] = {k: [2 * v[0] - v[1], (v[1] - v[0]) / 2] for k, v in counts.items()}
  return models


def start_flops_models(args):
  """flops_models in a CPU process beside the GPU timings (returns a function that waits)."""
  if jax.devices()[0].platform == 'cpu':
    return lambda: flops_models(args)
  job = subprocess.Popen([sys.executable, __file__, '--out', args.out, '--flops-only', '--archs',
                          ','.join(args.archs)] + ['--smoke'] * args.smoke, text=True,
                         stdout=subprocess.PIPE, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  return lambda: json.loads(job.communicate()[0].strip().splitlines()[-1])


def largest_fitting(args, arch: str, checks: dict) -> dict:
  """Figures at the first per-device batch of --batches, then at the largest of the others
  that fits (tried largest first; one that does not fit is recorded as such)."""
  results = {}
  first, *larger = args.batches
  for batch in [first] + sorted(larger, reverse=True):
    try:
      results[batch] = jax_image_rows(args, arch, batch, checks)
    except Exception as e:  # pylint: disable=broad-except
      if 'RESOURCE_EXHAUSTED' not in str(e) and 'out of memory' not in str(e).lower():
        raise
      results[batch] = {'does_not_fit': str(e).splitlines()[0][:200]}
      continue
    if batch != first:
      break
  return results


def bf16_loss_check(args, timed_loss: float) -> dict:
  """The first step's loss (same state and batch) in bf16 and float32: one of them from the
  timed step (bf16 on accelerators; --smoke times float32, the CPU's 'auto')."""
  other = 'float32' if args.dtype == 'bfloat16' else 'bfloat16'
  run, state, device_batch = build(image_config(args, args.archs[-1], args.batches[0], other,
                                                args.variant))
  _, metrics = run.train_step()(state, device_batch)
  losses = {other: float(jax.device_get(metrics['loss'])),
            'float32' if other == 'bfloat16' else 'bfloat16': timed_loss}
  gap = abs(losses['bfloat16'] - losses['float32']) / max(abs(losses['float32']), 1e-12)
  return {**losses, 'relative_gap': gap, 'tolerance': 0.02, 'ok': gap <= 0.02}


def loop_part(args) -> dict:
  """The full loop (JPEG workers, decoded cache) against the bare step; input cores needed."""
  # The demo's synthetic set (at 112 px) with the benchmark's network; --smoke: the test variant
  # as it is (tests/test_docs.py trains the same programs: the compilation cache has them).
  config = (config_lib.load_config_file(os.path.join(REPO, 'configs', 'mtl3.py:test'))
            if args.smoke else image_config(args, args.archs[0], args.batches[0], args.dtype,
                                            'demo'))
  config.progress_bar, config.log_every_steps = False, max(args.loop_steps // 10, 1)
  config.checkpoint_every_steps, config.checkpoint_every_epochs = 10**9, 0.0
  config.eval_every_epochs, config.data.decoded_cache = 1e9, False
  config.data.cache_dir = args.cache_dir
  index = kinds.load_index(config, 'train')
  single = config.data.copy_and_resolve_references()
  single.worker_count, single.read_threads = 0, 0
  iterator = pipeline.make_train_iterator(index, single, global_batch_size=config.global_batch_size,
                                          seed=0)
  next(iterator)
  cpu = time.process_time()
  batches = [next(iterator) for _ in range(args.input_batches)]
  cpu_per_image = (time.process_time() - cpu) / (args.input_batches * config.global_batch_size)
  bare = bench_loop.bare_step_images_per_second(config, batches, args.loop_steps)
  start, mesh = time.perf_counter(), parallel.make_mesh()
  placed = [parallel.global_batch(b, mesh) for b in batches]  # the transfers' host time
  out = {'bare_images_per_s': bare, 'input_cpu_ms_per_image': cpu_per_image * 1e3,
         'put_ms_per_batch': 1e3 * (time.perf_counter() - start) / len(batches),
         'input_cores_at_bare_rate': bare * cpu_per_image,
         'workers': iterator_lib.worker_count(config.data)}
  jax.block_until_ready(placed)
  for name, c in bench_loop.loop_configs(config, index, args.loop_inputs).items():
    r = bench_loop.loop_images_per_second(c, args.loop_steps)
    fed = input_images_per_second(c, index, args.loop_steps)
    out[name] = {'images_per_s': r['rate'], 'of_bare': r['rate'] / bare,
                 'input_wait': r['input_wait'], 'input_only_images_per_s': fed}
  return out


def input_images_per_second(config, index, steps: int) -> float:
  """The trainer's input alone: workers, batching and transfers to the devices, no step."""
  iterator = pipeline.make_train_iterator(index, config.data, seed=0,
                                          global_batch_size=config.global_batch_size)
  batches = parallel.prefetch_to_mesh(iterator, parallel.make_mesh(), config.prefetch_to_device,
                                      iterator.get_state, config.prefetch_thread)
  for _ in range(min(10, steps)):  # workers started, queues full
    jax.block_until_ready(next(batches)[0])
  start = time.perf_counter()
  for _ in range(steps):
    batch, _ = next(batches)
  jax.block_until_ready(batch)  # (the generator's finalisation stops a prefetch_thread)
  return steps * config.global_batch_size / (time.perf_counter() - start)


def temporal_part(args, checks: dict) -> dict:
  """Training steps of each encoder over [batch, length, features] segments, JAX and PyTorch."""
  b, length, dim, hidden = args.segments, args.length, args.features, args.hidden
  rng = np.random.default_rng(0)
  x = rng.standard_normal((b, length, dim), np.float32)
  target = rng.standard_normal((b, length, hidden), np.float32)
  results = {}
  for name, layers in (('gru', 1), ('lstm', 1), ('transformer', args.transformer_layers)):
    encoder = temporal.ENCODERS[name](hidden, layers, 0.0, 4, hidden)
    mask = jnp.ones((b, length), bool)
    params = encoder.init(jax.random.PRNGKey(0), x, mask, False)
    tx = optax.adam(1e-4)

    def step(params, opt_state, x, y, encoder=encoder, tx=tx):
      def loss_fn(p):
        return jnp.mean((encoder.apply(p, x, mask, False).astype(jnp.float32) - y) ** 2)
      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    jitted = jax.jit(step, donate_argnums=(0, 1))
    holder = {'p': params, 'o': tx.init(params)}
    xs, ys = jax.device_put(x), jax.device_put(target)

    def call(jitted=jitted):
      for _ in range(args.steps):
        holder['p'], holder['o'], loss = jitted(holder['p'], holder['o'], xs, ys)
      jax.block_until_ready(loss)

    start = time.perf_counter()
    call()
    compile_s = time.perf_counter() - start
    with steady_state(checks, f'temporal {name}'):
      times = common.interleaved_times({'jax': call}, args.reps, 0)[0]['jax']
    jax_rate = b * args.steps / statistics.median(times)
    torch_rate = torch_refs.temporal_segments_per_second(args, name, layers, x, target)
    results[name] = {'segments_per_s': jax_rate, 'frames_per_s': jax_rate * length,
                     'compile_s': compile_s, 'torch_segments_per_s': torch_rate,
                     'vs_torch': jax_rate / torch_rate}
  return results


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--out', required=True, help='folder for accelerator.json and .md')
  p.add_argument('--parts', default='step,eval,profile,loop,temporal')
  p.add_argument('--smoke', action='store_true', help='every part at tiny sizes (CPU, seconds)')
  p.add_argument('--archs', default='resnet50,resnet18')
  p.add_argument('--batches', default='256,512,1024',
                 help='per-device batches: the first, then the largest of the others that fits')
  p.add_argument('--no-torch-compile', action='store_true')
  p.add_argument('--loop-variant', action='append', default=[], help='an extra JPEG loop, as '
                 'NAME:data.FIELD=VALUE,... (Python literals: w4:data.worker_count=4, True)')
  p.add_argument('--xla-variant', action='append', default=[], help='the step part again, first '
                 'network and batch, under XLA options: NAME:xla_option=VALUE,... (literals)')
  p.add_argument('--budget', type=float, default=480, help='seconds; torch.compile runs last, '
                 'where more than 150 s of it are left')
  p.add_argument('--flops-only', action='store_true', help=argparse.SUPPRESS)
  p.add_argument('--cache-dir', default=os.path.join(tempfile.gettempdir(), 'affectjax-bench'),
                 help='data.cache_dir of the loop part (synthetic set, decoded cache)')
  args = p.parse_args(argv)
  args.archs, args.batches = args.archs.split(','), [int(b) for b in args.batches.split(',')]
  args.width, args.image_size, args.steps, args.reps = 64, 112, 5, 5
  args.loop_steps, args.input_batches, args.variant, args.dtype = 500, 20, '', 'bfloat16'
  args.transformer_layers = 4  # the ABAW4 winners' encoder
  args.matmul_size, args.profiled = 8192, False
  args.loop_inputs = ('jpeg', 'cached', *args.loop_variant)
  args.xla_variants = common.named_settings(args.xla_variant)
  args.segments, args.length, args.features, args.hidden = 32, 250, 512, 1024
  if args.smoke:  # the test variant's network, image size and batch (on one device)
    args.archs, args.batches, args.width, args.image_size = ['resnet18'], [16], 4, 32
    args.steps, args.reps, args.loop_steps, args.input_batches = 2, 2, 6, 2
    args.segments, args.length, args.features, args.hidden = 2, 8, 16, 16
    args.variant, args.dtype, args.transformer_layers = 'test', 'auto', 1
    args.matmul_size = 256
    args.loop_inputs = ('cached', *args.loop_variant)  # no JPEG decoding on the CPU step
    args.no_torch_compile = True
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  parts, start = set(args.parts.split(',')), time.perf_counter()
  if args.flops_only:
    print(json.dumps(flops_models(args)))
    return {}
  os.makedirs(args.out, exist_ok=True)
  if not jax.config.jax_compilation_cache_dir:  # the loop and the bare step compile once
    jax.config.update('jax_compilation_cache_dir', os.path.join(args.cache_dir, 'jax'))
  d = jax.devices()[0]
  result = {'date': f'{datetime.datetime.now():%Y-%m-%d %H:%M}', 'command': common.command_line(),
            'device': f'{jax.device_count()} x {d.device_kind} ({d.platform}), {os.cpu_count()} '
                      f'CPUs, {platform.machine()}', 'jax': jax.__version__, 'smoke': args.smoke,
            'dtype': args.dtype, 'checks': {}}
  if parts & {'step', 'eval'}:
    result['step'], flops = {}, start_flops_models(args)
    for arch in args.archs:
      print(f'[step] {arch}: JAX, per-device batches {args.batches} ...', flush=True)
      by_batch = result['step'][arch] = largest_fitting(
          args, arch, result['checks'].setdefault('steady_state', {}))
      for batch, r in by_batch.items():
        if 'does_not_fit' not in r:
          print(f'[step] {arch}: PyTorch eager, batch {batch} ...', flush=True)
          r['torch'] = torch_refs.image_rates(args, arch, batch)
          save(args, result)
    for name in args.xla_variants:  # each against the default rows above
      print(f'[step] {args.archs[0]}, batch {args.batches[0]}, XLA variant {name} ...', flush=True)
      result.setdefault('xla_variants', {})[name] = jax_image_rows(
          args, args.archs[0], args.batches[0], result['checks']['steady_state'], name)
      save(args, result)
    first = result['step'][args.archs[-1]][args.batches[0]]['first_loss']
    result['checks']['bf16_vs_float32_loss'] = bf16_loss_check(args, first)
    result['matmul_tflops'] = utilisation.matmul_tflops(args.matmul_size, args.reps)
    utilisation.add_tflops(result['step'], flops(), result['matmul_tflops'])
    save(args, result)
  if 'loop' in parts:
    print(f'[loop] full loop against the bare step ... ({time.perf_counter() - start:.0f} s)',
          flush=True)
    result['loop'] = loop_part(args)
    save(args, result)
  if 'temporal' in parts:
    print(f'[temporal] GRU, LSTM, Transformer ... ({time.perf_counter() - start:.0f} s)',
          flush=True)
    result['temporal'] = temporal_part(args, result['checks'].setdefault('steady_state', {}))
  # torch.compile takes minutes per network and shape: last, at the first batch, in the time
  # left of --budget (the figures so far are saved).
  for arch in result.get('step', {}) if not args.no_torch_compile else ():
    if time.perf_counter() - start > args.budget - 150:
      print(f'[torch.compile] {arch}: skipped, over the time budget', flush=True)
      continue
    print(f'[torch.compile] {arch}, batch {args.batches[0]} ...', flush=True)
    result['step'][arch][args.batches[0]]['torch'].update(
        torch_refs.image_rates(args, arch, args.batches[0], (True,)))
    save(args, result)
  result['seconds'] = time.perf_counter() - start
  print(save(args, result))
  print(f'wrote {args.out}/accelerator.json and accelerator.md in {result["seconds"]:.0f} s')
  return result


def save(args, result: dict) -> str:
  """Writes the JSON and the tables so far (after each part: a run cut short keeps them)."""
  with open(os.path.join(args.out, 'accelerator.json'), 'w') as f:
    json.dump(result, f, indent=1, default=str)
  text = accelerator_tables.tables(result)
  with open(os.path.join(args.out, 'accelerator.md'), 'w') as f:
    f.write(text)
  return text


if __name__ == '__main__':
  main()
