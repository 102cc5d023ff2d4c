"""The markdown tables of benchmarks/accelerator.py's results (accelerator.json)."""
import json

import common
import utilisation


def tables(result: dict) -> str:
  lines = [f"# Accelerator check, {result['date']}", '', f"{result['device']}; jax "
           f"{result['jax']}; command: `{result['command']}`", '']
  if 'matmul_tflops' in result:
    lines += [f"bf16 matrix product ({result['matmul_tflops']:.3g} TFLOP/s measured): the "
              'reference of the TFLOP/s fractions.', '']
  for arch, by_batch in result.get('step', {}).items():
    rows = []
    for batch, r in by_batch.items():
      rows += [(batch, 'does not fit') + ('',) * 6] if 'does_not_fit' in r else [(
          batch, kind, f"{r[kind]['images_per_s']:.0f}", f"{r[kind]['step_ms']:.1f}",
          f"{r[kind]['host_ms']:.2f}" if 'host_ms' in r[kind] else '',
          f"{r[kind]['compile_s']:.1f}",
          f"{r[kind]['tflops']:.1f} ({r[kind]['peak_fraction']:.1%})"
          if 'tflops' in r[kind] else 'counting',
          ', '.join(f'{k.split(" ", 1)[1]} {v["images_per_s"]:.0f} '
                    f'({r[kind]["images_per_s"] / v["images_per_s"]:.2f}x)'
                    for k, v in r.get('torch', {}).items() if k.startswith(kind)))
          for kind in ('train', 'eval')]
    lines += [f"## {arch}, {result['dtype']}", '', common.format_table(
        ('batch/device', 'step', 'JAX img/s', 'ms/step', 'host ms/step', 'compile s',
         'TFLOP/s (of matmul)', 'PyTorch img/s (JAX/PyTorch)'), rows), '']
    started = [f"{r['init_s']:.1f} s at batch {batch}" for batch, r in by_batch.items()
               if 'init_s' in r]
    if started:
      lines += ['The initial state (parameters, BatchNorm statistics, optimiser state; one '
                'compiled program, then replicated): ' + ', '.join(started) + '.', '']
    for batch, r in by_batch.items():
      if 'profile' in r:
        lines += [f'### Profile of the train step, {arch}, batch {batch}', ''] + (
            utilisation.table(r['profile']))
  if 'xla_variants' in result:  # the first network and batch, against its default rows
    arch, by_batch = next(iter(result['step'].items()))
    batch, default = next(iter(by_batch.items()))
    rows = [(name, kind, f"{r[kind]['images_per_s']:.0f}", f"{r[kind]['step_ms']:.2f}",
             f"{r[kind]['host_ms']:.2f}", f"{r[kind]['compile_s']:.1f}",
             f"{r[kind]['images_per_s'] / default[kind]['images_per_s']:.3f}")
            for name, r in [('default', default), *result['xla_variants'].items()]
            for kind in ('train', 'eval')]
    lines += [f'## XLA option variants, {arch}, batch {batch}', '', common.format_table(
        ('variant', 'step', 'JAX img/s', 'ms/step', 'host ms/step', 'compile s',
         'of default'), rows), '']
  if 'loop' in result:
    r = result['loop']
    lines += ['## Full loop against the bare step', '', common.format_table(
        ('input', 'img/s', 'of bare', 'waiting for input', 'input alone img/s (no step)'),
        [('bare step', f"{r['bare_images_per_s']:.0f}", '1.000', '', '')] +
        [(k, f"{r[k]['images_per_s']:.0f}", f"{r[k]['of_bare']:.3f}",
          f"{r[k].get('input_wait', float('nan')):.1%}",
          f"{r[k].get('input_only_images_per_s', float('nan')):.0f}")
         for k in r if isinstance(r[k], dict)]),
              '', f"input: {r['input_cpu_ms_per_image']:.2f} CPU ms per image, so "
              f"{r['input_cores_at_bare_rate']:.1f} cores at the bare step's rate; "
              f"{r['workers']} workers; putting a batch on the devices: "
              f"{r.get('put_ms_per_batch', float('nan')):.2f} ms", '']
  if 'temporal' in result:
    lines += ['## Temporal encoders (training step)', '', common.format_table(
        ('encoder', 'segments/s', 'frames/s', 'PyTorch segments/s', 'JAX/PyTorch'),
        [(k, f"{v['segments_per_s']:.1f}", f"{v['frames_per_s']:.0f}",
          f"{v['torch_segments_per_s']:.1f}", f"{v['vs_torch']:.2f}")
         for k, v in result['temporal'].items()]), '']
  lines += ['## Checks', '', '```', json.dumps(result['checks'], indent=1), '```']
  return '\n'.join(lines) + '\n'
