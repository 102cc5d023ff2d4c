"""The GPU program of the project's steps, compiled without a GPU: what the host launches per step.

XLA can compile for a GPU it does not have (deviceless compilation: jax's CUDA plugin installed,
a target description in place of the device). This compiles the project's real train and eval
steps (`Run.train_step` / `Run.eval_step` of configs/mtl3.py, bf16, as
benchmarks/accelerator.py times them) for an H200 or H100 under variants of XLA's options, and
reads XLA's dumps of each:
  - the operations the host launches per step: the top level of the thunk sequence after XLA's
    passes (command buffers, i.e. CUDA graphs, each one launch; cuDNN convolutions; single
    kernels; copies). On the GPU each costs host time, every step;
  - what runs inside the command buffers (kernels, copies);
  - from the optimised HLO: conditionals and while loops (a conditional blocks the host), the
    copies and their bytes, and an estimate of the bytes each kind of operation moves (its
    operands plus its results).
No timings: those need the GPU (benchmarks/accelerator.py). This shows, on any machine, what
an option or a change of the step does to the program the GPU would run.

Needs the CUDA plugin of the installed jax, in a virtualenv of its own (about 5 GB):
  pip install "jax[cuda13]==$(python -c 'import jax; print(jax.__version__)')" -e .
  python benchmarks/deviceless.py --out /tmp/deviceless                # ResNet50, b256, H200
  python benchmarks/deviceless.py --out /tmp/d --variant 'g1:xla_gpu_graph_min_graph_size=1'
  python benchmarks/deviceless.py --out /tmp/d --config-variant 'hwio:model.kernel_layout=HWIO'
Writes `deviceless.json` and `deviceless.md` under --out. About 30 s per variant and step on
two cores for ResNet50.
"""
import os

if __name__ == '__main__':  # before jax loads its CUDA plugin: no device to check the CUDA
  os.environ.setdefault('JAX_SKIP_CUDA_CONSTRAINTS_CHECK', '1')  # libraries' versions against
  os.environ.setdefault('CUDA_VISIBLE_DEVICES', '-1')

# pylint: disable=wrong-import-position
import argparse
import collections
import dataclasses
import datetime
import glob
import importlib.metadata
import itertools
import json
import re
import sys
import tempfile
import time

import jax
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import accelerator
import common
from affectjax import parallel, runs

# XLA's description of the target GPUs (gpu_device_info of a GpuTargetConfig, text format).
# cuDNN's version is the installed one's.
TARGETS = {
    'h200': dict(name='NVIDIA H200', memory=150_000_000_000, bandwidth=4_800_000_000_000),
    'h100': dict(name='NVIDIA H100 80GB HBM3', memory=84_929_347_584,
                 bandwidth=3_352_320_000_000),
}
TARGET_CONFIG = """gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: {bandwidth} l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: {memory} shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 }} registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: {cudnn[0]} minor: {cudnn[1]} }}
runtime_version {{ major: 13 minor: 0 }}
device_description_str: "{name}"
"""
BYTES = {'pred': 1, 's8': 1, 'u8': 1, 'bf16': 2, 'f16': 2, 's16': 2, 'u16': 2, 'f32': 4,
         's32': 4, 'u32': 4, 'f64': 8, 's64': 8, 'u64': 8}
SHAPE = re.compile(r'\b(' + '|'.join(BYTES) + r')\[([0-9,]*)\]')
INSTRUCTION = re.compile(r'\s*(?:ROOT )?%(\S+) = (\(.*?\)|\S+) ([\w-]+)\((.*?)\)(?:, |$)')


def cudnn_version() -> tuple:
  """(major, minor) of the installed cuDNN wheel (it decides which fused convolutions XLA
  emits); the report records it."""
  try:
    return tuple(int(v) for v in importlib.metadata.version('nvidia-cudnn-cu13').split('.')[:2])
  except importlib.metadata.PackageNotFoundError as e:
    raise SystemExit('deviceless: no nvidia-cudnn-cu13 wheel; install the CUDA plugin of this '
                     'jax (see the docstring)') from e


def shape_bytes(text: str) -> int:
  """Bytes of the arrays in an HLO shape (a tuple's elements summed)."""
  return sum(int(np.prod([int(d) for d in dims.split(',') if d], dtype=np.int64)) * BYTES[t]
             for t, dims in SHAPE.findall(text))


