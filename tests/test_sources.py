"""Tests of the record sources, packing and the TFDS builder."""
import json
import subprocess
import sys

import numpy as np
import pytest

from affectjax import labels
from affectjax.data import annotations
from affectjax.data import index as index_lib
from affectjax.data import pack
from affectjax.data import pipeline
from affectjax.data import sources
from affectjax.data.synthetic import generate


@pytest.fixture(scope='session')
def dataset_root(tmp_path_factory):
  return generate.ensure_synthetic(tmp_path_factory.getbasetemp() / 'synthetic', progress=False,
                                   num_videos=8, frames_per_video=24, seed=1)


@pytest.fixture(scope='session')
def packed(dataset_root, tmp_path_factory):
  """(packed dir, {split: index}) after `python -m affectjax.data.pack --split both`."""
  out = tmp_path_factory.mktemp('packed')
  pack.main(['--root', str(dataset_root), '--out', str(out), '--shards', '3',
             '--num-expr-classes', '7'])
  indexes = {split: index_lib.build_index(dataset_root, split, num_expr_classes=7)
             for split in ('train', 'validation')}
  return out, indexes


def _assert_records_equal(a, b):
  assert a.keys() == b.keys() == {'jpeg', 'expr', 'au', 'va', 'index'}
  assert a['jpeg'] == b['jpeg']
  for key in ('expr', 'au', 'va', 'index'):
    assert np.asarray(a[key]).dtype == np.asarray(b[key]).dtype
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_record_serialisation_round_trip():
  record = sources.make_record(b'\xff\xd8jpegbytes', 6, [1, 0, -1] * 4, [0.25, -5.0], 123456)
  data = sources.serialize_record(record)
  assert len(data) == 25 + len(record['jpeg'])
  _assert_records_equal(sources.parse_record(data), record)


def test_packed_records_equal_the_jpeg_tree(packed):
  out, indexes = packed
  for split, index in indexes.items():
    manifest = json.loads((out / f'{split}_manifest.json').read_text())
    every = pack.frames_of_every_config(index)
    assert manifest['num_records'] == len(every) and len(manifest['shards']) == 3
    assert manifest['unreadable_frames'] == 0
    tree = sources.JpegTreeSource(index)
    arrays = sources.ArrayRecordSource(str(out), split, index)
    assert len(arrays) == len(tree) == len(index)
    rows = list(range(len(index)))
    for a, b in zip(arrays.__getitems__(rows), tree.__getitems__(rows)):
      _assert_records_equal(a, b)
    with open(index.image_path(7), 'rb') as f:
      assert arrays[7]['jpeg'] == f.read()


def test_pipeline_reads_packed_data_like_the_tree(packed):
  out, indexes = packed
  config = pipeline.default_data_config()
  config.read_threads = 0
  config.augment.flip, config.augment.rotate_deg = True, 8.0
  batches = {}
  for kind in ('jpeg', 'arrayrecord'):
    config.source, config.packed_dir = kind, str(out)
    train = pipeline.make_train_iterator(indexes['train'], config, global_batch_size=8, seed=0)
    ev = pipeline.make_eval_iterator(indexes['validation'], config, global_batch_size=8)
    batches[kind] = [next(train) for _ in range(3)] + list(ev)
  for a, b in zip(batches['jpeg'], batches['arrayrecord']):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_other_indexes_map_onto_the_pack(packed, dataset_root):
  out, indexes = packed
  index = indexes['train']
  expr_only = index_lib.build_index(dataset_root, 'train', tasks=('expr',), num_expr_classes=7)
  every_other = index.subset(np.arange(0, len(index), 2))
  for other in (expr_only, every_other):
    assert len(other) < len(index)
    mapped, tree = sources.ArrayRecordSource(str(out), 'train', other), sources.JpegTreeSource(other)
    assert len(mapped) == len(other)
    rows = list(range(len(other)))
    for a, b in zip(mapped.__getitems__(rows), tree.__getitems__(rows)):
      _assert_records_equal(a, b)
  relabelled = index.subset(np.arange(len(index)))
  relabelled.expr[3] = (relabelled.expr[3] + 1) % 7
  with pytest.raises(sources.DataError, match=r'1 frames have other .* labels.*re-pack'):
    sources.ArrayRecordSource(str(out), 'train', relabelled)
  with pytest.raises(sources.DataError, match=(
      r'frames of the index are not in .*train_\* \(made from .* with layout per_task, tasks '
      r'expr,au,va, 7 EXPR classes\).*re-pack: python -m affectjax.data.pack --root ')):
    sources.ArrayRecordSource(str(out), 'train', indexes['validation'])


