"""Tests of the grain input pipeline on a tiny synthetic Aff-Wild2 (8 videos x 24 frames)."""
import json
import logging
import os
import shutil

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from affectjax import labels
from affectjax.data import index as index_lib
from affectjax.data import iterator as iterator_lib
from affectjax.data import pipeline
from affectjax.data import sampling
from affectjax.data import sources
from affectjax.data.synthetic import generate

BATCH = 8


@pytest.fixture(scope='session')
def dataset_root(tmp_path_factory):
  return generate.ensure_synthetic(tmp_path_factory.getbasetemp() / 'synthetic', progress=False,
                                   num_videos=8, frames_per_video=24, seed=1)


@pytest.fixture(scope='session')
def train_index(dataset_root):
  return index_lib.build_index(dataset_root, 'train', num_expr_classes=7, use_cache=False)


@pytest.fixture(scope='session')
def val_index(dataset_root):
  return index_lib.build_index(dataset_root, 'validation', num_expr_classes=7, use_cache=False)


def _config(**augment):
  config = pipeline.default_data_config()
  config.read_threads = 0
  for key, value in augment.items():
    config.augment[key] = value
  return config


def _augmented():
  return _config(flip=True, rotate_deg=10.0, scale=0.1, translate=0.05, color_jitter=0.2)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _pil_rgb(path):
  return np.asarray(Image.open(path).convert('RGB'))


def test_batch_layout_and_pixels(train_index):
  it = pipeline.make_train_iterator(train_index, _config(), global_batch_size=BATCH, seed=0)
  batch = next(it)
  expected = {'image': (np.uint8, (BATCH, 112, 112, 3)), 'expr': (np.int32, (BATCH,)),
              'au': (np.int32, (BATCH, 12)), 'va': (np.float32, (BATCH, 2)),
              'valid': (np.bool_, (BATCH,)), 'phase': (np.int32, (BATCH,)),
              'index': (np.int32, (BATCH,))}
  assert {k: (v.dtype.type, v.shape) for k, v in batch.items()} == expected
  for i, row in enumerate(batch['index']):
    np.testing.assert_array_equal(batch['image'][i], _pil_rgb(train_index.image_path(row)))
    assert batch['expr'][i] == train_index.expr[row]
    np.testing.assert_array_equal(batch['au'][i], train_index.au[row])
    np.testing.assert_array_equal(batch['va'][i], train_index.va[row])
  assert batch['valid'].all() and (batch['phase'] == sampling.PHASE_JOINT).all()


def test_determinism_and_epochs(train_index):
  config = _augmented()
  def run(seed):
    it = pipeline.make_train_iterator(train_index, config, global_batch_size=BATCH, seed=seed,
                                      num_epochs=2)
    return list(it), it.steps_per_epoch
  first, steps = run(0)
  second, _ = run(0)
  _assert_same(first, second)
  assert steps == len(train_index) // BATCH and len(first) == 2 * steps
  epochs = [np.concatenate([b['index'] for b in first[e * steps:(e + 1) * steps]])
            for e in range(2)]
  for rows in epochs:  # an epoch visits distinct frames, all but the remainder
    assert len(set(rows.tolist())) == steps * BATCH
  assert not np.array_equal(epochs[0], epochs[1])
  other, _ = run(1)
  assert not np.array_equal(other[0]['index'], first[0]['index'])


def test_flip_augmentation_mirrors_the_image(train_index):
  it = pipeline.make_train_iterator(train_index, _config(flip=True), global_batch_size=BATCH,
                                    seed=3)
  flipped = []
  for batch in _take(it, 4):
    for image, row in zip(batch['image'], batch['index']):
      plain = _pil_rgb(train_index.image_path(row))
      is_flipped = np.array_equal(image, plain[:, ::-1])
      assert is_flipped or np.array_equal(image, plain)
      flipped.append(is_flipped)
  assert 0.2 < np.mean(flipped) < 0.8


