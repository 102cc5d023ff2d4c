"""A synthetic Aff-Wild2: procedural face videos written in the exact per-task and s-Aff-Wild2 layouts.

Every video is simulated from its own seed (`SeedSequence(seed, spawn_key=(video_index,))`), so the
files do not depend on generation order and the same arguments give byte-identical files. Labels are
visible: each frame's 12 AU intensities drive the renderer (an AU is present above 0.5), the
expression is the prototype AU combination of its segment, and valence/arousal are a fixed function
of the rendered intensities and the expression plus small noise.

  python -m affectjax.data.synthetic --out /tmp/affwild2_synth --num-videos 64 --seed 0
"""
import argparse
import dataclasses
import hashlib
import json
import pathlib
import time

import cv2
import numpy as np
import tqdm

from affectjax import files
from affectjax import labels
from affectjax.data import annotations
from affectjax.data import layout
from affectjax.data.synthetic import faces
from affectjax.data.synthetic import hard
from affectjax.data.synthetic import tracks

GENERATOR_VERSION = 4
MANIFEST = 'synthetic_manifest.json'
SPLITS = tuple(layout.SPLIT_FOLDERS)  # ('train', 'validation')
# Task sets per video, cycled within each split; the first ones differ so tiny sets lack each task.
TASK_PATTERNS = (('expr', 'au', 'va'), ('expr',), ('au', 'va'), ('va',), ('expr', 'au'), ('au',),
                 ('expr', 'va'), ('expr', 'au', 'va'), ('expr', 'au', 'va'))
# The first seven EXPR-annotated videos of each split hold one segment of FORCED_EXPR[k], so every
# class (Other included) appears in both splits despite the imbalanced prior.
FORCED_EXPR = (3, 2, 1, 6, 5, 7, 4)


@dataclasses.dataclass(frozen=True)
class VideoPlan:
  """What one video is: its seed index, name, split, length and annotated tasks."""
  index: int
  name: str
  split: str
  num_frames: int
  tasks: tuple
  forced_expr: int


def _source_name(s: int) -> str:
  """Names in the styles of the real set: '12-30-1280x720' and 'video13'."""
  if s % 3 == 2:
    return f'video{s + 1}'
  return f'{s + 1}-{(30, 25)[s % 3]}-{("1280x720", "640x360")[s % 3]}'


def plan_videos(num_videos: int, frames_per_video: int, seed: int, val_fraction: float = 0.3,
                length_jitter: float = 0.25) -> list:
  """Splits, names, lengths and task sets of all videos; left/right pairs share source and length."""
  if num_videos < 3:
    raise ValueError(f'num_videos must be >= 3 (train, validation, a left/right pair), '
                     f'got {num_videos}')
  rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2 ** 31,)))
  num_pairs = max(1, num_videos // 16)
  num_sources = num_videos - num_pairs
  num_val = min(max(1, round(num_sources * val_fraction)), num_sources - 1)
  order = rng.permutation(num_sources)
  split_of = {int(s): ('validation' if k < num_val else 'train') for k, s in enumerate(order)}
  by_split = {sp: sorted(s for s in split_of if split_of[s] == sp) for sp in SPLITS}
  paired = set()  # Alternate pairs between train and validation, starting with train.
  for k in range(num_pairs):
    pool = [s for s in by_split[('train', 'validation')[k % 2]] if s not in paired]
    pool = pool or [s for s in range(num_sources) if s not in paired]
    paired.add(pool[0])
  lengths = np.maximum(
      8, np.round(frames_per_video * (1 + length_jitter * rng.uniform(-1, 1, num_sources))))
  videos, per_split = [], {sp: [] for sp in SPLITS}
  for s in range(num_sources):
    names = ([_source_name(s) + '_left', _source_name(s) + '_right'] if s in paired
             else [_source_name(s)])
    for name in names:
      per_split[split_of[s]].append((len(videos), name, int(lengths[s])))
      videos.append(None)
  for split, items in per_split.items():
    k_expr = 0
    for j, (index, name, length) in enumerate(items):
      tasks = TASK_PATTERNS[j % len(TASK_PATTERNS)]
      forced = FORCED_EXPR[k_expr] if 'expr' in tasks and k_expr < len(FORCED_EXPR) else -1
      k_expr += 'expr' in tasks
      videos[index] = VideoPlan(index, name, split, length, tasks, forced)
  return videos


def _video_rng(seed: int, index: int) -> np.random.Generator:
  return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))


