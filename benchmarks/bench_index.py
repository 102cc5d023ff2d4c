"""Benchmark: building the Aff-Wild2 frame index at full size (cold, from cache, peak memory).

Writes annotation files the size of Aff-Wild2 (about 550 videos, 2.8M frames; EXPR about 2.6M,
AU about 2.5M, VA about 2.0M lines, partly overlapping) in the per-task layout (default) or as one
s-Aff-Wild2 file (`--layout mtl`), without images unless `--images`, then times `build_index` in
fresh subprocesses: cold (empty cache dir; includes writing the cache) and cached. Peak memory is
each child's peak RSS (VmHWM), next to a child that only imports the index module.

  python benchmarks/bench_index.py                          # full size, per-task layout
  python benchmarks/bench_index.py --scale 0.1              # quick
  python benchmarks/bench_index.py --scale 0.05 --images    # with the crop existence check
"""
import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

_NUM_VIDEOS = 550
_MEAN_FRAMES = 5100  # 550 x 5100 = 2.8M
_TASK_SHARE = {'EXPR_Set': 0.93, 'AU_Set': 0.93, 'VA_Set': 0.72}  # fraction of videos annotated


def _line_pools(rng):
  """Byte-string lines to draw from: realistic field widths without formatting 7M lines."""
  expr = np.array([b'%d' % e for e in range(-1, 8)], dtype=object)
  au = np.array([b','.join(b'%d' % v for v in rng.choice([-1, 0, 1], 12, p=[.02, .78, .2]))
                 for _ in range(4096)], dtype=object)
  va = np.array([b','.join(repr(round(float(x), int(d))).encode()
                           for x, d in zip(rng.uniform(-1, 1, 2), rng.integers(2, 17, 2)))
                 for _ in range(4096)] + [b'-5,-5'] * 64, dtype=object)
  return {'EXPR_Set': (b'Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other', expr),
          'AU_Set': (b'AU1,AU2,AU4,AU6,AU7,AU10,AU12,AU15,AU23,AU24,AU25,AU26', au),
          'VA_Set': (b'valence,arousal', va)}


