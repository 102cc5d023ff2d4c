"""Tests of the synthetic Aff-Wild2: determinism, layout, label coverage, AU visibility, caching."""
import json
import pathlib
import threading
import time

import numpy as np
import pytest
from PIL import Image

from affectjax import labels
from affectjax.data import layout
from affectjax.data.synthetic import faces
from affectjax.data.synthetic import generate
from affectjax.data.synthetic import tracks

TINY = dict(num_videos=3, frames_per_video=16, seed=3)
SMALL = dict(num_videos=9, frames_per_video=60, seed=0, num_expr_classes=8)
AU_SENTINEL = ','.join(['-1'] * 12)


def _tree_bytes(root: pathlib.Path) -> dict:
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob('*')) if p.is_file()}


def _task_file(root, task, split, video):
  return (root / 'Annotations' / layout.TASK_FOLDERS[task][0] / layout.SPLIT_FOLDERS[split][0] /
          f'{video}.txt')


def _read_lines(path):
  return path.read_text().splitlines()


@pytest.fixture(scope='module')
def small(tmp_path_factory):
  """(root, manifest) of a 9-video set with 8-class per-task EXPR files."""
  root = tmp_path_factory.mktemp('small') / 'data'
  generate.generate(root, progress=False, **SMALL)
  return root, json.loads((root / generate.MANIFEST).read_text())


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
  generate.generate(tmp_path / 'a', progress=False, **TINY)
  generate.generate(tmp_path / 'b', progress=False, **TINY)
  generate.generate(tmp_path / 'c', progress=False, **dict(TINY, seed=4))
  a, b, c = (_tree_bytes(tmp_path / n) for n in 'abc')
  assert len(a) > 50 and a == b
  shared = set(a) & set(c)
  assert sum(a[k] != c[k] for k in shared) > len(shared) // 2


def test_video_files_do_not_depend_on_generation_order(tmp_path, small):
  """A video written on its own equals the same video inside the full generation."""
  root, manifest = small
  plans = generate.plan_videos(SMALL['num_videos'], SMALL['frames_per_video'], SMALL['seed'])
  params = manifest['params']
  last = plans[-1]
  with generate.tqdm.tqdm(disable=True) as bar:
    generate._write_video(tmp_path, last, params, bar)
  alone = _tree_bytes(tmp_path)
  assert alone and all(alone[k] == (root / k).read_bytes() for k in alone)


def test_layout_headers_and_line_counts(small):
  root, manifest = small
  videos = manifest['videos']
  assert {v['split'] for v in videos} == {'train', 'validation'}
  missing_images = 0
  for v in videos:
    frames = sorted((root / 'cropped_aligned' / v['name']).glob('*.jpg'))
    assert len(frames) == v['images'] and frames[0].name[-9:-4].isdigit()
    missing_images += v['frames'] - v['images']
    for task in labels.TASKS:
      path = _task_file(root, task, v['split'], v['name'])
      other = _task_file(root, task, 'train' if v['split'] == 'validation' else 'validation',
                         v['name'])
      assert path.exists() == (task in v['tasks']) and not other.exists()
      if task not in v['tasks']:
        continue
      lines = _read_lines(path)
      assert len(lines) == v['frames'] + 1
      assert lines[0] == {'va': 'valence,arousal', 'expr': ','.join(labels.EXPR_CLASSES_8),
                          'au': ','.join(labels.AU_NAMES)}[task]
  assert missing_images > 0  # annotated frames without a face crop
  with Image.open(frames[0]) as im:
    assert im.format == 'JPEG' and im.size == (112, 112) and im.mode == 'RGB'
  for split, name in layout.MTL_FILES.items():
    lines = _read_lines(root / name)
    assert lines[0] == ('image,valence,arousal,expression,AU1,AU2,AU4,AU6,AU7,AU10,AU12,AU15,'
                        'AU23,AU24,AU25,AU26')
    assert len(lines) - 1 == manifest['counts'][split]['mtl_rows'] > 0
    assert all((root / 'cropped_aligned' / row.split(',')[0]).exists() for row in lines[1:])