def task_file(root: pathlib.Path, task: str, split: str, video: str) -> pathlib.Path:
  """Where the per-task annotation file of a video is written (the first of layout's names)."""
  return (root / layout.ANNOTATIONS_DIR / layout.TASK_FOLDERS[task][0] /
          layout.SPLIT_FOLDERS[split][0] / f'{video}.txt')


def _write_text(path: pathlib.Path, lines: list):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text('\n'.join(lines) + '\n')


def _task_lines(task: str, track: dict, num_expr_classes: int) -> list:
  """Header then one line per frame of the per-task annotation file."""
  missing = track['missing'][task]
  if task == 'va':
    body = ['-5,-5' if m else f'{v:.3f},{a:.3f}' for m, (v, a) in zip(missing, track['va'])]
  elif task == 'expr':
    expr = tracks.expr_for_classes(track['expr'], num_expr_classes)
    body = [str(labels.EXPR_MISSING if m else e) for m, e in zip(missing, expr)]
  else:
    au = track['au_intensity'] > 0.5
    sentinel = ','.join([str(labels.AU_MISSING)] * labels.NUM_AUS)
    body = [sentinel if m else ','.join('1' if x else '0' for x in row)
            for m, row in zip(missing, au)]
  return [','.join(labels.TASK_TABLE[task].header(num_expr_classes))] + body


def _mtl_rows(plan: VideoPlan, track: dict) -> list:
  """s-Aff-Wild2 rows (8 expression classes): frames with an image and at least one label."""
  rows = []
  au = track['au_intensity'] > 0.5
  for k in range(plan.num_frames):
    have = {t: t in plan.tasks and not track['missing'][t][k] for t in labels.TASKS}
    if not track['has_image'][k] or not any(have.values()):
      continue
    va = f'{track["va"][k, 0]:.3f},{track["va"][k, 1]:.3f}' if have['va'] else '-5,-5'
    expr = int(track['expr'][k]) if have['expr'] else labels.EXPR_MISSING
    aus = (','.join('1' if x else '0' for x in au[k]) if have['au']
           else ','.join([str(labels.AU_MISSING)] * labels.NUM_AUS))
    rows.append(f'{plan.name}/{k + 1:05d}.jpg,{va},{expr},{aus}')
  return rows


def _write_video(root: pathlib.Path, plan: VideoPlan, params: dict, bar) -> tuple:
  """Renders and writes one video's frames and per-task files; returns (stats, MTL rows)."""
  rng = _video_rng(params['seed'], plan.index)
  is_hard = params.get('preset') == 'hard'
  track = (hard.track if is_hard else tracks.simulate_track)(rng, plan.num_frames,
                                                              plan.forced_expr)
  identity = faces.Identity.sample(rng)
  size = params['image_size']
  scenes, quality = (hard.scenes(rng, plan.num_frames, size, plan.split) if is_hard
                     else tracks.sample_scenes(rng, plan.num_frames, size))
  occluders = hard.occluders(rng, plan.num_frames, size) if is_hard else [None] * plan.num_frames
  frame_dir = root / layout.IMAGE_DIR / plan.name
  frame_dir.mkdir(parents=True, exist_ok=True)
  for k in range(plan.num_frames):
    if track['has_image'][k]:
      rgb = hard.occlude(faces.render_face(track['au_intensity'][k], identity, scenes[k], size,
                                           rng, track['other_aus'][k]), occluders[k])
      ok, jpeg = cv2.imencode('.jpg', cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                              [cv2.IMWRITE_JPEG_QUALITY, quality])
      assert ok, plan.name
      (frame_dir / f'{k + 1:05d}.jpg').write_bytes(jpeg.tobytes())
    bar.update(1)
  if is_hard:  # the annotators' labels of what the faces show
    track = hard.annotate(rng, track)
  for task in plan.tasks:
    _write_text(task_file(root, task, plan.split, plan.name),
                _task_lines(task, track, params['num_expr_classes']))
  stats = {'name': plan.name, 'split': plan.split, 'frames': plan.num_frames,
           'images': int(track['has_image'].sum()), 'tasks': list(plan.tasks)}
  expr = tracks.expr_for_classes(track['expr'], params['num_expr_classes'])
  for task in plan.tasks:
    ok = ~track['missing'][task] & (expr >= 0 if task == 'expr' else True)
    stats[f'{task}_labels'] = int(ok.sum())
  if 'expr' in plan.tasks:
    ok = ~track['missing']['expr'] & (expr >= 0)
    stats['expr_counts'] = np.bincount(expr[ok], minlength=params['num_expr_classes']).tolist()
  return stats, _mtl_rows(plan, track)


