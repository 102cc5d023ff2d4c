"""How much of the device a step uses: TFLOP/s against a matrix product measured in the same
run, and where its device time goes: a `jax.profiler` trace of a few steady-state steps,
summarised from its Perfetto (Chrome trace JSON) export without TensorBoard's profile plugin.

Used by `benchmarks/accelerator.py --parts step,profile` on the first (network, batch) of the
train step. The summary gives, per step:
  wall       the timed steps' wall time;
  busy       the union of the device's kernel intervals (its compute streams), so `idle` =
             1 - busy / wall is time the device waited (launch gaps, host work, synchronisation);
  classes    device time by kind of operation: convolution (cuDNN), matrix product (cuBLAS,
             Triton), fused elementwise/reduction (BatchNorm, activations, the update), copy and
             transpose, collective (NCCL), other;
  top        the operations with the most device time.
On a CPU the trace has no device streams: the host's XLA threads stand in for them, so the
figures show only that the summary works (the smoke test).
"""
import collections
import glob
import gzip
import json
import os
import re
import shutil
import time

import jax
import jax.numpy as jnp

import common

# Checked in order against an operation's name and HLO text (lower case).
CLASSES = (
    ('collective', ('nccl', 'all-reduce', 'all_reduce', 'allreduce', 'reduce-scatter',
                    'all-gather')),
    ('convolution', ('cudnn', 'conv', 'xmma', 'implicit_gemm', 'fprop', 'dgrad', 'wgrad')),
    ('matmul', ('gemm', 'cublas', 'nvjet', 'dot', 'matmul')),
    ('copy/transpose', ('memcpy', 'memset', 'copy', 'transpose')),
    ('fused elementwise/reduction', ('fusion', 'reduce', 'loop_', 'input_', 'triton',
                                     'elementwise', 'add', 'multiply')),
)


def classify(name: str, text: str = '') -> str:
  """The class of an operation, from its kernel or HLO name and any HLO text it carries."""
  lowered = f'{name} {text}'.lower()
  for cls, keys in CLASSES:
    if any(k in lowered for k in keys):
      return cls
  return 'other'


def _union_us(intervals) -> float:
  total, end = 0.0, float('-inf')
  for start, stop in sorted(intervals):
    if stop > end:
      total += stop - max(start, end)
      end = stop
  return total


def summarise(events: list, steps: int, wall_s: float) -> dict:
  """Per-step figures from a Chrome-trace event list (see the module's docstring)."""
  processes = {e['pid']: e['args']['name'] for e in events
               if e.get('ph') == 'M' and e.get('name') == 'process_name'}
  threads = {(e['pid'], e.get('tid')): e['args']['name'] for e in events
             if e.get('ph') == 'M' and e.get('name') == 'thread_name'}
  device = [p for p, n in processes.items() if re.search(r'/device:(gpu|tpu)', n, re.I)]
  per_thread = collections.Counter()
  for e in events:
    if e.get('ph') == 'X':
      per_thread[(e['pid'], e.get('tid'))] += e.get('dur', 0.0)

  def is_kernel_line(key):
    name = threads.get(key, '')
    if device:  # a GPU's compute streams (not its derived 'XLA Ops' / 'XLA Modules' lines)
      return key[0] in device and name.lower().startswith('stream')
    return 'xla' in name.lower() and 'eigen' not in name.lower()

  kernel_lines = {k for k in per_thread if is_kernel_line(k)}
  ops_lines = {k for k in per_thread if k[0] in device and threads.get(k, '') == 'XLA Ops'}
  by_op, by_class, intervals = collections.Counter(), collections.Counter(), []
  for e in events:
    key = (e.get('pid'), e.get('tid'))
    if e.get('ph') != 'X' or key not in (ops_lines or kernel_lines):
      continue
    text = ' '.join(str(v) for k, v in e.get('args', {}).items() if k in (
        'long_name', 'hlo_op', 'tf_op', 'hlo_module', 'kernel_details'))
    by_op[e['name']] += e.get('dur', 0.0)
    by_class[classify(e['name'], text)] += e.get('dur', 0.0)
  for e in events:
    if e.get('ph') == 'X' and (e.get('pid'), e.get('tid')) in kernel_lines:
      intervals.append((e['ts'], e['ts'] + e.get('dur', 0.0)))
  busy_ms = _union_us(intervals) / 1e3 / steps
  wall_ms = wall_s * 1e3 / steps
  total = sum(by_class.values()) or 1.0
  return {
      'steps': steps, 'wall_ms': wall_ms, 'busy_ms': busy_ms,
      'idle_fraction': max(0.0, 1 - busy_ms / wall_ms),
      'source': 'XLA Ops' if ops_lines else 'kernels',
      'classes': {c: {'ms': t / 1e3 / steps, 'fraction': t / total}
                  for c, t in by_class.most_common()},
      'top': [{'op': n, 'ms': t / 1e3 / steps, 'fraction': t / total,
               'class': classify(n)} for n, t in by_op.most_common(25)],
      'lines': {f'{processes.get(k[0], k[0])} / {threads.get(k, k[1])}': t / 1e3 / steps
                for k, t in per_thread.most_common(12)},
  }