def test_mtl_rows_equal_per_task_labels(small):
  """Every s-Aff-Wild2 row repeats the per-task lines of its frame (sentinels where not annotated)."""
  root, manifest = small
  by_name = {v['name']: v for v in manifest['videos']}
  for split, name in layout.MTL_FILES.items():
    for row in _read_lines(root / name)[1:]:
      image, va, expr, au = row.split(',', 1)[0], row.split(',')[1:3], row.split(',')[3], row
      video, frame = image.split('/')
      k, v = int(frame[:5]), by_name[video]
      lines = {t: _read_lines(_task_file(root, t, split, video))[k] for t in v['tasks']}
      assert ','.join(va) == lines.get('va', '-5,-5')
      assert expr == lines.get('expr', '-1')
      assert au.split(',', 4)[4] == lines.get('au', AU_SENTINEL)


def test_label_values_coverage_and_pairs(small):
  root, manifest = small
  videos = manifest['videos']
  for task in labels.TASKS:  # some videos lack each task, some carry it
    assert 0 < sum(task in v['tasks'] for v in videos) < len(videos)
  assert any(len(v['tasks']) == 1 for v in videos) and any(len(v['tasks']) == 3 for v in videos)
  sentinels = dict.fromkeys(labels.TASKS, 0)
  for v in videos:
    for task in v['tasks']:
      body = _read_lines(_task_file(root, task, v['split'], v['name']))[1:]
      values = np.array([[float(x) for x in line.split(',')] for line in body])
      if task == 'va':
        gone = (values == -5).all(1)
        assert ((values == -5).any(1) == gone).all() and (np.abs(values[~gone]) <= 1).all()
      elif task == 'expr':
        gone = values[:, 0] == -1
        assert set(values[~gone, 0]) <= set(range(8))
      else:
        gone = (values == -1).all(1)
        assert ((values == -1).any(1) == gone).all() and set(values[~gone].ravel()) <= {0, 1}
      sentinels[task] += int(gone.sum())
  assert all(n > 0 for n in sentinels.values()), sentinels
  names = {v['name']: v for v in videos}
  pairs = [n[:-5] for n in names if n.endswith('_left')]
  assert pairs and all(names[p + '_left']['frames'] == names[p + '_right']['frames'] and
                       names[p + '_left']['split'] == names[p + '_right']['split'] for p in pairs)


def test_seven_class_files_mark_other_missing(small):
  """The written 8-class EXPR lines come from the latent track; with 7 classes Other becomes -1."""
  root, manifest = small
  plans = generate.plan_videos(SMALL['num_videos'], SMALL['frames_per_video'], SMALL['seed'])
  others = 0
  for plan in plans:
    if 'expr' not in plan.tasks:
      continue
    track = tracks.simulate_track(generate._video_rng(SMALL['seed'], plan.index), plan.num_frames,
                              plan.forced_expr)
    on_disk = _read_lines(_task_file(root, 'expr', plan.split, plan.name))
    assert generate._task_lines('expr', track, 8) == on_disk
    seven = generate._task_lines('expr', track, 7)
    assert seven[0] == ','.join(labels.EXPR_CLASSES_7)
    e8, e7 = (np.array(lines[1:], int) for lines in (on_disk, seven))
    np.testing.assert_array_equal(e7, np.where(e8 == 7, -1, e8))
    others += int((e8 == 7).sum())
  assert others > 0


def test_default_size_has_every_class_in_both_splits():
  """The default plan's latent tracks (no rendering): each 7-class label in train and validation."""
  params = generate._params()
  plans = generate.plan_videos(params['num_videos'], params['frames_per_video'], params['seed'])
  counts = {split: np.zeros(8, int) for split in layout.SPLIT_FOLDERS}
  for plan in plans:
    if 'expr' in plan.tasks:
      track = tracks.simulate_track(generate._video_rng(params['seed'], plan.index),
                                plan.num_frames, plan.forced_expr)
      counts[plan.split] += np.bincount(track['expr'][~track['missing']['expr']], minlength=8)
  for split, c in counts.items():
    assert (c > 0).all(), (split, c)
    assert c[[0, 4]].sum() > 0.35 * c[:7].sum(), c  # Neutral and Happiness dominate (2/7 = 0.29)