def test_one_pack_serves_every_layout_task_and_class_count(dataset_root, tmp_path):
  # Packed with the labels of one task only: the frames of every config are packed all the same.
  pack.main(['--root', str(dataset_root), '--out', str(tmp_path), '--split', 'train',
             '--tasks', 'expr', '--num-expr-classes', '7'])
  expr_only = index_lib.build_index(dataset_root, 'train', tasks=('expr',), num_expr_classes=7)
  for layout, classes in (('mtl', 8), ('per_task', 7)):
    index = index_lib.build_index(dataset_root, 'train', layout=layout, num_expr_classes=classes)
    assert set(index.image_paths()) > set(expr_only.image_paths())
    mapped, tree = sources.ArrayRecordSource(str(tmp_path), 'train', index), (
        sources.JpegTreeSource(index))
    rows = list(range(len(index)))
    for a, b in zip(mapped.__getitems__(rows), tree.__getitems__(rows)):
      _assert_records_equal(a, b)  # the frames from the pack, the labels of this config
  # Without the root, a run has the labels that were packed, and says so when it wants others.
  alone = sources.packed_index(str(tmp_path), 'train')
  assert alone.summary['unlabelled_frames'] == len(alone) - len(expr_only) > 0
  assert 'labelled only in other layouts' in alone.describe()
  sources.check_packed_labels(alone, str(tmp_path), 'auto', ('expr',), 7)
  with pytest.raises(sources.DataError, match=(
      r'holds the labels of layout per_task, tasks expr, 7 EXPR classes; this run wants layout '
      r'mtl and 8 EXPR classes and tasks au,va\. .* set data\.root=.*or pack these labels: '
      r'python -m affectjax\.data\.pack --root \S+ --out \S+_mtl_8 --layout mtl '
      r'--num-expr-classes 8 --tasks expr,au,va$')):
    sources.check_packed_labels(alone, str(tmp_path), 'mtl', ('expr', 'au', 'va'), 8)


def test_pack_picks_8_expr_classes_where_the_labels_hold_other(tmp_path):
  """The pack command's default class count: 8 where the EXPR labels hold Other (7, ABAW3
  onwards), else 7; a run without EXPR reads a root with Other under 7 classes (it does not
  read the expression column's classes), one with EXPR is stopped naming the line."""
  root = generate.ensure_synthetic(tmp_path / 'synthetic', progress=False, num_videos=6,
                                   frames_per_video=16, seed=2)
  assert pack.expr_classes_of(root, ('train', 'validation'), 'mtl', labels.TASKS) == 7
  path = root / 'training_set_annotations.txt'  # the s-Aff-Wild2 file: one frame made Other
  lines = path.read_text().splitlines()
  row = next(i for i, line in enumerate(lines[1:], 1) if line.split(',')[3] != '-1')
  fields = lines[row].split(',')
  lines[row] = ','.join(fields[:3] + ['7'] + fields[4:])
  path.write_text('\n'.join(lines) + '\n')
  assert pack.expr_classes_of(root, ('train', 'validation'), 'mtl', labels.TASKS) == 8
  assert pack.expr_classes_of(root, ('train',), 'per_task', labels.TASKS) == 7
  assert pack.expr_classes_of(root, ('train',), 'mtl', ('au', 'va')) == 7
  pack.main(['--root', str(root), '--out', str(tmp_path / 'packed'), '--split', 'train',
             '--layout', 'mtl'])
  assert sources.packed_index(str(tmp_path / 'packed'), 'train').summary[
      'num_expr_classes'] == 8
  eight = index_lib.build_index(root, 'train', layout='mtl', num_expr_classes=8,
                                use_cache=False)
  va = index_lib.build_index(root, 'train', layout='mtl', tasks=('va',), num_expr_classes=7,
                             use_cache=False)
  np.testing.assert_array_equal(va.va, eight.va[(eight.va > -5).any(axis=1)])
  with pytest.raises(annotations.AnnotationError, match=(
      rf'training_set_annotations\.txt, line {row + 1}: expression label 7 outside -1\.\.6 '
      r'\(7 is Other: use 8 EXPR classes\)')):
    index_lib.build_index(root, 'train', layout='mtl', tasks=('expr',), num_expr_classes=7,
                          use_cache=False)


