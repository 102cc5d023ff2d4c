"""The analysis scripts in benchmarks/ whose figures docs/ablations.md quotes: their arithmetic
against plain loops, on small inputs made here."""
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
from sklearn.metrics import f1_score

from affectjax import metrics
from affectjax.data.synthetic import generate, hard, tracks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, 'benchmarks', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize('causal', [True, False])
def test_moving_average_is_the_mean_of_each_frames_window_within_its_video(causal):
  """metrics.smooth_per_video, which the smoothing script reads through, causal and centred."""
  rng = np.random.default_rng(0)
  video_id = np.repeat([0, 1, 2], [7, 1, 12])
  values = rng.normal(size=(len(video_id), 3))
  got = metrics.smooth_per_video(values, video_id, 5, causal=causal)
  for i in range(len(values)):
    same = np.flatnonzero(video_id == video_id[i])
    lo, hi = (i - 4, i) if causal else (i - 2, i + 2)
    window = [j for j in same if lo <= j <= hi]
    np.testing.assert_allclose(got[i], values[window].mean(0), atol=1e-12)


def test_smoothing_scores_read_a_features_folder(tmp_path):
  """The frame alone scores as sklearn's F1 of the argmax; a window of 1 changes nothing."""
  smoothing = _script('temporal_smoothing')
  split = tmp_path / 'validation'
  split.mkdir()
  rng = np.random.default_rng(1)
  n = 40
  expr = rng.integers(0, 8, n)
  expr[:3] = -1  # no label
  predictions = np.concatenate([rng.dirichlet(np.ones(8), n), rng.uniform(size=(n, 12)),
                                rng.uniform(-1, 1, (n, 2))], 1)
  np.save(split / 'predictions.npy', predictions.astype(np.float16))
  (split / 'meta.json').write_text('{"tasks": ["expr", "au", "va"]}')
  np.savez(split / 'index.npz', video_id=np.repeat([0, 1], 20), expr=expr,
           au=(rng.uniform(size=(n, 12)) > 0.7).astype(np.int64),
           va=rng.uniform(-1, 1, (n, 2)))
  rows = smoothing.scores(str(tmp_path), (1, 3))
  alone = next(r for r in rows if r['window'] == 1 and r['causal'])
  p = predictions.astype(np.float16).astype(np.float64)
  expected = f1_score(expr[3:], p[3:, :8].argmax(1), labels=range(8), average='macro',
                      zero_division=0)
  assert alone['EXPR F1'] == pytest.approx(expected, abs=1e-9)
  assert alone == dict(next(r for r in rows if r['window'] == 1 and not r['causal']),
                       causal=True)


def test_hard_preset_stats_replay_the_generators_tracks(tmp_path, monkeypatch):
  """The replayed clean EXPR track of each video is the one the generator drew: without the
  annotators' relabelled segments, the written labels equal it wherever a label is written;
  the script prints the replayed counts."""
  stats = _script('hard_preset_stats')
  monkeypatch.setattr(hard, 'EXPR_FLIP', 0.0)
  params = generate._params(8, 40, 3, preset='hard')
  generate.generate(tmp_path, progress=False, num_videos=8, frames_per_video=40, seed=3,
                    preset='hard')
  plans = generate.plan_videos(8, 40, 3, params['val_fraction'], params['length_jitter'])
  agree = total = 0
  for plan in [p for p in plans if 'expr' in p.tasks]:
    clean = tracks.simulate_track(generate._video_rng(3, plan.index), plan.num_frames,
                                  plan.forced_expr, hard.STYLE)
    lines = generate.task_file(tmp_path, 'expr', plan.split, plan.name).read_text().split()[1:]
    written = np.array([int(x) for x in lines])
    labelled = written >= 0
    agree += (written == tracks.expr_for_classes(clean['expr'], 7))[labelled].sum()
    total += labelled.sum()
  assert total > 100 and agree == total
  out = subprocess.run([sys.executable, os.path.join(REPO, 'benchmarks', 'hard_preset_stats.py'),
                        '--num_videos=8', '--frames_per_video=40', '--seed=3'],
                       capture_output=True, text=True, check=True).stdout
  for split in generate.SPLITS:
    counted = stats.split_stats([p for p in plans if p.split == split and 'expr' in p.tasks], 3)
    assert 0 <= counted['dipped'] <= counted['expressive'] <= counted['frames']
    assert f"| {split} | {counted['videos']} | {counted['frames']:,} |" in out
    assert f"| {counted['dipping']} of {counted['segments']} | {counted['changes']} |" in out