def test_tracks_are_smooth_and_segmented():
  track = tracks.simulate_track(np.random.default_rng(0), 2000)
  changes = np.flatnonzero(np.diff(track['expr']) != 0)
  assert len(changes) > 20 and np.diff(changes).min() >= 12  # segments of 12..36 frames
  va_step = np.abs(np.diff(track['va'], axis=0)).mean(0)
  assert (va_step < 0.1 * track['va'].std(0)).all()
  au_step = np.abs(np.diff(track['au_intensity'], axis=0))
  assert au_step.max() < 0.6  # ramps over several frames, never a jump
  present = track['au_intensity'] > 0.5
  assert 0.05 < present.mean() < 0.5


@pytest.mark.parametrize('au_name', labels.AU_NAMES)
def test_each_au_moves_its_own_region(au_name):
  identity = faces.Identity()
  base = faces.render_face(np.zeros(12), identity).astype(float)
  au = np.zeros(12)
  au[labels.AU_NAMES.index(au_name)] = 1.0
  diff = np.abs(faces.render_face(au, identity).astype(float) - base).sum(-1)
  x0, y0, x1, y1 = faces.FACE_REGIONS[faces.AU_REGIONS[au_name]]
  inside = diff[y0:y1, x0:x1].sum() / diff.sum()
  assert (diff > 60).sum() >= 100, 'too small to see'
  assert inside > 0.95, inside
  au[labels.AU_NAMES.index(au_name)] = 0.5  # intensity is continuous: half-way moves part-way
  half = np.abs(faces.render_face(au, identity).astype(float) - base).sum()
  assert 0.2 * diff.sum() < half < 0.9 * diff.sum()


def test_au_effects_are_distinct():
  identity = faces.Identity()
  base = faces.render_face(np.zeros(12), identity).astype(float)
  diffs = []
  for i in range(12):
    au = np.zeros(12)
    au[i] = 1.0
    d = (faces.render_face(au, identity).astype(float) - base).ravel()
    diffs.append(d / np.linalg.norm(d))
  cosine = np.array(diffs) @ np.array(diffs).T
  np.fill_diagonal(cosine, 0)
  assert cosine.max() < 0.9, np.unravel_index(cosine.argmax(), cosine.shape)


def test_jpegs_are_rgb(small):
  """Skin is redder than blue in every crop: channels were converted from OpenCV's BGR."""
  root, manifest = small
  for v in manifest['videos'][:3]:
    path = sorted((root / 'cropped_aligned' / v['name']).glob('*.jpg'))[0]
    rgb = np.asarray(Image.open(path).convert('RGB'), float)
    patch = rgb[66:74, 30:38].mean((0, 1))
    assert patch[0] > patch[2] + 15, patch


def _sets(cache_dir) -> list:
  """The names of what a cache folder holds besides the sets' lock files (left in place)."""
  return sorted(p.name for p in cache_dir.iterdir() if not p.name.endswith('.lock'))


def test_ensure_synthetic_reuses_and_regenerates(tmp_path, monkeypatch):
  calls = []
  generate_set = generate.generate
  monkeypatch.setattr(generate, 'generate',
                      lambda *a, **k: calls.append(1) or generate_set(*a, **k))
  root = generate.ensure_synthetic(tmp_path, progress=False, **TINY)
  first = _tree_bytes(root)
  assert generate.ensure_synthetic(tmp_path, progress=False, **TINY) == root and len(calls) == 1
  other = generate.ensure_synthetic(tmp_path, progress=False, **dict(TINY, seed=9))
  assert other != root and len(calls) == 2
  manifest = json.loads((root / generate.MANIFEST).read_text())
  manifest['params']['generator_version'] = -1  # as if written by an older generator
  (root / generate.MANIFEST).write_text(json.dumps(manifest))
  assert generate.ensure_synthetic(tmp_path, progress=False, **TINY) == root and len(calls) == 3
  assert _tree_bytes(root) == first
  assert _sets(tmp_path) == sorted([root.name, other.name])


