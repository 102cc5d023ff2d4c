"""Benchmark: the multi-task train step against a plain single-head step and PyTorch eager.

Three training steps on the same ResNet, batch and image size, float32, timed interleaved:
  multi-task  `affectjax.train.train_step` (EXPR focal + AU BCE + VA CCC heads, 30% of each
              task's labels missing) under `parallel.data_parallel` on one device, donated state;
  plain       the same backbone with one Dense classifier, optax softmax cross-entropy and the
              same Adam, `jax.jit(..., donate_argnums=0)`: the reference for the multi-task cost;
  pytorch     the same network in PyTorch eager (tests/torch_resnet.py), channels-last, 2 threads,
              Adam, cross-entropy.
Training FLOPs per image come from XLA's cost analysis of the compiled steps (forward, backward
and optimizer), also for the extra `--flops-archs` (compiled only, not run).

  python benchmarks/bench_step.py --torch-omp-passive  # ResNet50 112x112 b32, ~10 min on 2 cores
  python benchmarks/bench_step.py --quick              # ResNet18 at 64x64: a smoke test
"""
import argparse
import datetime
import functools
import os
import platform
import statistics
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import common
from affectjax import config as config_lib
from affectjax import parallel, train
from affectjax.data import sampling
from affectjax.models import affect, preprocess

# The PyTorch reference network lives with the tests (one definition, also used to check weight
# conversion); it depends only on torch.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, 'tests'))

NUM_CLASSES = 7
DOCUMENTED_RESNET50_112_GFLOP = 6.07  # shared/docs/performance.md


def step_config(arch: str, width: int) -> ml_collections.ConfigDict:
  """The multi-task training config: float32, per-device BN, focal EXPR, BCE AU, CCC VA."""
  c = config_lib.base_config()
  c.model.arch = arch
  c.model.width = width
  c.model.dtype = 'float32'
  c.loss.expr = 'focal'
  c.loss.va = 'ccc'
  with c.unlocked():
    c.input_preprocessing = dict(preprocess.UNIT)
  return c


def multitask_batch(batch: int, size: int, missing: float = 0.3, seed: int = 0) -> dict:
  """A host batch (design.md layout) where each task misses about `missing` of its labels."""
  rng = np.random.default_rng(seed)
  expr = rng.integers(0, NUM_CLASSES, batch).astype(np.int32)
  expr[rng.random(batch) < missing] = -1
  au = rng.integers(0, 2, (batch, 12)).astype(np.int32)
  au[rng.random(batch) < missing] = -1
  va = rng.uniform(-1, 1, (batch, 2)).astype(np.float32)
  va[rng.random(batch) < missing] = -5.0
  return {'image': rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
          'expr': expr, 'au': au, 'va': va, 'valid': np.ones(batch, bool),
          'phase': np.full(batch, sampling.PHASE_JOINT, np.int32),
          'index': np.arange(batch, dtype=np.int32)}


class PlainClassifier(nn.Module):
  """The reference model: backbone -> one Dense of NUM_CLASSES logits."""
  backbone: nn.Module

  @nn.compact
  def __call__(self, images, train: bool = False):  # pylint: disable=redefined-outer-name
    return nn.Dense(NUM_CLASSES, name='fc')(self.backbone(images, train=train))