def test_bench_backbone_times_each_optimisation_against_its_plain_version():
  """benchmarks/bench_backbone.py at a tiny size: the train steps with written and derived
  gradients, with the ReLU masks in bits and in bytes, with the kernels in OHWI and in HWIO
  (the state transposed for the second), and the folded and unfolded eval steps, run on the
  same state; outputs agree."""
  result = _script('bench_backbone').main(['--arch', 'resnet18', '--width', '4',
                                           '--image-size', '32', '--batch', '2', '--steps', '1',
                                           '--reps', '2'])
  assert set(result['steps']) == {'train', 'mask', 'eval', 'layout'}
  for part, (name, plain) in (('train', ('written gradients', 'derived')),
                              ('mask', ('mask in bits', 'mask in bytes')),
                              ('layout', ('kernels OHWI', 'kernels HWIO')),
                              ('eval', ('folded', 'unfolded'))):
    r = result['steps'][part]
    assert set(r['images_per_s']) == {name, plain}
    assert all(rate > 0 for rate in r['images_per_s'].values()) and r['ratio'] > 0
    assert r['max_abs_output_difference'] <= 1e-4 * max(r['largest_output'], 1.0)


def test_bench_dispatch_times_the_hosts_share_of_a_step():
  """benchmarks/bench_dispatch.py at a tiny size: the step call and the metrics' one copy,
  timed, beside the reference call of as many donated arrays as the state holds."""
  result = _script('bench_dispatch').main(['--width', '1', '--steps', '3'])
  assert result['state_arrays'] > 200 and result['metrics_outputs'] == 1
  assert min(result['step_call_ms'], result['metrics_copies_ms'],
             result['reference_call_ms']) > 0


def test_bench_loop_launch_stand_in_holds_each_step_call_and_restores_the_step(monkeypatch):
  """bench_loop's --launch-ms: every train step built inside `held_dispatch` holds its caller
  that much longer with Python's lock let go (another thread runs meanwhile), returns the
  step's own outputs, and `Run.train_step` is itself again afterwards, after an error too."""
  import threading  # pylint: disable=import-outside-toplevel
  import time  # pylint: disable=import-outside-toplevel
  from affectjax import runs  # pylint: disable=import-outside-toplevel
  bench_loop = _script('bench_loop')
  monkeypatch.setattr(runs.Run, 'train_step', lambda self: lambda state, batch: (state + 1, {}))
  original = runs.Run.train_step
  ran = []
  with bench_loop.held_dispatch(50):
    step = runs.Run.train_step(None)
    other = threading.Thread(target=lambda: ran.append(time.perf_counter()))
    start = time.perf_counter()
    other.start()
    assert step(1, None) == (2, {})
    held = time.perf_counter() - start
    other.join()
  assert held >= 0.05 and ran and ran[0] < start + held  # (the other thread ran meanwhile)
  assert runs.Run.train_step is original
  with pytest.raises(RuntimeError, match='stop'), bench_loop.held_dispatch(1):
    raise RuntimeError('stop')
  assert runs.Run.train_step is original
  with bench_loop.held_dispatch(0):  # 0: nothing patched
    assert runs.Run.train_step is original


def test_bench_loop_variants_are_config_overrides_on_the_jpeg_loop(config):
  """bench_loop.loop_configs (also the accelerator check's loop part): 'jpeg', 'cached', and
  NAME:field=value,... on jpeg's config, Python literals."""
  from affectjax import kinds  # pylint: disable=import-outside-toplevel
  bench_loop = _script('bench_loop')
  index = kinds.load_index(config, 'train')
  got = bench_loop.loop_configs(config, index, [
      'jpeg', 'cached', 'cached-nothread:data.decoded_cache=True,prefetch_thread=False',
      'w2:data.worker_count=2,log_every_steps=7'])
  assert list(got) == ['jpeg', 'cached', 'cached-nothread', 'w2']
  assert not got['jpeg'].data.decoded_cache and got['jpeg'].prefetch_thread
  assert got['cached'].data.decoded_cache and got['cached'].prefetch_thread
  assert got['cached-nothread'].data.decoded_cache and not got['cached-nothread'].prefetch_thread
  assert got['w2'].data.worker_count == 2 and got['w2'].log_every_steps == 7
  assert config.data.worker_count != 2 or config.log_every_steps != 7  # the base is untouched
