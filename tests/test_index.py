"""Tests for the Aff-Wild2 frame index on tiny hand-written datasets (both annotation layouts)."""
import os
import subprocess
import sys

import numpy as np
import pytest

from affectjax import labels
from affectjax.data import annotations
from affectjax.data import index as index_lib
from affectjax.data.annotations import AnnotationError
from affectjax.data.index import build_index
from affectjax.data.layout import DatasetLayoutError

TASK_FOLDER = {'expr': 'EXPR_Set', 'au': 'AU_Set', 'va': 'VA_Set'}
HEADER = {'expr': ','.join(labels.EXPR_CLASSES_8), 'au': ','.join(labels.AU_NAMES),
          'va': 'valence,arousal'}
NO_AU = [-1] * 12


def write_lines(path, header, rows, newline='\n', trailer=''):
  """Writes header + rows (strings, numbers, or sequences joined with commas)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  lines = [header] + [','.join(str(v) for v in r) if np.ndim(r) else str(r) for r in rows]
  with open(path, 'w', newline='') as f:
    f.write(newline.join(lines) + newline + trailer)
  return path


def per_task(root, task, video, rows, *, annotations_dir='Annotations', task_dir=None,
             split_dir='Train_Set', **kwargs):
  folder = os.path.join(root, annotations_dir, task_dir or TASK_FOLDER[task], split_dir)
  return write_lines(os.path.join(folder, video + '.txt'), HEADER[task], rows, **kwargs)


def mtl(root, rows, split='train', header=','.join(annotations.MTL_HEADER)):
  name = {'train': 'training_set_annotations.txt', 'validation': 'validation_set_annotations.txt'}
  return write_lines(os.path.join(root, name[split]), header, rows)


def images(root, video, frames):
  folder = os.path.join(root, 'cropped_aligned', video)
  os.makedirs(folder, exist_ok=True)
  for f in frames:
    open(os.path.join(folder, f'{f:05d}.jpg'), 'wb').close()


def au_row(*on):
  """12 AU labels: 1 at the given AU indices, 0 elsewhere."""
  return [1 if i in on else 0 for i in range(12)]


def rows_of(index, video):
  return np.flatnonzero(np.asarray(index.video_names)[index.video_id] == video)


@pytest.fixture
def merged_root(tmp_path):
  """Video a: EXPR 4 lines, AU 3, VA 5 (frame 3 unlabelled, frame 5 VA only); video b: EXPR only
  (frame 1 unlabelled, frame 3 without image)."""
  root = str(tmp_path / 'data')
  per_task(root, 'expr', 'a', [0, 3, -1, 6])
  per_task(root, 'au', 'a', [au_row(0), au_row(11), NO_AU])
  per_task(root, 'va', 'a', ['0.5,-0.25', '-5,-5', '-5,-5', '-1,1', '0.125,-0.5'])
  per_task(root, 'expr', 'b', [-1, 2, 5])
  images(root, 'a', range(1, 6))
  images(root, 'b', [1, 2])
  return root


def test_per_task_merges_labels_per_frame(merged_root):
  index = build_index(merged_root, 'train', use_cache=False)
  assert index.video_names == ('a', 'b')
  a, b = rows_of(index, 'a'), rows_of(index, 'b')
  np.testing.assert_array_equal(index.frame[a], [1, 2, 4, 5])  # frame 3: no label at all
  np.testing.assert_array_equal(index.expr[a], [0, 3, 6, -1])
  np.testing.assert_array_equal(index.au[a], [au_row(0), au_row(11), NO_AU, NO_AU])
  np.testing.assert_array_equal(index.va[a], np.float32([[.5, -.25], [-5, -5], [-1, 1],
                                                          [.125, -.5]]))
  np.testing.assert_array_equal(index.frame[b], [2])  # frame 1 unlabelled, frame 3 no image
  np.testing.assert_array_equal(index.expr[b], [2])
  assert index.expr.dtype == np.int8 and index.au.dtype == np.int8
  assert index.va.dtype == np.float32 and index.frame.dtype == np.int32
  np.testing.assert_array_equal(index.has_label('expr'), [1, 1, 1, 0, 1])
  np.testing.assert_array_equal(index.has_label('au'), [1, 1, 0, 0, 0])
  np.testing.assert_array_equal(index.has_label('va'), [1, 0, 1, 1, 0])
  s = index.summary
  assert s['layout'] == 'per_task' and s['annotation_files'] == {'expr': 2, 'au': 1, 'va': 1}
  assert s['frames_seen'] == 8 and s['kept'] == 5 == len(index)
  assert s['dropped'] == {'no_requested_label': 2, 'no_image': 1}
  assert s['annotation_lines'] == {'expr': 7, 'au': 3, 'va': 5}
  assert s['labelled'] == {'expr': 5, 'au': 2, 'va': 3}
  assert s['kept_labels'] == {'expr': 4, 'au': 2, 'va': 3}
  text = index.describe()
  assert 'no_image 1' in text and 'kept: 5 frames in 2 videos' in text
  # Files shorter than their video's longest (a's EXPR and AU files) are counted and named.
  assert s['annotation_gaps']['short_files'] == 2 and s['annotation_gaps']['crops_beyond'] == 0
  assert 'warning: 2 per-task annotation files have fewer lines' in text
  assert 'EXPR_Set/Train_Set/a.txt: 4 lines, 5 in the longest' in text.replace(os.sep, '/')


def test_tasks_argument_leaves_other_labels_missing(merged_root):
  index = build_index(merged_root, 'train', tasks=('au',), use_cache=False)
  np.testing.assert_array_equal(index.frame, [1, 2])
  np.testing.assert_array_equal(index.au, [au_row(0), au_row(11)])
  assert (index.expr == -1).all() and (index.va == -5).all()
  assert index.summary['dropped'] == {'no_requested_label': 1, 'no_image': 0}
  va_only = build_index(merged_root, 'train', tasks=['va'], use_cache=False)
  np.testing.assert_array_equal(va_only.frame, [1, 4, 5])
  assert (va_only.au == -1).all() and (va_only.expr == -1).all()


def test_missing_image_folder_and_check_images_off(merged_root):
  images_b = os.path.join(merged_root, 'cropped_aligned', 'b')
  for name in os.listdir(images_b):
    os.remove(os.path.join(images_b, name))
  os.rmdir(images_b)
  index = build_index(merged_root, 'train', use_cache=False)
  assert index.video_names == ('a',)
  s = index.summary
  assert s['videos_without_images'] == 1 and s['videos_dropped'] == 1
  assert s['dropped'] == {'no_requested_label': 2, 'no_image': 2}
  assert s['frames_seen'] == s['kept'] + sum(s['dropped'].values())
  unchecked = build_index(merged_root, 'train', check_images=False, use_cache=False)
  np.testing.assert_array_equal(unchecked.frame, [1, 2, 4, 5, 2, 3])


def test_two_subject_videos_keep_suffix_and_record_source(tmp_path):
  root = str(tmp_path)
  for video in ('12-24_left', '12-24_right', '7'):
    per_task(root, 'expr', video, [1, 2])
    images(root, video, [1, 2])
  index = build_index(root, 'train', tasks=('expr',), use_cache=False)
  assert index.video_names == ('12-24_left', '12-24_right', '7')
  assert index.source_videos == ('12-24', '12-24', '7')
  assert index.summary['two_subject_videos'] == 2
  assert index.image_path(2) == os.path.join(root, 'cropped_aligned', '12-24_right', '00001.jpg')
  assert index.image_paths() == [index.image_path(i) for i in range(len(index))]
  assert index.image_paths([5, 0]) == [index.image_path(5), index.image_path(0)]


@pytest.mark.parametrize('annotations_dir,split_dir,folders', [
    ('annotations', 'Training_Set', TASK_FOLDER),
    ('Annotations', 'Train_Set', {'expr': 'EXPR_Recognition_Challenge',
                                  'au': 'AU_Detection_Challenge',
                                  'va': 'VA_Estimation_Challenge'}),
    ('', 'Train_Set', TASK_FOLDER),
    ('6th ABAW Annotations', 'train_set', TASK_FOLDER),
])
def test_folder_name_variants(tmp_path, annotations_dir, split_dir, folders):
  root = str(tmp_path)
  for task, row in (('expr', 4), ('au', au_row(3)), ('va', '0.5,0.5')):
    per_task(root, task, 'v', [row], annotations_dir=annotations_dir, split_dir=split_dir,
             task_dir=folders[task])
  images(root, 'v', [1])
  index = build_index(root, 'train', use_cache=False)
  assert (index.expr.tolist(), index.au.tolist(), index.va.tolist()) == (
      [4], [au_row(3)], [[0.5, 0.5]])


def test_eight_classes_with_other_and_seven_class_error(tmp_path):
  root = str(tmp_path)
  path = per_task(root, 'expr', 'v', [0, 7, -1])
  images(root, 'v', [1, 2, 3])
  index = build_index(root, 'train', tasks=('expr',), num_expr_classes=8, use_cache=False)
  np.testing.assert_array_equal(index.expr, [0, 7])
  with pytest.raises(AnnotationError) as e:
    build_index(root, 'train', tasks=('expr',), num_expr_classes=7, use_cache=False)
  assert path in str(e.value) and 'line 3' in str(e.value) and 'use 8 EXPR classes' in str(e.value)


def test_windows_line_endings_and_trailing_blank_lines(tmp_path):
  root = str(tmp_path)
  per_task(root, 'au', 'v', [au_row(1), NO_AU, au_row(2)], newline='\r\n', trailer='\r\n\r\n')
  per_task(root, 'va', 'v', ['0.5,0.25', '-0.75,1'], newline='\r\n', trailer='\n\n')
  index = build_index(root, 'train', tasks=('au', 'va'), check_images=False, use_cache=False)
  np.testing.assert_array_equal(index.frame, [1, 2, 3])
  np.testing.assert_array_equal(index.au, [au_row(1), NO_AU, au_row(2)])
  np.testing.assert_array_equal(index.va, [[0.5, 0.25], [-0.75, 1], [-5, -5]])


def test_parsers_match_a_python_reference(tmp_path):
  """Random files through the fast paths and the fallbacks, against float()/int() per field."""
  rng = np.random.default_rng(0)
  au = rng.choice([-1, 0, 1], (300, 12))
  au[::9] = -1
  floats = [repr(round(float(x), int(d))) for x, d in zip(rng.uniform(-1, 1, 600),
                                                          rng.integers(0, 17, 600))]
  floats[:6] = ['-5', '-5', '1e-3', ' 0.25', '-0', '0']  # exponent, space: the strtod fallback
  va_rows = [f'{a},{b}' for a, b in zip(floats[::2], floats[1::2])]
  expr = rng.integers(-1, 8, 300)
  p = [per_task(str(tmp_path), t, 'v', r) for t, r in (('au', au), ('va', va_rows),
                                                       ('expr', expr))]
  np.testing.assert_array_equal(annotations.read_au_file(p[0]), au)
  np.testing.assert_array_equal(annotations.read_va_file(p[1]),
                                np.float32([[float(x) for x in r.split(',')] for r in va_rows]))
  np.testing.assert_array_equal(annotations.read_expr_file(p[2], 8), expr)
  spaced = per_task(str(tmp_path), 'au', 'w', [' 1,' + ','.join(['0'] * 11), '+1.0,' +
                                               ','.join(['-1'] * 11)])
  np.testing.assert_array_equal(annotations.read_au_file(spaced), [au_row(0), [1] + [-1] * 11])


def test_mtl_layout(tmp_path):
  root = str(tmp_path)
  mtl(root, ['v_left/00002.jpg,-5,-5,7,' + ','.join(['-1'] * 12),
             'u/00010.jpg,0.5,-0.5,-1,' + ','.join(map(str, au_row(2))),
             'v_left/00001.jpg,0.25,0.75,3,' + ','.join(['-1'] * 12),
             'u/00003.jpg,-5,-5,-1,' + ','.join(['-1'] * 12),
             'prefix/u/00004.JPG,0.75,0.5,-1,' + ','.join(['-1'] * 12)])
  images(root, 'u', [3, 4, 10])
  images(root, 'v_left', [1])
  index = build_index(root, 'train', use_cache=False)
  assert index.summary['layout'] == 'mtl' and index.video_names == ('u', 'v_left')
  np.testing.assert_array_equal(index.frame, [4, 10, 1])
  np.testing.assert_array_equal(index.expr, [-1, -1, 3])
  np.testing.assert_array_equal(index.au, [NO_AU, au_row(2), NO_AU])
  np.testing.assert_array_equal(index.va, [[.75, .5], [.5, -.5], [.25, .75]])
  assert index.source_videos == ('u', 'v')
  assert index.summary['dropped'] == {'no_requested_label': 1, 'no_image': 1}
  expr_only = build_index(root, 'train', tasks=('expr',), layout='mtl', use_cache=False)
  np.testing.assert_array_equal(expr_only.expr, [3])
  assert (expr_only.va == -5).all()
  # With both layouts present, auto prefers the per-task sets; 'mtl' still picks the file.
  per_task(root, 'expr', 'u', [-1, -1, 1])  # frame 3 has a crop
  index = build_index(root, 'train', tasks=('expr',), use_cache=False)
  assert index.summary['layout'] == 'per_task' and index.expr.tolist() == [1]
  assert build_index(root, 'train', tasks=('expr',), layout='mtl',
                     use_cache=False).summary['layout'] == 'mtl'


def test_mtl_file_parsed_in_pieces_keeps_rows_and_line_numbers(tmp_path, monkeypatch):
  rng = np.random.default_rng(1)
  va = [f'{rng.uniform(-1, 1):.3f},{rng.uniform(-1, 1):.3f}' if k % 2 == 0 else '-5,-5'
        for k in range(60)]
  rows = [f'v{k % 3}/{k + 1:05d}.jpg,{va[k]},{k % 8},' +
          ','.join(map(str, rng.integers(-1, 2, 12))) for k in range(60)]
  rows = rows[::-1]  # unsorted on purpose
  path = mtl(str(tmp_path), rows)
  whole = build_index(str(tmp_path), 'train', check_images=False, use_cache=False)
  monkeypatch.setattr(annotations, 'MTL_CHUNK_BYTES', 200)  # about 4 rows a piece
  pieces = build_index(str(tmp_path), 'train', check_images=False, use_cache=False)
  for name in ('video_id', 'frame', 'expr', 'au', 'va'):
    np.testing.assert_array_equal(getattr(pieces, name), getattr(whole, name))
  assert whole.video_names == ('v0', 'v1', 'v2') and len(whole) == 60
  write_lines(path, ','.join(annotations.MTL_HEADER), rows, newline='\r\n', trailer='\r\n' * 30)
  crlf = build_index(str(tmp_path), 'train', check_images=False, use_cache=False)
  np.testing.assert_array_equal(crlf.va, whole.va)
  mtl(str(tmp_path), rows[:30] + [''] * 40 + rows[30:])  # blank lines inside are errors
  with pytest.raises(AnnotationError) as e:
    build_index(str(tmp_path), 'train', check_images=False, use_cache=False)
  _assert_names_line(e, path, 32, 'expected 16 comma-separated fields, found 1')
  mtl(str(tmp_path), rows[:45] + ['v1/00002.jpg' + rows[45][12:]] + rows[46:])  # line 47
  with pytest.raises(AnnotationError) as e:
    build_index(str(tmp_path), 'train', check_images=False, use_cache=False)
  _assert_names_line(e, path, 60, 'duplicate', 'same image is on line 47')  # row 59 = frame 2
  mtl(str(tmp_path), rows[:50] + [rows[50].replace(',-5,', ',-7,')] + rows[51:])
  with pytest.raises(AnnotationError) as e:
    build_index(str(tmp_path), 'train', check_images=False, use_cache=False)
  _assert_names_line(e, path, 52, 'valence/arousal')


def test_cache_hit_and_invalidation(tmp_path, monkeypatch):
  root = str(tmp_path)
  path = per_task(root, 'expr', 'v', [1, 2, 3])
  images(root, 'v', [1, 2, 3, 4])
  reads = []
  real_read = annotations.read_expr_file
  monkeypatch.setattr(annotations, 'read_expr_file', lambda *a: reads.append(a) or real_read(*a))
  build = lambda **kw: build_index(root, 'train', tasks=('expr',), **kw)
  first = build()
  assert len(reads) == 1 and os.listdir(os.path.join(root, '.affectjax_cache'))
  again = build()
  assert len(reads) == 1 and again.expr.tolist() == first.expr.tolist() == [1, 2, 3]
  assert again.summary == first.summary and again.root == root
  per_task(root, 'expr', 'v', [1, 2, 3, 4])  # size changes
  assert build().expr.tolist() == [1, 2, 3, 4] and len(reads) == 2
  per_task(root, 'expr', 'v', [1, 2, 3, 5])  # same size: the mtime tells
  st = os.stat(path)
  os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  assert build().expr.tolist() == [1, 2, 3, 5] and len(reads) == 3
  build()
  assert len(reads) == 3
  per_task(root, 'expr', 'w', [6])  # a new file
  images(root, 'w', [1])
  assert build().expr.tolist() == [1, 2, 3, 5, 6] and len(reads) == 5
  assert build(num_expr_classes=7).summary['num_expr_classes'] == 7 and len(reads) == 7
  os.remove(os.path.join(root, 'cropped_aligned', 'v', '00004.jpg'))  # crop folders count too
  assert build().frame.tolist() == [1, 2, 3, 1] and len(reads) == 9


def test_cache_dir_and_read_only_fallback(tmp_path, monkeypatch):
  root = str(tmp_path / 'data')
  per_task(root, 'expr', 'v', [1])
  cache = tmp_path / 'cache'
  build_index(root, 'train', tasks=('expr',), check_images=False, cache_dir=cache)
  assert len(os.listdir(cache)) == 1 and not os.path.exists(os.path.join(root, '.affectjax_cache'))
  open(os.path.join(root, '.affectjax_cache'), 'w').close()  # the data folder cannot take it
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  build_index(root, 'train', tasks=('expr',), check_images=False)
  user_cache = tmp_path / 'home' / '.cache' / 'affectjax'
  assert len(os.listdir(user_cache)) == 1
  monkeypatch.setattr(annotations, 'read_expr_file', None)  # a rebuild would fail
  assert build_index(root, 'train', tasks=('expr',), check_images=False).expr.tolist() == [1]


def test_save_load_subset(merged_root, tmp_path):
  index = build_index(merged_root, 'train', use_cache=False)
  path = str(tmp_path / 'index.npz')
  index.save(path)
  with np.load(path, allow_pickle=False) as z:  # no pickled objects inside
    assert z['au'].dtype == np.int8
  loaded = index_lib.AffWild2Index.load(path)
  for name in ('video_id', 'frame', 'expr', 'au', 'va'):
    np.testing.assert_array_equal(getattr(loaded, name), getattr(index, name))
    assert getattr(loaded, name).dtype == getattr(index, name).dtype
  assert (loaded.video_names, loaded.summary, loaded.root) == (
      index.video_names, index.summary, index.root)
  assert index_lib.AffWild2Index.load(path, root='/elsewhere').image_path(0).startswith(
      '/elsewhere/cropped_aligned/a/')
  sub = index.subset(index.has_label('va'))
  np.testing.assert_array_equal(sub.frame, [1, 4, 5])
  assert sub.video_names == index.video_names and sub.summary['subset'] == {'from': 5, 'rows': 3}
  assert 'subset: 3 of 5 rows' in sub.describe()
  assert len(index.subset([])) == 0 and 'rows=5, videos=2' in repr(index)
  picked = index.subset([4, 0])
  assert picked.image_path(0) == index.image_path(4) and picked.expr.tolist() == [2, 0]


def test_index_module_does_not_import_jax():
  code = 'import sys, affectjax.data.index; assert "jax" not in sys.modules, sys.modules.keys()'
  subprocess.run([sys.executable, '-c', code], check=True)


def _assert_names_line(error, path, lineno, *fragments):
  message = str(error.value)
  assert os.path.basename(path) in message and f'line {lineno}:' in message, message
  for fragment in fragments:
    assert fragment in message, message


@pytest.mark.parametrize('task,rows,lineno,fragments', [
    ('au', [au_row(1), [0] * 11], 3, ['expected 12 comma-separated fields, found 11']),
    ('au', [au_row(1), au_row(2), [0, 1] * 5 + ['x', 0]], 4, ['field 11 is not a number']),
    ('au', [au_row(1), [0] * 11 + [2]], 3, ['AU labels must be']),
    ('au', [au_row(1), [0] * 11 + [-2]], 3, ['AU labels must be']),
    ('expr', [1, 2, 9], 4, ['expression label 9 outside -1..7']),
    ('expr', [1, '', 2], 3, ['not a number']),
    ('expr', [1, 2, 1.5], 4, ['must be integers', '1.5']),
    ('va', ['0.5,0.5', '0.5,1.5'], 3, ['[-1, 1]', '0.5,1.5']),
    ('va', ['0.5,0.5', '-4,0'], 3, ['[-1, 1] or be -5']),
    ('va', ['nan,0.5'], 2, ['[-1, 1]']),
    ('va', ['0.5,0.5', '0.5'], 3, ['expected 2 comma-separated fields, found 1']),
    ('va', ['0.5,0.5', '0.5,abc'], 3, ['field 2 is not a number', 'abc']),
])
def test_bad_per_task_lines_name_file_and_line(tmp_path, task, rows, lineno, fragments):
  path = per_task(str(tmp_path), task, 'bad_video', rows)
  with pytest.raises(AnnotationError) as e:
    build_index(str(tmp_path), 'train', tasks=(task,), check_images=False, use_cache=False)
  _assert_names_line(e, path, lineno, *fragments)


def test_missing_header_is_reported(tmp_path):
  path = write_lines(str(tmp_path / 'Annotations/VA_Set/Train_Set/v.txt'), '0.5,0.5', ['0.1,0.2'])
  with pytest.raises(AnnotationError) as e:
    build_index(str(tmp_path), 'train', tasks=('va',), check_images=False, use_cache=False)
  _assert_names_line(e, path, 1, 'header')


AU_MISSING_TEXT = ','.join(['-1'] * 12)


@pytest.mark.parametrize('header,rows,lineno,fragments', [
    ('image,valence,arousal,expression', ['v/00001.jpg,0,0,1,' + AU_MISSING_TEXT], 1,
     ['16-column header']),
    (None, ['v/00001.jpg,0,0,1,' + AU_MISSING_TEXT, 'v/00001.png,0,0,1,' + AU_MISSING_TEXT], 3,
     ['image path']),
    (None, ['v/00001.jpg,0,0,1,' + AU_MISSING_TEXT, '00002.jpg,0,0,1,' + AU_MISSING_TEXT], 3,
     ['image path']),
    (None, ['v/00001.jpg,0,0,1,' + AU_MISSING_TEXT, 'v/0a001.jpg,0,0,1,' + AU_MISSING_TEXT], 3,
     ['image path']),
    (None, ['v/00002.jpg,0,0,1,' + AU_MISSING_TEXT, 'w/00001.jpg,0,0,1,' + AU_MISSING_TEXT,
            'v/00002.jpg,0,0,2,' + AU_MISSING_TEXT], 4, ['duplicate', 'line 2']),
    (None, ['v/00001.jpg,0,0,1,' + AU_MISSING_TEXT, 'v/00002.jpg,0,0,1'], 3,
     ['expected 16 comma-separated fields, found 4']),
    (None, ['v/00001.jpg,0,0,8,' + AU_MISSING_TEXT], 2, ['expression label 8']),
    (None, ['v/00001.jpg,0,2,1,' + AU_MISSING_TEXT], 2, ['valence/arousal']),
    (None, ['v/00001.jpg,0,0,1,' + AU_MISSING_TEXT[:-1] + '3'], 2, ['AU labels']),
    (None, ['v/00001.jpg,0,0,1,' + AU_MISSING_TEXT, 'v/00002.jpg,0,zero,1,' + AU_MISSING_TEXT], 3,
     ['field 3 is not a number']),
])
def test_bad_mtl_lines_name_file_and_line(tmp_path, header, rows, lineno, fragments):
  path = mtl(str(tmp_path), rows, **({'header': header} if header else {}))
  with pytest.raises(AnnotationError) as e:
    build_index(str(tmp_path), 'train', check_images=False, use_cache=False)
  _assert_names_line(e, path, lineno, *fragments)


def test_layout_errors_show_expected_layout(tmp_path):
  with pytest.raises(DatasetLayoutError) as e:
    build_index(str(tmp_path / 'absent'), 'train')
  assert 'does not exist' in str(e.value)
  for expected in ('VA_Set', 'Train_Set', 'training_set_annotations.txt', 'cropped_aligned'):
    assert expected in str(e.value)
  os.makedirs(tmp_path / 'videos')
  with pytest.raises(DatasetLayoutError) as e:
    build_index(str(tmp_path), 'train')
  assert 'videos/' in str(e.value) and 'EXPR_Set' in str(e.value)
  per_task(str(tmp_path), 'expr', 'v', [1])
  with pytest.raises(DatasetLayoutError) as e:  # AU and VA folders are missing
    build_index(str(tmp_path), 'train', check_images=False)
  assert "au, va" in str(e.value) and "tasks=('expr',)" in str(e.value)
  with pytest.raises(DatasetLayoutError) as e:
    build_index(str(tmp_path), 'train', tasks=('expr',), layout='mtl')
  assert 'training_set_annotations.txt' in str(e.value)
  with pytest.raises(DatasetLayoutError) as e:
    build_index(str(tmp_path), 'validation', tasks=('expr',))
  assert "split 'validation'" in str(e.value)
  with pytest.raises(DatasetLayoutError) as e:
    build_index(str(tmp_path), 'train', tasks=('expr',))  # no cropped_aligned
  assert 'check_images=False' in str(e.value)


def test_bad_arguments(tmp_path):
  for kwargs in ({'tasks': ('expr', 'pose')}, {'tasks': ()}, {'num_expr_classes': 6},
                 {'layout': 'flat'}):
    with pytest.raises(ValueError):
      build_index(str(tmp_path), 'train', **kwargs)
  with pytest.raises(ValueError):
    build_index(str(tmp_path), 'test')