def plain_train_step(state: train.TrainState, batch: dict) -> tuple:
  """Single-head CE step, as in flax's imagenet example (no masks, no guards)."""
  images = preprocess.normalize(batch['image'], preprocess.UNIT, jnp.float32)

  def loss_fn(params):
    logits, new_vars = state.apply_fn({'params': params, 'batch_stats': state.batch_stats},
                                      images, train=True, mutable=['batch_stats'])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()
    return loss, new_vars['batch_stats']

  (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return state.apply_gradients(grads=grads, batch_stats=batch_stats), {'loss': loss}


def compile_step(jitted, state, batch, xla_options: dict | None = None) -> tuple:
  """Ahead-of-time compilation (with XLA's `xla_options`, e.g. {'xla_gpu_graph_min_graph_size':
  1}); returns (executable, XLA's cost analysis as a dict)."""
  compiled = jitted.lower(state, batch).compile(compiler_options=xla_options)
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jaxlibs return one dict per computation
    cost = cost[0]
  return compiled, dict(cost or {})


def build_multitask(arch: str, width: int, size: int, batch: int) -> tuple:
  """(compiled donated multi-task step, state, device batch, cost) on a 1-device mesh."""
  config = step_config(arch, width)
  tx = optax.adam(config.optim.learning_rate)
  model = affect.create_model(config.model, ('expr', 'au', 'va'), NUM_CLASSES)
  mesh = parallel.make_mesh(1)
  state = parallel.replicate(
      train.create_train_state(model, tx, 0, (size, size, 3)), mesh)
  step = parallel.data_parallel(
      functools.partial(train.train_step, config=config,
                        lr_schedule=optax.constant_schedule(config.optim.learning_rate),
                        model_inputs=train.image_inputs),
      mesh, donate_state=True)
  device_batch = parallel.global_batch(multitask_batch(batch, size), mesh)
  compiled, cost = compile_step(step, state, device_batch)
  return compiled, state, device_batch, cost


def build_plain(arch: str, width: int, size: int, batch: int) -> tuple:
  """(compiled donated plain CE step, state, device batch, cost) with the same backbone."""
  config = step_config(arch, width)
  model = PlainClassifier(affect.create_backbone(config.model))
  state = train.create_train_state(model, optax.adam(config.optim.learning_rate),
                                   0, (size, size, 3))
  host = multitask_batch(batch, size)
  device_batch = jax.device_put({'image': host['image'],
                                 'label': np.maximum(host['expr'], 0)})
  compiled, cost = compile_step(jax.jit(plain_train_step, donate_argnums=0), state,
                                device_batch)
  return compiled, state, device_batch, cost


def jax_runner(compiled, state, batch, steps: int):
  """A blocking callable running `steps` donated steps; it carries the state between calls."""
  holder = {'state': state}

  def run():
    for _ in range(steps):
      holder['state'], metrics = compiled(holder['state'], batch)
    jax.block_until_ready((holder['state'], metrics))
  return run


def torch_runner(arch: str, width: int, size: int, batch: int, steps: int, threads: int):
  """The same network and step in PyTorch eager: channels-last, Adam, cross-entropy."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch_resnet  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(threads)
  torch.manual_seed(0)
  net = torch_resnet.TorchResNet(affect.arch_depth(arch), width, num_classes=NUM_CLASSES)
  net = net.to(memory_format=torch.channels_last).train()
  opt = torch.optim.Adam(net.parameters(), lr=1e-3)
  images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
  images = images.to(memory_format=torch.channels_last)
  labels = torch.randint(0, NUM_CLASSES, (batch,))

  def run():
    for _ in range(steps):
      x = (images.float() - 127.5) / 127.5  # normalised in the step, as the JAX steps do
      opt.zero_grad(set_to_none=True)
      loss = torch.nn.functional.cross_entropy(net.fc(net(x)), labels)
      loss.backward()
      opt.step()
  return run


def flops_rows(args, timed_costs: dict) -> list:
  """Rows (arch, step, GFLOP/image, GB accessed/image, vs documented) for the FLOP table."""
  costs = dict(timed_costs)
  for arch in args.flops_archs:
    if arch != args.arch:
      print(f'compiling the {arch} multi-task step for its cost analysis ...', flush=True)
      costs[(arch, 'multi-task')] = build_multitask(arch, args.width, args.image_size,
                                                    args.batch)[3]
  rows = []
  for (arch, name), cost in costs.items():
    gflop = cost.get('flops', float('nan')) / args.batch / 1e9
    gbytes = cost.get('bytes accessed', float('nan')) / args.batch / 1e9
    documented = (f'{gflop / DOCUMENTED_RESNET50_112_GFLOP:.3f}x of '
                  f'{DOCUMENTED_RESNET50_112_GFLOP}'
                  if (arch, args.image_size, args.width) == ('resnet50', 112, 64) else '')
    rows.append((arch, f'{args.image_size}x{args.image_size}', name, f'{gflop:.3f}',
                 f'{gbytes:.3f}', documented))
  return rows


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--arch', default='resnet50')
  p.add_argument('--width', type=int, default=64)
  p.add_argument('--image-size', type=int, default=112)
  p.add_argument('--batch', type=int, default=32)
  p.add_argument('--reps', type=int, default=5, help='timed rounds (each runs every step)')
  p.add_argument('--steps', type=int, default=1, help='train steps per timed call')
  p.add_argument('--torch-threads', type=int, default=2)
  p.add_argument('--no-torch', action='store_true')
  p.add_argument('--torch-omp-passive', action='store_true',
                 help='OMP_WAIT_POLICY=PASSIVE for PyTorch: its OpenMP threads spin while they '
                      'wait, which collapses its throughput when other processes share the cores')
  p.add_argument('--flops-archs', default='resnet18,resnet50',
                 help='archs whose multi-task step is also compiled for its FLOPs')
  p.add_argument('--quick', action='store_true',
                 help='ResNet18 at 64x64, 5 steps per call, no extra FLOP compilations')
  args = p.parse_args(argv)
  if args.quick:
    args.arch, args.image_size, args.steps, args.flops_archs = 'resnet18', 64, 5, ''
  args.flops_archs = [a for a in args.flops_archs.split(',') if a]
  return args


def main(argv=None):
  args = parse_args(argv)
  print(f'jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs, '
        f'{platform.machine()}; {datetime.datetime.now():%Y-%m-%d %H:%M}', flush=True)
  shape = (args.arch, args.width, args.image_size, args.batch)
  print(f'compiling the {args.arch} multi-task and plain steps ...', flush=True)
  mt_exe, mt_state, mt_batch, mt_cost = build_multitask(*shape)
  plain_exe, plain_state, plain_batch, plain_cost = build_plain(*shape)
  runs = {'multi-task': jax_runner(mt_exe, mt_state, mt_batch, args.steps),
          'plain': jax_runner(plain_exe, plain_state, plain_batch, args.steps)}
  if not args.no_torch:
    if args.torch_omp_passive:
      if 'torch' in sys.modules:  # libgomp reads the variable when torch loads it
        raise RuntimeError('torch was imported before OMP_WAIT_POLICY could be set')
      os.environ['OMP_WAIT_POLICY'] = 'PASSIVE'
    runs['pytorch'] = torch_runner(*shape, args.steps, args.torch_threads)
  print(f'timing {", ".join(runs)}: {args.reps} interleaved rounds of {args.steps} step(s) '
        'after one warm-up call each ...', flush=True)
  wall, cpu = common.interleaved_times(runs, args.reps)

  images = args.batch * args.steps
  rows = []
  for name in runs:
    ips = [images / t for t in wall[name]]
    ratios = [common.paired_ratio(times, name, ref)
              for times in (wall, cpu) for ref in ('plain', 'pytorch') if ref in runs]
    rows.append((name, f'{statistics.median(ips):.2f}', f'{min(ips):.2f}-{max(ips):.2f}',
                 f'{statistics.median(cpu[name]) / images * 1e3:.0f}',
                 *(f'{r:.3f}' for r in ratios)))
  refs = [f'{kind} vs {ref}' for kind in ('wall', 'cpu') for ref in ('plain', 'pytorch')
          if ref in runs]
  print(f'\nTrain step, {args.arch} (width {args.width}) at {args.image_size}x{args.image_size}, '
        f'batch {args.batch}, float32; medians of {args.reps} interleaved rounds of {args.steps} '
        'step(s); ratios are medians of per-round throughput ratios (shared machine: noisy)')
  print(common.format_table(
      ('step', 'img/s (median)', 'img/s (min-max)', 'CPU ms/img', *refs), rows))
  print('\nTraining FLOPs per image (XLA cost analysis of the whole compiled step)')
  print(common.format_table(
      ('arch', 'image', 'step', 'GFLOP/image', 'GB accessed/image', 'vs documented'),
      flops_rows(args, {(args.arch, 'multi-task'): mt_cost, (args.arch, 'plain'): plain_cost})))
  print(f'\ncommand: {common.command_line()}')


if __name__ == '__main__':
  main()