def profile(call, steps: int, trace_dir: str) -> dict:
  """Traces `call()` (which runs `steps` steps and blocks) once and summarises the trace; a
  profiler that fails (no CUPTI, say) is reported as {'error': ...}, the figures kept."""
  shutil.rmtree(trace_dir, ignore_errors=True)
  call()  # warm
  try:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      start = time.perf_counter()
      call()
      wall_s = time.perf_counter() - start
    path = sorted(glob.glob(os.path.join(trace_dir, '**', 'perfetto_trace.json.gz'),
                            recursive=True))[-1]
  except Exception as e:  # pylint: disable=broad-except
    return {'error': f'{type(e).__name__}: {e}'[:300]}
  with gzip.open(path, 'rt') as f:
    trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  return {**summarise(events, steps, wall_s), 'trace': os.path.relpath(path, trace_dir)}


def table(summary: dict) -> list:
  """Markdown lines of a summary."""
  s = summary
  if 'error' in s:
    return [f"No profile: {s['error']}", '']
  lines = [f"{s['steps']} steps traced: {s['wall_ms']:.2f} ms/step wall, {s['busy_ms']:.2f} ms "
           f"device busy, idle {s['idle_fraction']:.1%} (from {s['source']}).", '',
           '| class | ms/step | share |', '|---|---|---|']
  lines += [f"| {c} | {v['ms']:.3f} | {v['fraction']:.1%} |" for c, v in s['classes'].items()]
  lines += ['', '| operation | class | ms/step | share |', '|---|---|---|---|']
  lines += [f"| `{t['op'][:60]}` | {t['class']} | {t['ms']:.3f} | {t['fraction']:.1%} |"
            for t in s['top'][:15]]
  return lines + ['']


def matmul_tflops(size: int, reps: int) -> float:
  """The device's measured bf16 matrix-product rate (TFLOP/s): the utilisation reference."""
  a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.bfloat16)
  matmul = jax.jit(lambda x: x @ x)
  jax.block_until_ready(matmul(a))
  times = common.interleaved_times(
      {'mm': lambda: jax.block_until_ready([matmul(a) for _ in range(10)])}, reps, 0)[0]['mm']
  return 10 * 2 * size**3 / min(times) / 1e12


def add_tflops(step: dict, models: dict, peak: float) -> None:
  """TFLOP/s of each timed step and its fraction of one device's measured `peak`."""
  for arch, by_batch in step.items():
    for batch, r in by_batch.items():
      for kind in ('train', 'eval') if 'does_not_fit' not in r else ():
        per_step, per_image = models[arch][kind]
        tflops = (per_step + per_image * batch) / (r[kind]['step_ms'] / 1e3) / 1e12
        r[kind]['tflops'] = tflops * jax.device_count()
        r[kind]['peak_fraction'] = tflops / peak