def test_pack_and_tfds_command_lines_print_one_error(tmp_path, capsys):
  nowhere = tmp_path / 'nope'
  with pytest.raises(SystemExit) as stop:
    pack.main(['--root', str(nowhere), '--out', str(tmp_path / 'out')])
  err = capsys.readouterr().err
  assert stop.value.code == 1 and err.startswith(f'error: dataset root {nowhere} does not exist')
  assert not (tmp_path / 'out').exists()
  root = tmp_path / 'bad'
  generate.generate(root, num_videos=3, frames_per_video=4, progress=False)
  annotations = root / 'training_set_annotations.txt'
  lines = annotations.read_text().splitlines()
  annotations.write_text('\n'.join(lines[:2] + ['not,a,row'] + lines[3:]) + '\n')
  with pytest.raises(SystemExit):
    pack.main(['--root', str(root), '--out', str(tmp_path / 'out'), '--layout', 'mtl'])
  assert capsys.readouterr().err.startswith(f'error: {annotations}, line 3: expected 16')
  pytest.importorskip('importlib_resources')  # the tfds extra (also in the test extra)
  from affectjax.data import tfds_builder
  assert tfds_builder.main(['--root', str(nowhere), '--data_dir', str(tmp_path / 'tfds')]) == 1
  assert capsys.readouterr().err.startswith(f'error: dataset root {nowhere} does not exist')
  with pytest.raises(sources.DataError, match=(
      r'no prepared TFDS dataset affwild2/mtl_8 in .*: prepare it with python -m '
      r'affectjax\.data\.tfds_builder --root <Aff-Wild2 root> --config mtl_8')):
    sources.TfdsSource(str(tmp_path / 'tfds'), 'train', 'mtl_8')


def test_manifest_is_validated(packed, tmp_path):
  out, indexes = packed
  index = indexes['train']
  with pytest.raises(sources.DataError, match='pack the dataset first'):
    sources.ArrayRecordSource(str(tmp_path), 'train', index)
  manifest = json.loads((out / 'train_manifest.json').read_text())
  (tmp_path / 'train_manifest.json').write_text(json.dumps(dict(manifest, version=99)))
  with pytest.raises(sources.DataError, match='version 99'):
    sources.ArrayRecordSource(str(tmp_path), 'train', index)
  loaded = sources.packed_index(str(out), 'train')
  assert sources.index_fingerprint(loaded) == sources.index_fingerprint(
      pack.frames_of_every_config(index))
  index.subset(np.arange(len(index) - 1)).save(str(tmp_path / 'train_index.npz'))
  (tmp_path / 'train_manifest.json').write_text(json.dumps(manifest))
  with pytest.raises(sources.DataError, match='does not match its manifest'):
    sources.packed_index(str(tmp_path), 'train')


def test_tfds_builder_examples_and_source(dataset_root):
  tfds = pytest.importorskip('tensorflow_datasets')
  from affectjax.data import tfds_builder
  builder = tfds_builder.Affwild2(config='per_task_7', data_dir=str(dataset_root / 'tfds_unused'))
  assert builder.name == 'affwild2' and builder.info.disable_shuffling
  assert {c.name for c in builder.BUILDER_CONFIGS} == {
      'per_task_7', 'per_task_8', 'mtl_7', 'mtl_8'}
  assert 'manual_dir' in builder.MANUAL_DOWNLOAD_INSTRUCTIONS or 'Aff-Wild2' in (
      builder.MANUAL_DOWNLOAD_INSTRUCTIONS)
  index = index_lib.build_index(dataset_root, 'validation', layout='per_task', num_expr_classes=7)
  examples = list(builder._generate_examples(dataset_root, 'validation'))
  assert [key for key, _ in examples] == list(range(len(index)))
  features = builder.info.features
  skip = {'image': tfds.decode.SkipDecoding()}
  # What tfds.data_source returns: the serialized example parsed back with NumPy.
  stored = [features.deserialize_example_np(features.serialize_example(ex), decoders=skip)
            for _, ex in examples]
  source = sources.TfdsSource('', 'validation', 'per_task_7', index, data_source=stored)
  tree = sources.JpegTreeSource(index)
  for row in range(len(index)):
    _assert_records_equal(source[row], tree[row])
    assert stored[row]['video'].decode() == index.video_names[index.video_id[row]]
  au_only = index_lib.build_index(dataset_root, 'validation', layout='per_task', tasks=('au',),
                                  num_expr_classes=7)
  mapped = sources.TfdsSource('', 'validation', 'per_task_7', au_only, data_source=stored,
                              prepared_index=index)
  tree = sources.JpegTreeSource(au_only)
  assert len(mapped) == len(au_only)
  for row in range(len(au_only)):
    _assert_records_equal(mapped[row], tree[row])
  with pytest.raises(sources.DataError, match='examples'):
    sources.TfdsSource('', 'validation', 'per_task_7', index, data_source=stored[:-1])
  assert tfds_builder.config_name(index.summary['layout'], 7) == 'per_task_7'


def test_importing_the_pipeline_does_not_import_tensorflow():
  code = ('import sys, affectjax.data.pipeline, affectjax.data.pack, affectjax.data.sources; '
          'print(sorted(m for m in sys.modules if m.split(".")[0] in '
          '("tensorflow", "tensorflow_datasets")))')
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          check=True)
  assert result.stdout.strip() == '[]', result.stdout
