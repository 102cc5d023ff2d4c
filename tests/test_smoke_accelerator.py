"""The GPU check (benchmarks/accelerator.py) in its --smoke mode: every part runs, at tiny sizes,
so the script cannot rot between GPU loans; and the GPU code paths it checks hold on the CPU.

(Named to run after test_docs.py: the smoke mode uses the test variant's programs, which the
README's commands compiled into this session's compilation cache.)
"""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_accelerator_check_smoke(tmp_path):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  done = subprocess.run(
      [sys.executable, os.path.join(REPO, 'benchmarks', 'accelerator.py'), '--smoke',
       '--out', str(tmp_path), '--cache-dir', str(tmp_path / 'cache'),
       '--loop-variant', 'w0:data.worker_count=0,data.decoded_cache=True,prefetch_thread=False',
       '--xla-variant', 'fastminmax:xla_cpu_enable_fast_min_max=True'],
      env=env, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  result = json.loads((tmp_path / 'accelerator.json').read_text())
  text = (tmp_path / 'accelerator.md').read_text()
  step = result['step']['resnet18']['16']
  assert step['init_s'] > 0 and 'The initial state (parameters' in text
  for kind in ('train', 'eval'):
    assert step[kind]['images_per_s'] > 0 and step[kind]['compile_s'] > 0
    # The host's time to queue a step: within the step's own time (issued before it ends).
    assert 0 < step[kind]['host_ms'] <= 2 * step[kind]['step_ms']
    assert 0 < step[kind]['peak_fraction'] < 1  # of the matrix product measured in the run
    assert step['torch'][f'{kind} eager']['images_per_s'] > 0
  # XLA's FLOP count of the lowered steps: a training image costs the forward pass and about
  # twice that again for the backward pass.
  assert 2.5 < step['train']['tflops'] / step['train']['images_per_s'] / (
      step['eval']['tflops'] / step['eval']['images_per_s']) < 3.5
  # The profile's summary of a traced steady state (on the CPU, of the host's XLA threads).
  profile = step['profile']
  assert profile['steps'] == 2 and profile['wall_ms'] > 0 and 0 < profile['busy_ms']
  assert abs(sum(c['fraction'] for c in profile['classes'].values()) - 1) < 1e-6
  assert profile['top'] and '### Profile of the train step' in text
  loop = result['loop']
  assert loop['bare_images_per_s'] > 0 and loop['input_cpu_ms_per_image'] > 0
  assert loop['put_ms_per_batch'] > 0 and 'putting a batch on the devices' in text
  assert loop['workers'] == 0  # auto: no worker processes when the step runs on the CPU
  assert loop['cached']['of_bare'] > 0 and loop['cached']['input_only_images_per_s'] > 0
  assert 0 <= loop['cached']['input_wait'] <= 1
  # --loop-variant: the overrides parsed as Python literals (the batches read on a thread)
  assert loop['w0']['of_bare'] > 0
  # --xla-variant: the steps again, compiled with the XLA option, each timed and checked
  variant = result['xla_variants']['fastminmax']
  for kind in ('train', 'eval'):
    assert variant[kind]['images_per_s'] > 0 and 0 < variant[kind]['host_ms']
  assert '## XLA option variants, resnet18, batch 16' in text
  assert set(result['temporal']) == {'gru', 'lstm', 'transformer'}
  for encoder in result['temporal'].values():
    assert encoder['segments_per_s'] > 0 and encoder['torch_segments_per_s'] > 0
  # The steady state compiles nothing new, donates without warnings and moves nothing to or
  # from the host implicitly (jax.transfer_guard('disallow') around the timed steps).
  checks = result['checks']
  assert set(checks['steady_state']) == {'train resnet18 b16', 'eval resnet18 b16',
                                         'train resnet18 b16 fastminmax',
                                         'eval resnet18 b16 fastminmax',
                                         'temporal gru', 'temporal lstm', 'temporal transformer'}
  for where, check in checks['steady_state'].items():
    assert check == {'compilations': 0, 'transfer_guard': 'ok', 'donation_warnings': 0}, where
  assert checks['bf16_vs_float32_loss']['ok'], checks['bf16_vs_float32_loss']
  assert '## resnet18, auto' in text and '## Temporal encoders' in text and 'JAX/PyTorch' in text


def test_gpu_wrapper_script_is_valid_bash():
  script = os.path.join(REPO, 'benchmarks', 'accelerator.sh')
  done = subprocess.run(['bash', '-n', script], capture_output=True, text=True)
  assert done.returncode == 0, done.stderr


def test_the_largest_batch_that_fits_is_found_largest_first(monkeypatch):
  sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
  import accelerator  # pylint: disable=import-outside-toplevel
  tried = []

  def rows(args, arch, batch, checks):
    tried.append(batch)
    if batch > 512:
      raise RuntimeError('RESOURCE_EXHAUSTED: Out of memory while trying to allocate 80.1GiB')
    return {'train': {'images_per_s': batch}}

  monkeypatch.setattr(accelerator, 'jax_image_rows', rows)
  found = accelerator.largest_fitting(accelerator.parse_args(['--out', 'unused']), 'resnet50', {})
  assert tried == [256, 1024, 512]
  assert found[1024]['does_not_fit'].startswith('RESOURCE_EXHAUSTED')
  assert found[512] == {'train': {'images_per_s': 512}}
