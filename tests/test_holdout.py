"""Videos in one task's training set and another task's validation set (Aff-Wild2's per-task
sets allow it) are reported, and held out of multi-task training by default."""
import os

import numpy as np
import pytest

from affectjax import config as config_lib
from affectjax import kinds
from affectjax.data import index as index_lib
from affectjax.data import layout
from affectjax.data.synthetic import generate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def overlapping_root(tmp_path_factory):
  """A per-task root where validation video `shared` also has EXPR labels in Train_Set."""
  root = tmp_path_factory.mktemp('overlap')
  generate.generate(root, num_videos=6, frames_per_video=6, progress=False)
  val = index_lib.build_index(root, 'validation', layout='per_task', use_cache=False)
  shared = val.video_names[0]
  frames = int((val.video_id == 0).sum())
  path = generate.task_file(root, 'expr', 'train', shared)
  header = open(next(p for p in path.parent.iterdir())).readline()
  path.write_text(header + '\n'.join(str(k % 7) for k in range(frames)) + '\n')
  return root, shared


def _config(root, tmp_path, holdout):
  c = config_lib.load_config_file(os.path.join(REPO, 'configs', 'mtl.py:test'))
  c.data.root, c.data.layout, c.data.cache_dir = str(root), 'per_task', str(tmp_path)
  c.tasks, c.data.holdout_validation_videos = 'expr,au,va', holdout
  return c


def test_validation_videos_are_held_out_of_training(overlapping_root, tmp_path, capsys):
  root, shared = overlapping_root
  folders = {split: {name[:-4] for task in layout.TASK_FOLDERS for name in os.listdir(
      root / layout.ANNOTATIONS_DIR / layout.TASK_FOLDERS[task][0] /
      layout.SPLIT_FOLDERS[split][0])} for split in ('train', 'validation')}
  assert folders['train'] & folders['validation'] == {shared}  # the one overlap, from the files

  kept = kinds.load_index(_config(root, tmp_path, True), 'train')
  full = kinds.load_index(_config(root, tmp_path, False), 'train')
  out = capsys.readouterr().out
  shared_id = full.video_names.index(shared)
  shared_rows = int((full.video_id == shared_id).sum())
  assert shared_rows > 0
  assert len(kept) == len(full) - shared_rows and shared_id not in set(kept.video_id.tolist())
  assert kept.summary['held_out_frames'] == shared_rows
  assert kept.summary['held_out_validation_videos'] == 1
  others = full.video_id != shared_id
  np.testing.assert_array_equal(kept.frame, full.frame[others])
  np.testing.assert_array_equal(kept.expr, full.expr[others])
  assert f'1 source videos ({shared_rows} frames)' in out and 'held out of training' in out
  assert 'warning:' in out and 'stay in training' in out  # reported even when kept
  # The validation split itself is untouched.
  val = kinds.load_index(_config(root, tmp_path, True), 'validation')
  assert shared in {val.video_names[i] for i in set(val.video_id.tolist())}


def test_folds_hold_whole_source_videos_and_each_fold_run_leaves_its_own_out(
    overlapping_root, tmp_path):
  names = ('a', 'b_left', 'b_right', 'c', 'd', 'e')
  frames = (5, 3, 3, 4, 2, 1)
  index = index_lib.AffWild2Index(
      names, np.repeat(np.arange(6), frames).astype(np.int32),
      np.concatenate([np.arange(1, n + 1) for n in frames]).astype(np.int32),
      np.zeros(18, np.int8), np.zeros((18, 12), np.int8), np.zeros((18, 2), np.float32),
      '', 'train', {})
  fold = kinds.fold_of_rows(index, 2)
  by_video = {names[v]: set(fold[index.video_id == v].tolist()) for v in range(6)}
  assert all(len(f) == 1 for f in by_video.values())  # a video's frames in one fold
  assert by_video['b_left'] == by_video['b_right']  # both crops of a two-subject video
  # Most frames first to the lighter fold: b (6) -> 0, a (5) -> 1, c (4) -> 1, d (2) -> 0,
  # e (1) -> 0: 9 frames each.
  assert np.bincount(fold).tolist() == [9, 9] and by_video['a'] == {1}
  np.testing.assert_array_equal(kinds.fold_of_rows(index, 2), fold)  # deterministic
  root, _ = overlapping_root
  c = _config(root, tmp_path, True)
  full = kinds.load_index(c, 'train')
  c.data.folds = 3
  folds = kinds.fold_of_rows(full, 3)
  for j in range(3):
    c.data.fold = j
    left = kinds.load_index(c, 'train')
    kept = {(full.video_names[v], f) for v, f in zip(left.video_id, left.frame)}
    expected = {(full.video_names[v], f) for v, f, k in zip(full.video_id, full.frame, folds)
                if k != j}
    assert kept == expected and len(left) < len(full)