@pytest.mark.parametrize('skip', [3, 15])  # mid-epoch, and across the boundary (17 steps)
def test_resume_from_state(train_index, skip):
  config = _augmented()
  def make():
    return pipeline.make_train_iterator(train_index, config, global_batch_size=BATCH, seed=5)
  reference = make()
  expected = _take(reference, skip + 4)[skip:]
  interrupted = make()
  _take(interrupted, skip)
  state = json.loads(json.dumps(interrupted.get_state()))  # as the trainer's JsonSave stores it
  resumed = make()
  resumed.set_state(state)
  _assert_same(_take(resumed, 4), expected)
  assert resumed.step == skip + 4 and resumed.steps_per_epoch == 17
  assert resumed.epoch == (skip + 3) // 17
  larger = pipeline.make_train_iterator(train_index, config, global_batch_size=2 * BATCH, seed=5)
  with pytest.raises(ValueError, match='cannot resume the input pipeline exactly'):
    larger.set_state(state)


def test_resume_through_orbax_grain_handler(train_index, tmp_path):
  config = _augmented()
  def make():
    return pipeline.make_train_iterator(train_index, config, global_batch_size=BATCH, seed=7)
  expected = _take(make(), 16)[11:]
  interrupted = make()
  _take(interrupted, 11)
  checkpointer = ocp.Checkpointer(grain.checkpoint.CheckpointHandler())
  checkpointer.save(tmp_path / 'input', args=grain.checkpoint.CheckpointSave(interrupted))
  resumed = checkpointer.restore(tmp_path / 'input',
                                 args=grain.checkpoint.CheckpointRestore(make()))
  _assert_same(_take(resumed, 5), expected)


def test_process_shares_split_each_global_batch(train_index):
  config = _augmented()
  whole = pipeline.make_train_iterator(train_index, config, global_batch_size=BATCH, seed=2,
                                       num_epochs=1)
  shares = [pipeline.make_train_iterator(train_index, config, global_batch_size=BATCH, seed=2,
                                         process_index=p, process_count=2, num_epochs=1)
            for p in range(2)]
  assert shares[0].steps_per_epoch == shares[1].steps_per_epoch == whole.steps_per_epoch
  seen = []
  for batch, part0, part1 in zip(whole, *shares):
    np.testing.assert_array_equal(batch['index'], np.concatenate([part0['index'],
                                                                  part1['index']]))
    for key in ('expr', 'image', 'phase'):  # augmentation too: drawn per global batch
      np.testing.assert_array_equal(batch[key], np.concatenate([part0[key], part1[key]]))
    seen.extend(part0['index'].tolist() + part1['index'].tolist())
  assert len(seen) == len(set(seen)) == whole.steps_per_epoch * BATCH
  assert len(train_index) - len(seen) < BATCH  # only the remainder is dropped