def _split_counts(videos: list, num_expr_classes: int, mtl_rows: dict) -> dict:
  counts = {}
  for split in SPLITS:
    vs = [v for v in videos if v['split'] == split]
    c = {'videos': len(vs), 'frames': sum(v['frames'] for v in vs),
         'images': sum(v['images'] for v in vs), 'mtl_rows': mtl_rows[split]}
    for task in labels.TASKS:
      c[f'{task}_labels'] = sum(v.get(f'{task}_labels', 0) for v in vs)
    c['expr_counts'] = np.sum([v['expr_counts'] for v in vs if 'expr_counts' in v] or
                              [[0] * num_expr_classes], 0).tolist()
    counts[split] = c
  return counts


def _params(num_videos: int = 64, frames_per_video: int = 140, seed: int = 0,
            image_size: int = 112, val_fraction: float = 0.3, num_expr_classes: int = 7,
            length_jitter: float = 0.25, preset: str = 'default') -> dict:
  labels.expr_classes(num_expr_classes)  # Validates.
  if preset not in hard.PRESETS:
    raise ValueError(f'synthetic preset must be one of {", ".join(hard.PRESETS)}, got {preset!r}')
  params = {'generator_version': GENERATOR_VERSION, 'num_videos': int(num_videos),
            'frames_per_video': int(frames_per_video), 'seed': int(seed),
            'image_size': int(image_size), 'val_fraction': float(val_fraction),
            'num_expr_classes': int(num_expr_classes), 'length_jitter': float(length_jitter)}
  if preset == 'hard':  # (the default's parameters, and so its folder name, stay as they were)
    params.update(preset=preset, preset_version=hard.VERSION, length_jitter=hard.LENGTH_JITTER)
  return params


def _write_dataset(root: pathlib.Path, params: dict, progress: bool) -> dict:
  plans = plan_videos(params['num_videos'], params['frames_per_video'], params['seed'],
                      params['val_fraction'], params['length_jitter'])
  videos, rows = [], {split: [','.join(annotations.MTL_HEADER)] for split in SPLITS}
  with tqdm.tqdm(total=sum(p.num_frames for p in plans), unit='frame', disable=not progress,
                 desc='synthetic Aff-Wild2', mininterval=2.0) as bar:
    for plan in plans:
      stats, mtl = _write_video(root, plan, params, bar)
      videos.append(stats)
      rows[plan.split].extend(mtl)
  for split, name in layout.MTL_FILES.items():
    _write_text(root / name, rows[split])
  counts = _split_counts(videos, params['num_expr_classes'],
                         {s: len(r) - 1 for s, r in rows.items()})
  manifest = {'params': params, 'counts': counts, 'videos': videos}
  # Written last: a folder with a manifest is complete.
  (root / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + '\n')
  return manifest


def _read_manifest(root: pathlib.Path):
  try:
    return json.loads((root / MANIFEST).read_text())
  except (OSError, ValueError):
    return None