def thunk_counts(text: str) -> dict:
  """From XLA's `thunk_sequence_after_thunk_passes.txt`: {'host': kind counts at the top level
  (each launched by the host every step), 'in_graphs': kind counts inside command buffers}."""
  host, nested = collections.Counter(), collections.Counter()
  for line in text.splitlines():
    m = re.match(r'(\s*)\d+: (k\w+)', line)
    if m:
      (nested if m.group(1) else host)[m.group(2)] += 1
  return {'host': dict(host), 'in_graphs': dict(nested)}


def hlo_summary(text: str) -> dict:
  """From an optimised HLO module: conditionals and while loops anywhere in it; of the entry
  computation's launched operations, the copies (and the bytes they write) and an estimate of
  the bytes each kind moves (its operands read and its results written)."""
  entry = text[text.index('\nENTRY'):]
  entry = entry[:entry.index('\n}') + 1]
  shapes, moved, count = {}, collections.Counter(), collections.Counter()
  written = collections.Counter()
  for line in entry.splitlines():
    m = INSTRUCTION.match(line)
    if not m:
      continue
    name, shape, op, operands = m.groups()
    shapes[name] = shape
    if op in ('parameter', 'get-tuple-element', 'tuple', 'bitcast', 'constant'):
      continue  # no kernel
    if op == 'fusion':  # XLA names fusions by their kind and root: input_reduce_fusion.3
      op = re.sub(r'(\.\d+)+$', '', name)
    elif op == 'custom-call':
      op = re.search(r'custom_call_target="([^"]+)"', line).group(1)
    written[op] += shape_bytes(shape)
    moved[op] += shape_bytes(shape) + sum(  # (XLA marks every fifth operand /*index=5*/)
        shape_bytes(shapes.get(a, '')) for a in re.findall(r'%([^\s,()]+)', operands))
    count[op] += 1
  return {'conditionals': len(re.findall(r' conditional\(', text)),
          'while_loops': len(re.findall(r' while\(', text)),
          'copies': count['copy'], 'copied_bytes': written['copy'],
          'launched_ops': sum(count.values()), 'estimated_bytes': sum(moved.values()),
          'bytes_by_kind': {k: [count[k], v] for k, v in moved.most_common()}}


def abstract_step_inputs(config, mesh) -> tuple:
  """(run on `mesh`, abstract replicated state, abstract batch split over the mesh)."""
  run = runs.build_run(runs.resolve_config(config), data=None, steps_per_epoch=1000)
  run = dataclasses.replace(run, mesh=mesh)
  rep, split = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  state = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), jax.numpy.result_type(x), sharding=rep),
      run.state)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=split)
           for k, v in accelerator.host_batch(config).items()}
  return run, state, batch