def _labels_per_video(scale, seed):
  """{task: {video name: pool lines [n] (bytes)}} with runs of the same line, as real labels."""
  rng = np.random.default_rng(seed)
  pools = _line_pools(rng)
  num_videos = max(3, round(_NUM_VIDEOS * scale))
  lengths = rng.integers(_MEAN_FRAMES // 5, 2 * _MEAN_FRAMES - _MEAN_FRAMES // 5, num_videos)
  names = [f'video{v:03d}' + ('_left' if v % 40 == 0 else '') for v in range(num_videos)]
  per_task = {}
  for task, (_, pool) in pools.items():
    per_task[task] = {}
    for v in np.flatnonzero(rng.random(num_videos) < _TASK_SHARE[task]):
      n = int(lengths[v])
      per_task[task][names[v]] = np.repeat(pool[rng.choice(pool.size, n // 20 + 1)], 20)[:n]
  return pools, per_task


def generate(root, scale, layout='per_task', images=False, seed=0):
  """Writes the annotation files (and empty crops, 1 frame in 25 missing); returns line counts."""
  pools, per_task = _labels_per_video(scale, seed)
  lines = {task: sum(v.size for v in videos.values()) for task, videos in per_task.items()}
  videos = sorted(set().union(*per_task.values()))
  if layout == 'per_task':
    for task, (header, _) in pools.items():
      folder = os.path.join(root, 'Annotations', task, 'Train_Set')
      os.makedirs(folder)
      for name, body in per_task[task].items():
        with open(os.path.join(folder, name + '.txt'), 'wb') as f:
          f.write(header + b'\n' + b'\n'.join(body.tolist()) + b'\n')
  else:  # one s-Aff-Wild2 row per frame of any task, missing tasks as sentinels
    os.makedirs(root)
    missing = {'VA_Set': b'-5,-5', 'EXPR_Set': b'-1', 'AU_Set': b','.join([b'-1'] * 12)}
    with open(os.path.join(root, 'training_set_annotations.txt'), 'wb') as f:
      f.write(b'image,valence,arousal,expression,' + pools['AU_Set'][0] + b'\n')
      for name in videos:
        n = max(per_task[t][name].size for t in pools if name in per_task[t])
        columns = []
        for task in ('VA_Set', 'EXPR_Set', 'AU_Set'):
          column = np.full(n, missing[task], dtype=object)
          given = per_task[task].get(name, column[:0])
          column[:given.size] = given
          columns.append(column)
        paths = [b'%s/%05d.jpg' % (name.encode(), k) for k in range(1, n + 1)]
        f.write(b''.join(b','.join(row) + b'\n' for row in zip(paths, *columns)))
  if images:
    for name in videos:
      n = max(per_task[t][name].size for t in pools if name in per_task[t])
      folder = os.path.join(root, 'cropped_aligned', name)
      os.makedirs(folder)
      for k in range(1, n + 1):
        if k % 25:
          open(os.path.join(folder, f'{k:05d}.jpg'), 'wb').close()
  return lines


def _child(root, cache_dir, mode, check_images):
  """Runs in a fresh interpreter: one build (or just the imports), prints JSON."""
  t0 = time.perf_counter()
  from affectjax.data import index  # pylint: disable=g-import-not-at-top
  info = {'import_s': time.perf_counter() - t0, 'jax_imported': 'jax' in sys.modules}
  if mode != 'import':
    t0 = time.perf_counter()
    idx = index.build_index(root, 'train', check_images=check_images, cache_dir=cache_dir)
    info.update(build_s=time.perf_counter() - t0, frames=len(idx), videos=len(idx.video_names))
  info['peak_rss_mb'] = _peak_rss_mb()
  print(json.dumps(info))


def _peak_rss_mb():
  """This process's peak RSS. Linux: VmHWM, which, unlike getrusage's ru_maxrss, does not carry
  over the parent's RSS from before exec."""
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith('VmHWM:'):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _run_child(root, cache_dir, mode, images):
  out = subprocess.run([sys.executable, __file__, '--child', mode, '--root', root,
                        '--cache-dir', cache_dir] + ['--images'] * images, check=True,
                       capture_output=True, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--scale', type=float, default=1.0, help='fraction of full Aff-Wild2 size')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--layout', choices=('per_task', 'mtl'), default='per_task',
                      help='per-task sets, or one s-Aff-Wild2 file with a row per frame')
  parser.add_argument('--images', action='store_true',
                      help='also write empty crops and check them (slow to write at full size)')
  parser.add_argument('--root', help='reuse this generated tree (else a temp dir)')
  parser.add_argument('--child', choices=('import', 'cold', 'cached'), help=argparse.SUPPRESS)
  parser.add_argument('--cache-dir', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    _child(args.root, args.cache_dir, args.child, args.images)
    return
  work = tempfile.mkdtemp(prefix='bench_index_')
  try:
    root = args.root or os.path.join(work, 'affwild2')
    if not args.root:
      t0 = time.perf_counter()
      lines = generate(root, args.scale, args.layout, args.images)
      print(f'generated {lines} in {time.perf_counter() - t0:.1f} s')
    runs = {'import': [], 'cold': [], 'cached': []}
    for r in range(args.repeats):  # alternate cold and cached, each in a fresh process
      cache_dir = os.path.join(work, f'cache{r}')
      for mode in runs:
        runs[mode].append(_run_child(root, cache_dir, mode, args.images))
    frames, videos = runs['cold'][0]['frames'], runs['cold'][0]['videos']
    print(f'\nindex ({args.layout} layout): {frames} frames, {videos} videos '
          f'(check_images={args.images}); median of {args.repeats} fresh processes each')
    print(f"{'what':<28}{'time s':>10}{'peak RSS MB':>14}{'target':>18}")
    targets = {'import': '', 'cold': '<= 10 s, 300 MB', 'cached': '<= 1 s, 300 MB'}
    for mode, key in (('import', 'import_s'), ('cold', 'build_s'), ('cached', 'build_s')):
      t = statistics.median(x[key] for x in runs[mode])
      m = statistics.median(x['peak_rss_mb'] for x in runs[mode])
      print(f'{mode + (" (imports only)" if mode == "import" else " build_index"):<28}'
            f'{t:>10.2f}{m:>14.0f}{targets[mode]:>18}')
    print(f"jax imported by the index: {runs['cold'][0]['jax_imported']}")
    print('command: python benchmarks/bench_index.py ' + ' '.join(sys.argv[1:]))
  finally:
    shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
  main()