def generate(out_dir, *, num_videos: int = 64, frames_per_video: int = 140, seed: int = 0,
             image_size: int = 112, val_fraction: float = 0.3, num_expr_classes: int = 7,
             length_jitter: float = 0.25, preset: str = 'default', progress: bool = True) -> dict:
  """Writes a synthetic Aff-Wild2 at out_dir (atomically) and returns its summary.

  Video lengths vary by +-length_jitter around frames_per_video; per-task EXPR files use
  num_expr_classes (7: Other frames are -1), the s-Aff-Wild2 files always use 8 classes.
  """
  params = _params(num_videos, frames_per_video, seed, image_size, val_fraction,
                   num_expr_classes, length_jitter, preset)
  out = pathlib.Path(out_dir).absolute()
  if out.exists() and any(out.iterdir()) and not (out / MANIFEST).exists():
    raise FileExistsError(f'{out} exists and is not a synthetic dataset; refusing to replace it')
  out.parent.mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()
  with files.atomic_dir(str(out)) as tmp:  # replaces an older synthetic dataset at `out`
    manifest = _write_dataset(pathlib.Path(tmp), params, progress)
  summary = {'root': str(out), 'seconds': time.perf_counter() - start, **manifest['counts']}
  if progress:
    print(format_summary(summary))
  return summary


def format_summary(summary: dict) -> str:
  """Human-readable lines: per split videos, frames, images and per-task label counts."""
  lines = [f'synthetic Aff-Wild2 at {summary["root"]} ({summary["seconds"]:.1f} s)']
  for split in SPLITS:
    c = summary[split]
    lines.append(f'  {split:10s} videos {c["videos"]:4d}  frames {c["frames"]:6d}  images '
                 f'{c["images"]:6d}  EXPR {c["expr_labels"]:6d}  AU {c["au_labels"]:6d}  '
                 f'VA {c["va_labels"]:6d}  MTL rows {c["mtl_rows"]:6d}  EXPR classes '
                 f'{c["expr_counts"]}')
  return '\n'.join(lines)


def ensure_synthetic(cache_dir, progress: bool = True, **kwargs) -> pathlib.Path:
  """Root of a synthetic set with these parameters under cache_dir, generating it only if absent.

  The folder name carries a hash of the parameters, so different sizes coexist; a folder whose
  manifest does not match (older generator, interrupted copy) is regenerated. Processes that
  ask for the same set at once (two runs started together on a fresh machine) take turns on a
  lock file `<set>.lock` (where the filesystem has flock): one generates, the others wait and
  use what it wrote, rather than replacing the folder under a run that already reads it.
  """
  params = _params(**kwargs)
  key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
  root = pathlib.Path(cache_dir).absolute() / f'affwild2_synthetic_{key}'
  if _matches(root, params):
    return root

  def on_wait(holder):  # said as the decoded cache says it: with the progress output
    if progress:
      print(f'Waiting for {holder} to finish generating the synthetic Aff-Wild2 ({root})',
            flush=True)

  root.parent.mkdir(parents=True, exist_ok=True)
  with files.exclusive_lock(f'{root}.lock', on_wait):
    if not _matches(root, params):  # else generated by the process this one waited for
      generate(root, progress=progress, **kwargs)
  return root


def _matches(root: pathlib.Path, params: dict) -> bool:
  manifest = _read_manifest(root)
  return manifest is not None and manifest.get('params') == params


def main(argv=None):
  parser = argparse.ArgumentParser(prog='python -m affectjax.data.synthetic',
                                   description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True, help='output folder (replaced if synthetic)')
  parser.add_argument('--num-videos', type=int, default=64)
  parser.add_argument('--frames-per-video', type=int, default=140)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--image-size', type=int, default=112)
  parser.add_argument('--val-fraction', type=float, default=0.3)
  parser.add_argument('--num-expr-classes', type=int, default=7, choices=(7, 8),
                      help='classes in the per-task EXPR files (s-Aff-Wild2 files always use 8)')
  parser.add_argument('--length-jitter', type=float, default=0.25)
  parser.add_argument('--preset', default='default', choices=hard.PRESETS,
                      help='hard: Aff-Wild2-like labels and difficulty (synthetic/hard.py)')
  args = parser.parse_args(argv)
  generate(args.out, num_videos=args.num_videos, frames_per_video=args.frames_per_video,
           seed=args.seed, image_size=args.image_size, val_fraction=args.val_fraction,
           num_expr_classes=args.num_expr_classes, length_jitter=args.length_jitter,
           preset=args.preset)


if __name__ == '__main__':
  main()