def compile_and_read(lowered, options: dict, dump: str, name: str) -> dict:
  """Compiles with XLA `options` (dumping to `dump`) and summarises the dumps."""
  start = time.perf_counter()
  lowered.compile(compiler_options=dict(options, xla_dump_to=dump))
  seconds = time.perf_counter() - start
  def read(pattern):
    found = sorted(glob.glob(os.path.join(dump, f'*jit_{name}.{pattern}')))
    if not found:
      raise FileNotFoundError(f'no XLA dump {pattern} of {name} under {dump}')
    with open(found[-1]) as f:
      return f.read()
  thunks = thunk_counts(read('thunk_sequence_after_thunk_passes.txt') if glob.glob(
      os.path.join(dump, f'*jit_{name}.thunk_sequence_after_thunk_passes.txt'))
                        else read('thunk_sequence.txt'))  # (no passes: no command buffers)
  return {'compile_s': seconds, 'host_launches': sum(thunks['host'].values()), **thunks,
          **hlo_summary(read('*gpu_after_optimizations.txt'))}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--out', required=True, help='folder for deviceless.json and .md')
  p.add_argument('--target', default='h200', choices=sorted(TARGETS))
  p.add_argument('--archs', default='resnet50')
  p.add_argument('--batch', type=int, default=256, help='images per GPU')
  p.add_argument('--steps', default='train,eval', help='train and/or eval')
  p.add_argument('--variant', action='append', default=[],
                 help="NAME:xla_option=VALUE,... (Python literals), besides 'default'")
  p.add_argument('--config-variant', action='append', default=[],
                 help='NAME:config.field=VALUE,... (as --set of affectjax.ablate): the steps '
                 "also compiled with these settings, as variants named <variant>+NAME")
  p.add_argument('--smoke', action='store_true', help='ResNet18 at width 4, 32 px, batch 4')
  args = p.parse_args(argv)
  args.archs, args.steps = args.archs.split(','), args.steps.split(',')
  if not set(args.steps) <= {'train', 'eval'}:
    p.error(f'--steps={",".join(args.steps)}: expected train and/or eval')
  args.width, args.image_size, args.dtype = 64, 112, 'bfloat16'
  if args.smoke:
    args.archs, args.batch, args.width, args.image_size = ['resnet18'], 4, 4, 32
  variants = common.named_settings(args.variant)
  if 'default' in variants:
    p.error("--variant: 'default' names the program without options")
  args.variants = {'default': {}, **variants}
  args.configs = {'': {}, **{'+' + k: v for k, v in
                             common.named_settings(args.config_variant).items()}}
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    topology = topologies.get_topology_desc(
        platform='cuda', topology='1x1x1', target_config=TARGET_CONFIG.format(
            cudnn=cudnn_version(), **TARGETS[args.target]))
  except Exception as e:  # pylint: disable=broad-except
    raise SystemExit(f'deviceless: no CUDA compiler ({type(e).__name__}: {e}); install the CUDA '
                     'plugin of this jax (see the docstring)') from e
  mesh = jax.sharding.Mesh(np.asarray(topology.devices[:1]), (parallel.DATA_AXIS,))
  # A cached executable would be loaded without compiling, so XLA would write no dumps.
  jax.config.update('jax_enable_compilation_cache', False)
  os.makedirs(args.out, exist_ok=True)
  result = {'date': f'{datetime.datetime.now():%Y-%m-%d %H:%M}', 'jax': jax.__version__,
            'command': common.command_line(), 'target': TARGETS[args.target]['name'],
            'cudnn': '.'.join(map(str, cudnn_version())),
            'batch': args.batch, 'variants': args.variants,
            'config_variants': {k[1:]: v for k, v in args.configs.items() if k}, 'steps': {}}
  dumps = tempfile.mkdtemp(prefix='deviceless-')
  for arch, (suffix, settings) in itertools.product(args.archs, args.configs.items()):
    config = accelerator.image_config(args, arch, args.batch, args.dtype)
    config.global_batch_size = config.eval_batch_size = args.batch  # one GPU
    config.update_from_flattened_dict(settings)
    run, state, batch = abstract_step_inputs(config, mesh)
    for step in args.steps:
      fn = run.train_step() if step == 'train' else run.eval_step()
      lowered = fn.lower(state, batch)
      for variant, options in args.variants.items():
        name = variant + suffix
        print(f'[deviceless] {arch} {step}, {name} ...', flush=True)
        result['steps'][f'{arch} {step} {name}'] = compile_and_read(
            lowered, options, os.path.join(dumps, f'{arch}-{step}-{name}'), f'{step}_step')
  text = tables(result)
  with open(os.path.join(args.out, 'deviceless.json'), 'w') as f:
    json.dump(result, f, indent=1)
  with open(os.path.join(args.out, 'deviceless.md'), 'w') as f:
    f.write(text)
  print(text)
  print(f'wrote {args.out}/deviceless.json and deviceless.md ({len(result["steps"])} programs; '
        f'XLA dumps under {dumps})')
  return result


def tables(result: dict) -> str:
  rows = []
  for key, r in result['steps'].items():
    host, inner = r['host'], r['in_graphs']
    rows.append((*key.split(' '), r['host_launches'], host.get('kCommandBuffer', 0),
                 host.get('kConvolution', 0), host.get('kCustomKernel', 0),
                 host.get('kCopy', 0), inner.get('kCustomKernel', 0), inner.get('kCopy', 0),
                 f"{r['copies']} ({r['copied_bytes'] / 1e6:.0f} MB)", r['conditionals'],
                 f"{r['estimated_bytes'] / 1e9:.1f}", f"{r['compile_s']:.0f}"))
  return '\n'.join([
      f"# The steps' GPU programs, compiled without a GPU, {result['date']}", '',
      f"Target {result['target']}, {result['batch']} images per GPU, jax {result['jax']}; "
      f"command: `{result['command']}`; variants: {json.dumps(result['variants'])}; config "
      f"variants: {json.dumps(result.get('config_variants', {}))}", '',
      common.format_table(
          ('network', 'step', 'variant', 'host launches/step', 'graphs', 'cuDNN convs',
           'kernels', 'copies', 'kernels in graphs', 'copies in graphs', 'HLO copies (written)',
           'conditionals', 'est. GB moved', 'compile s'), rows)]) + '\n'


if __name__ == '__main__':
  main()