def test_processes_asking_for_one_set_at_once_generate_it_once(tmp_path, monkeypatch, capsys):
  """A run that asks for a set while another generates it waits and uses that one; it does not
  generate it again and replace the folder under the first run."""
  started, release, calls = threading.Event(), threading.Event(), []
  generate_set = generate.generate

  def slow_generate(*a, **k):
    calls.append(1)
    started.set()
    assert release.wait(60)
    return generate_set(*a, **k)

  monkeypatch.setattr(generate, 'generate', slow_generate)
  roots = []
  first = threading.Thread(
      target=lambda: roots.append(generate.ensure_synthetic(tmp_path, progress=False, **TINY)))
  first.start()
  second = threading.Thread(  # with progress: it says whom it waits for
      target=lambda: roots.append(generate.ensure_synthetic(tmp_path, progress=True, **TINY)))
  try:
    assert started.wait(60)
    second.start()
    for _ in range(100):  # the second waits on the lock, saying for whom
      if 'Waiting for host' in capsys.readouterr().out:
        break
      time.sleep(0.05)
    else:
      raise AssertionError('the second caller did not wait for the first')
  finally:
    release.set()  # a failure above must not leave the first thread waiting
    first.join(60)
    if second.ident is not None:  # started
      second.join(60)
  assert len(calls) == 1 and len(roots) == 2 and roots[0] == roots[1]
  assert (roots[0] / generate.MANIFEST).exists()


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
  write_video = generate._write_video

  def fail_on_third(root, plan, params, bar):
    if plan.index == 2:
      raise KeyboardInterrupt
    return write_video(root, plan, params, bar)

  monkeypatch.setattr(generate, '_write_video', fail_on_third)
  with pytest.raises(KeyboardInterrupt):
    generate.ensure_synthetic(tmp_path, progress=False, **TINY)
  assert _sets(tmp_path) == []
  monkeypatch.setattr(generate, '_write_video', write_video)
  root = generate.ensure_synthetic(tmp_path, progress=False, **TINY)
  assert (root / generate.MANIFEST).exists()


def test_generate_refuses_to_replace_other_folders(tmp_path):
  (tmp_path / 'notes.txt').write_text('mine')
  with pytest.raises(FileExistsError):
    generate.generate(tmp_path, progress=False, **TINY)
  assert (tmp_path / 'notes.txt').read_text() == 'mine'


def test_cli_prints_summary(tmp_path, capsys):
  generate.main(['--out', str(tmp_path / 'cli'), '--num-videos', '3', '--frames-per-video', '10',
                  '--seed', '1'])
  out = capsys.readouterr().out
  assert 'train' in out and 'validation' in out and 'EXPR' in out
  assert (tmp_path / 'cli' / 'training_set_annotations.txt').exists()


def test_index_reads_both_layouts_with_expected_counts(small):
  """build_index sees the same frames and labels through the per-task files and s-Aff-Wild2."""
  from affectjax.data import index as index_lib
  root, manifest = small
  for split, counts in manifest['counts'].items():
    per_task, mtl = (index_lib.build_index(root, split, layout=layout, num_expr_classes=8,
                                           use_cache=False) for layout in ('per_task', 'mtl'))
    assert len(per_task) == len(mtl) == counts['mtl_rows']
    for task in labels.TASKS:
      assert per_task.summary['labelled'][task] == counts[f'{task}_labels']
    assert per_task.image_paths() == mtl.image_paths()
    for column in ('expr', 'au', 'va'):
      np.testing.assert_array_equal(getattr(per_task, column), getattr(mtl, column))
    videos = [v for v in manifest['videos'] if v['split'] == split]
    assert set(per_task.video_names) <= {v['name'] for v in videos}
  train = index_lib.build_index(root, 'train', num_expr_classes=8, use_cache=False)
  assert train.summary['two_subject_videos'] == 2



@pytest.mark.parametrize('name,region', [('AU19', 'mouth'), ('AU34', 'cheeks')])
def test_other_gestures_are_visible_in_their_region(name, region):
  """Other frames show a gesture no basic expression has (tongue show, cheek puff)."""
  identity = faces.Identity()
  base = faces.render_face(np.zeros(12), identity).astype(float)
  other = np.zeros(2)
  other[faces.OTHER_AU_NAMES.index(name)] = 1.0
  diff = np.abs(faces.render_face(np.zeros(12), identity, other_aus=other) - base).sum(-1)
  x0, y0, x1, y1 = faces.FACE_REGIONS[region]
  assert (diff > 60).sum() >= 60 and diff[y0:y1, x0:x1].sum() > 0.9 * diff.sum()