def test_eval_covers_every_frame_once_with_padding(val_index):
  config = _config()
  labelled = sampling.labelled_rows(val_index, ('expr', 'au', 'va'))
  seen = []
  for p in range(2):
    it = pipeline.make_eval_iterator(val_index, config, global_batch_size=10, process_index=p,
                                     process_count=2)
    batches = list(it)
    assert len(batches) == -(-labelled.size // 10) == it.num_steps
    for batch in batches:
      valid = batch['valid']
      assert (batch['index'][~valid] == -1).all() and not batch['image'][~valid].any()
      assert (batch['expr'][~valid] == labels.EXPR_MISSING).all()
      assert (batch['au'][~valid] == labels.AU_MISSING).all()
      assert (batch['va'][~valid] == labels.VA_MISSING).all()
      rows = batch['index'][valid]
      np.testing.assert_array_equal(batch['expr'][valid], val_index.expr[rows])
      np.testing.assert_array_equal(batch['va'][valid], val_index.va[rows])
      seen.extend(rows.tolist())
    assert it.num_skipped == 0
  assert sorted(seen) == labelled.tolist()


def test_alternating_phases(train_index):
  config = _config()
  config.sampling = 'alternating'
  it = pipeline.make_train_iterator(train_index, config, global_batch_size=BATCH, seed=0,
                                    num_epochs=2)
  e, a = train_index.has_label('expr'), train_index.has_label('au')
  expected = {'expr_only': int((e & ~a).sum()), 'au_only': int((a & ~e).sum()),
              'both': int((e & a).sum())}
  assert it.frame_counts['phases'] == expected
  assert it.steps_per_epoch == sum(n // BATCH for n in expected.values())
  batches = list(it)
  for epoch in range(2):
    phases = [int(b['phase'][0]) for b in batches[epoch * it.steps_per_epoch:
                                                   (epoch + 1) * it.steps_per_epoch]]
    assert phases == sorted(phases) and set(phases) == {1, 2, 3}
    for phase, name in zip((1, 2, 3), ('expr_only', 'au_only', 'both')):
      assert phases.count(phase) == expected[name] // BATCH
  for batch in batches:
    assert len(set(batch['phase'].tolist())) == 1  # a batch never mixes phases
    rows = batch['index']
    has_e, has_a = e[rows], a[rows]
    phase = batch['phase'][0]
    assert (has_e == (phase != 2)).all() and (has_a == (phase != 1)).all()


def _imbalanced_index(class_counts):
  expr = np.repeat(np.arange(len(class_counts)), class_counts).astype(np.int8)
  n = expr.size
  return index_lib.AffWild2Index(
      ('v',), np.zeros(n, np.int32), np.arange(1, n + 1, dtype=np.int32), expr,
      np.full((n, 12), -1, np.int8), np.full((n, 2), -5.0, np.float32), '/nonexistent',
      'train', {})


def test_balanced_sampling_equalises_classes():
  class_counts = [2000, 600, 150, 100, 900, 300, 50]
  index = _imbalanced_index(class_counts)
  groups = sampling.make_groups(index, ('expr',), 'balanced')
  plans = [sampling.epoch_plan(groups, 0, epoch, 10)[0] for epoch in range(3)]
  assert all(p.size == sum(class_counts) // 10 * 10 for p in plans)
  assert not np.array_equal(plans[0], plans[1])
  drawn = np.concatenate(plans)
  share = np.bincount(index.expr[drawn], minlength=7) / drawn.size
  np.testing.assert_allclose(share, np.full(7, 1 / 7), atol=0.02)


def test_balanced_iterator_epoch_length(train_index):
  config = _config()
  config.sampling = 'balanced'
  it = pipeline.make_train_iterator(train_index, config, global_batch_size=BATCH, seed=0)
  assert it.steps_per_epoch == int(train_index.has_label('expr').sum()) // BATCH
  batch = next(it)
  assert (batch['expr'] >= 0).all()


def test_tasks_and_image_size(train_index):
  config = _config(flip=True, rotate_deg=5.0)
  config.tasks = 'expr'
  config.image_size = 32
  it = pipeline.make_train_iterator(train_index, config, global_batch_size=BATCH, seed=0)
  batch = next(it)
  assert batch['image'].shape == (BATCH, 32, 32, 3)
  assert it.steps_per_epoch == int(train_index.has_label('expr').sum()) // BATCH
  assert (batch['expr'] >= 0).all() and (batch['au'] == -1).all() and (batch['va'] == -5).all()


def _copy_with_corrupt_frames(root, tmp_path, rows, index, remove=False):
  """A copy of the dataset whose frames at `rows` are replaced by garbage (or deleted after
  indexing: unreadable); returns its index."""
  copy = tmp_path / 'corrupt'
  shutil.copytree(root, copy)
  copied = index_lib.build_index(copy, index.split, num_expr_classes=7, use_cache=False)
  for row in rows:
    if remove:
      os.remove(copied.image_path(row))
    else:
      with open(copied.image_path(row), 'wb') as f:
        f.write(b'\xff\xd8 this is not a JPEG')
  return copied


def test_corrupt_frame_is_skipped_and_counted(dataset_root, train_index, val_index, tmp_path,
                                              caplog):
  bad_row = 5
  index = _copy_with_corrupt_frames(dataset_root, tmp_path, [bad_row], train_index)
  config = _config(flip=True)
  config.max_bad_frame_fraction = 0.05
  it = pipeline.make_train_iterator(index, config, global_batch_size=BATCH, seed=0,
                                    num_epochs=3)
  with caplog.at_level(logging.WARNING):
    batches = list(it)
  assert len(batches) == 3 * it.steps_per_epoch
  assert all(b['image'].shape[0] == BATCH and b['valid'].all() for b in batches)
  assert bad_row not in np.concatenate([b['index'] for b in batches])
  assert it.bad_frames['bad'] >= 1 and it.bad_frames['last_path'] == index.image_path(bad_row)
  assert sum(index.image_path(bad_row) in r.getMessage() for r in caplog.records) == 1
  # Substitution is deterministic: the same run gives the same batches.
  again = pipeline.make_train_iterator(index, config, global_batch_size=BATCH, seed=0,
                                       num_epochs=3)
  _assert_same(list(again), batches)

  val_copy = _copy_with_corrupt_frames(dataset_root, tmp_path / 'v', [bad_row], val_index,
                                      remove=True)
  ev = pipeline.make_eval_iterator(val_copy, config, global_batch_size=BATCH)
  rows = np.concatenate([b['index'][b['valid']] for b in ev])
  assert ev.num_skipped == 1
  assert sorted(rows.tolist()) == [r for r in range(len(val_copy)) if r != bad_row]


@pytest.mark.parametrize('worker_count', [0, 2])
def test_too_many_corrupt_frames_fail_from_the_first_frames(dataset_root, train_index, tmp_path,
                                                            worker_count):
  # 30% corrupt crops: the run stops within its first batches (counted from the first frame,
  # in the iterating process also with worker processes), naming a bad path.
  bad_rows = [r for r in range(len(train_index)) if r % 10 in (0, 3, 6)]
  index = _copy_with_corrupt_frames(dataset_root, tmp_path, bad_rows, train_index)
  config = _config()
  config.max_bad_frame_fraction = 0.05
  config.worker_count = worker_count
  it = pipeline.make_train_iterator(index, config, global_batch_size=BATCH, seed=0)
  bad_paths = '|'.join(index.image_path(r) for r in bad_rows)
  try:
    with pytest.raises(sources.DataError, match=rf'of \d+ frames read.*latest: ({bad_paths})'):
      _take(it, 100)
  finally:
    it.close()
  assert sources.BAD_FRAME_FLOOR < it.bad_frames['bad'] <= 2 * sources.BAD_FRAME_FLOOR
  assert it.bad_frames['read'] < 100
  ev = pipeline.make_eval_iterator(index, config, global_batch_size=BATCH)
  with pytest.raises(sources.DataError, match='could not be read or decoded'):
    list(ev)


def test_worker_processes_give_the_same_batches_and_resume(train_index):
  config = _augmented()
  def make(worker_count):
    config.worker_count = worker_count
    return pipeline.make_train_iterator(train_index, config, global_batch_size=BATCH, seed=4)
  expected = _take(make(0), 8)
  in_process = make(0)
  _take(in_process, 2)
  workers = make(2)
  try:
    workers.set_state(in_process.get_state())  # the state does not depend on worker_count
    _assert_same(_take(workers, 4), expected[2:6])
    state = json.loads(json.dumps(workers.get_state()))
  finally:
    workers.close()
  resumed = make(0)
  resumed.set_state(state)
  _assert_same(_take(resumed, 2), expected[6:8])


def _cached(config, tmp_path):
  config.decoded_cache = True
  config.decoded_cache_dir = str(tmp_path / 'decoded')
  return config


def _cache_folders(tmp_path):  # the caches, without their lock files
  return [f for f in os.listdir(tmp_path / 'decoded' / 'decoded') if not f.endswith('.lock')]


@pytest.mark.parametrize('interpolation', ['bilinear', 'nearest'])
def test_decoded_cache_gives_the_same_batches(train_index, val_index, tmp_path, interpolation,
                                              capsys):
  config = _augmented()
  config.augment.interpolation = interpolation
  config.image_size = 48  # decoded at the training size (DCT scaling + resize), as on the fly
  def batches(cfg, n=6):
    it = pipeline.make_train_iterator(train_index, cfg, global_batch_size=BATCH, seed=3)
    ev = pipeline.make_eval_iterator(val_index, cfg, global_batch_size=BATCH)
    return _take(it, n) + list(ev)
  expected = batches(config)
  cached_config = _cached(config.copy_and_resolve_references(), tmp_path)
  _assert_same(batches(cached_config), expected)
  built = capsys.readouterr().out
  assert built.count('Decoded cache ready') == 2  # train and validation, each built once
  folders = sorted(_cache_folders(tmp_path))
  assert [f.split('-')[:2] for f in folders] == [['train', '48px'], ['validation', '48px']]
  images = np.load(tmp_path / 'decoded' / 'decoded' / folders[0] / 'images.npy', mmap_mode='r')
  assert images.shape == (len(train_index), 48, 48, 3)
  _assert_same(batches(cached_config), expected)  # reopened, not rebuilt
  assert 'Decoding' not in capsys.readouterr().out
  cached_config.image_size = 32  # another size: another cache
  assert next(pipeline.make_train_iterator(train_index, cached_config, global_batch_size=BATCH,
                                           seed=3))['image'].shape == (BATCH, 32, 32, 3)
  assert len(_cache_folders(tmp_path)) == 3


def test_decoded_cache_bad_frames_and_workers(dataset_root, train_index, tmp_path):
  bad_row = 5
  index = _copy_with_corrupt_frames(dataset_root, tmp_path, [bad_row], train_index)
  config = _config(flip=True)
  config.max_bad_frame_fraction = 0.05
  expected = list(pipeline.make_train_iterator(index, config, global_batch_size=BATCH, seed=0,
                                               num_epochs=2))
  cached = _cached(config.copy_and_resolve_references(), tmp_path)
  source = sources.make_source(index, cached)
  assert source.meta['bad_frames'] == 1 and not source.ok[bad_row] and source.ok.sum() == (
      len(index) - 1)
  it = pipeline.make_train_iterator(index, cached, global_batch_size=BATCH, seed=0,
                                    num_epochs=2)
  _assert_same(list(it), expected)  # the bad frame substituted exactly as without the cache
  assert it.bad_frames['last_path'] == index.image_path(bad_row)
  cached.worker_count = 2  # workers reopen the memory map by path
  workers = pipeline.make_train_iterator(index, cached, global_batch_size=BATCH, seed=0,
                                         num_epochs=2)
  try:
    _assert_same(list(workers), expected)
  finally:
    workers.close()


def test_decoded_cache_rebuilds_a_broken_one_and_checks_disk_space(train_index, tmp_path,
                                                                     monkeypatch):
  config = _cached(_config(), tmp_path)
  source = sources.make_source(train_index, config)
  with open(os.path.join(source.path, 'meta.json'), 'w') as f:
    f.write('{"format": "affectjax.decoded", "trunc')  # an interrupted write
  again = sources.make_source(train_index, config)
  assert again.path == source.path and again.meta['num_frames'] == len(train_index)
  np.testing.assert_array_equal(again.images, source.images)
  monkeypatch.setattr(shutil, 'disk_usage', lambda path: shutil._ntuple_diskusage(
      10**9, 10**9 - 1000, 1000))
  config.image_size = 40
  with pytest.raises(OSError, match=r'needs [0-9.]+ [KM]B in .*, which has 1\.0 KB free; '
                                    r'set data\.decoded_cache_dir'):
    sources.make_source(train_index, config)


def test_auto_worker_count_leaves_a_cpu_backend_its_cores():
  config = pipeline.default_data_config()
  assert config.worker_count == -1  # auto
  assert iterator_lib.worker_count(config, 'cpu', 16) == 0
  # WORKERS_PER_DEVICE (4) per local accelerator, within the cores less two, at most 32.
  assert [iterator_lib.worker_count(config, 'gpu', n, 1) for n in (2, 16, 128)] == [1, 4, 4]
  assert [iterator_lib.worker_count(config, 'gpu', n, 8) for n in (2, 16, 128)] == [1, 14, 32]
  config.worker_count = 3
  assert iterator_lib.worker_count(config, 'gpu', 16) == iterator_lib.worker_count(config, 'cpu', 2) == 3
