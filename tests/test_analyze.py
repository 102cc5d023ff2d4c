"""From a video to affect (affectjax/analyze.py, affectjax/data/crop.py) on a real face: a video
made from scikit-image's astronaut photograph with two faceless frames in the middle, analysed
with the session's trained run. The crops equal OpenCV's warp of the decoded frames by
scikit-image's similarity transform of the table's landmarks; the table's predictions equal
mode=predict's on the same crops; bad input is refused with its name and leaves nothing."""
import csv
import json
import os
import types

import cv2
import ml_collections
import numpy as np
import pytest
from skimage import data as skimage_data
from skimage import transform

from affectjax import analyze, inference, labels, timeline
from affectjax.data import crop, video
from affectjax.face import align

FRAMES, NO_FACE, CHUNK = 10, (4, 5), 32  # the default chunk: the docs commands reuse the compile


def _frames(faces=True):
  photo = skimage_data.astronaut()[20:320, 100:360]
  for k in range(FRAMES):
    m = np.array([[0.5, 0, 30 + 2 * k], [0, 0.5, 5 + k]])
    if faces and k not in NO_FACE:
      yield cv2.warpAffine(photo, m, (192, 160), borderValue=(96, 96, 96))
    else:
      yield np.full((160, 192, 3), 96, np.uint8)


@pytest.fixture(scope='module')
def clips(tmp_path_factory):
  folder = tmp_path_factory.mktemp('videos')
  return (video.write(str(folder / 'astronaut.mp4'), _frames(), quality=12),
          video.write(str(tmp_path_factory.mktemp('empty') / 'grey.mp4'), _frames(False)))


@pytest.fixture(scope='module')
def analysed(clips, uninterrupted, tmp_path_factory):
  out = str(tmp_path_factory.mktemp('analysis') / 'astronaut')
  code = analyze.main(['--video', clips[0], '--run', str(uninterrupted[1]), '--out', out,
                       '--chunk', str(CHUNK), '--abaw', '--quiet'])
  assert code == 0
  with open(os.path.join(out, 'astronaut.csv')) as f:
    rows = list(csv.DictReader(f))
  return out, rows


def test_the_table_and_the_crops(analysed, clips):
  out, rows = analysed
  assert [int(r['frame']) for r in rows] == list(range(1, FRAMES + 1))
  np.testing.assert_allclose([float(r['time']) for r in rows], np.arange(FRAMES) / 25)
  found = [r['face_found'] == '1' for r in rows]
  assert found == [k not in NO_FACE for k in range(FRAMES)]
  crops = os.path.join(out, 'cropped_aligned', 'astronaut')
  assert sorted(os.listdir(crops)) == [f'{k + 1:05d}.jpg' for k in range(FRAMES)
                                       if k not in NO_FACE]  # no face, no file (Aff-Wild2)
  decoded = np.concatenate([c.images for c in video.read(clips[0])])
  for k in (0, 3, 9):
    points = np.array([[float(rows[k][f'{p}_{xy}']) for xy in 'xy'] for p in timeline.LANDMARKS])
    box = [float(rows[k][f'box_{c}']) for c in ('x0', 'y0', 'x1', 'y1')]
    assert (points[:, 0] > box[0]).all() and (points[:, 0] < box[2]).all()
    assert points[0, 0] < points[1, 0] and points[2, 1] < points[3, 1]  # eyes, nose, mouth
    m = transform.SimilarityTransform.from_estimate(points, align.template()).params[:2]
    reference = cv2.warpAffine(decoded[k], m, (112, 112), flags=cv2.INTER_LINEAR)
    ours = cv2.cvtColor(cv2.imread(os.path.join(crops, f'{k + 1:05d}.jpg')), cv2.COLOR_BGR2RGB)
    assert np.abs(ours.astype(int) - reference).mean() < 4  # JPEG at quality 95
  summary = json.load(open(os.path.join(out, 'summary.json')))
  assert summary['frames'] == FRAMES and summary['frames_with_a_face'] == FRAMES - 2
  assert set(summary['frames_per_s']) >= {'decode', 'detect', 'align', 'model'}
  for plot in ('valence_arousal', 'expressions', 'action_units', 'contact_sheet'):
    assert os.path.getsize(os.path.join(out, f'astronaut_{plot}.png')) > 5000


def test_predictions_equal_mode_predict_on_the_same_crops(analysed, uninterrupted, tmp_path):
  out, rows = analysed
  workdir = str(uninterrupted[1])
  config = ml_collections.ConfigDict(json.load(open(os.path.join(workdir, 'config.json'))))
  (tmp_path / 'list.txt').write_text('astronaut\n')
  step = json.load(open(os.path.join(out, 'summary.json')))['checkpoint_step']
  thresholds, window, source = analyze.tuned_settings(workdir, True, step)
  config.data.root, config.mode = out, 'predict'
  config.data.cache_dir = str(tmp_path / 'cache')
  config.predict.videos, config.predict.format = str(tmp_path / 'list.txt'), 'per_video'
  config.predict.out = str(tmp_path / 'predicted')
  config.predict.au_thresholds, config.predict.va_window = source or '', window
  inference.predict_checkpoint(config, workdir)
  have = [k for k in range(FRAMES) if k not in NO_FACE]
  classes = labels.expr_classes(config.num_expr_classes)
  for task in ('EXPR', 'AU', 'VA'):
    reference = open(tmp_path / 'predicted' / task / 'astronaut.txt').read().split('\n')[1:]
    ours = open(os.path.join(out, 'abaw', task, 'astronaut.txt')).read().split('\n')[1:]
    assert ours == reference
    for k in have:
      line = reference[k].split(',')
      if task == 'EXPR':
        assert classes[int(line[0])] == rows[k]['expression']
      elif task == 'AU':
        assert [int(v) for v in line] == [int(rows[k][a]) for a in labels.AU_NAMES]
        probs = np.array([float(rows[k][f'p_{a}']) for a in labels.AU_NAMES])
        np.testing.assert_array_equal(probs >= np.asarray(thresholds) - 5e-5,
                                      np.array(line, int) == 1)
      else:
        np.testing.assert_allclose([float(v) for v in line],
                                   [float(rows[k]['valence']), float(rows[k]['arousal'])],
                                   atol=1e-4)


def test_bad_input_is_refused_and_leaves_nothing(clips, analysed, uninterrupted, tmp_path,
                                                 capsys):
  out, _ = analysed
  run = str(uninterrupted[1])
  assert analyze.main(['--video', clips[0], '--run', run, '--out', out]) == 2
  assert 'exists' in capsys.readouterr().err
  empty_run = tmp_path / 'run'
  empty_run.mkdir()
  (empty_run / 'config.json').write_text(open(os.path.join(run, 'config.json')).read())
  assert analyze.main(['--video', clips[0], '--run', str(empty_run), '--out',
                       str(tmp_path / 'x')]) == 2
  assert 'has no checkpoint' in capsys.readouterr().err
  assert analyze.main(['--video', clips[0], '--run', str(tmp_path), '--out',
                       str(tmp_path / 'x')]) == 2
  assert 'Converted weights' in capsys.readouterr().err
  (tmp_path / 'affectjax_weights.json').write_text('{}')
  assert analyze.main(['--video', clips[0], '--run', str(tmp_path), '--out',
                       str(tmp_path / 'x')]) == 2
  assert 'without trained affect heads' in capsys.readouterr().err
  grey = str(tmp_path / 'grey')
  assert analyze.main(['--video', clips[1], '--run', run, '--out', grey, '--chunk', str(CHUNK),
                       '--quiet']) == 1
  assert 'grey.mp4: no face found in any of its 10 frames' in capsys.readouterr().err
  assert not [n for n in os.listdir(tmp_path) if n.startswith('grey')]  # not even a temporary


def test_the_analysis_predicts_its_own_crops_and_keeps_va_in_range():
  """The crops predicted are the analysis's, whatever predict.root the run was saved with; VA
  is clipped to [-1, 1] as mode=predict decides it (a linear VA head can leave the range)."""
  config = ml_collections.ConfigDict({
      'data': {'root': '/runs/data', 'cache_dir': ''}, 'eval_batch_size': 8, 'mode': 'train',
      'predict': {'root': '/stale/crops', 'videos': '', 'images': 'old.txt'}})
  crops = analyze._for_crops(config, '/tmp/analysis', '/tmp/analysis/faces.txt', 0)
  assert crops.predict.root == crops.data.root == '/tmp/analysis'
  assert (crops.predict.videos, crops.predict.images) == ('/tmp/analysis/faces.txt', '')
  va = np.array([[1.4, -1.2], [0.2, 0.1], [-3.0, 3.0]])
  member = types.SimpleNamespace(
      index=types.SimpleNamespace(video_names=('v',), video_id=np.zeros(3, int),
                                  frame=np.array([1, 2, 4])),
      got=np.ones(3, bool), probs={'va': va})
  predicted, values = analyze.face_values(member, 'v', np.arange(4), ('va',), 0.5, 1)
  np.testing.assert_array_equal(predicted, [True, True, False, True])
  np.testing.assert_array_equal(values['va'][predicted], np.clip(va, -1, 1))


def test_crop_command_over_a_folder(clips, tmp_path, capsys):
  folder = tmp_path / 'videos'
  folder.mkdir()
  for path in clips:
    os.symlink(path, folder / os.path.basename(path))
  out = tmp_path / 'dataset'
  assert crop.main(['--videos', str(folder), '--out', str(out), '--chunk', str(CHUNK)]) == 0
  summary = json.load(open(out / crop.SUMMARY))
  by_name = {os.path.basename(s['video']): s for s in summary['videos']}
  assert by_name['astronaut.mp4']['faces'] == {'astronaut': FRAMES - 2}
  assert by_name['grey.mp4']['faces'] == {} and summary['failed'] == []
  assert sorted(os.listdir(out / 'cropped_aligned')) == ['astronaut']
  assert 'Cropped 2 of 2 videos' in capsys.readouterr().out
  assert crop.main(['--videos', str(folder), '--out', str(out)]) == 2  # exists
  (folder / 'notes.txt').write_text('x')
  assert crop.main(['--videos', str(folder), '--out', str(tmp_path / 'other')]) == 2
  assert 'not videos (notes.txt)' in capsys.readouterr().err


def test_every_face_with_all_faces(tmp_path):
  """Two people side by side: two tracks, named as Aff-Wild2's two-person videos are."""
  photo = skimage_data.astronaut()[20:320, 100:360]
  frames = []
  for k in range(6):
    frame = np.full((160, 192, 3), 96, np.uint8)
    for x in (4 + k, 100 - k):
      m = np.array([[0.3, 0, x], [0, 0.3, 40.0]])
      frame = np.where(cv2.warpAffine(photo, m, (192, 160), borderValue=(0, 0, 0)) > 0,
                       cv2.warpAffine(photo, m, (192, 160)), frame)
    frames.append(frame)
  path = video.write(str(tmp_path / 'two.mp4'), frames, quality=12)
  out = tmp_path / 'dataset'
  assert crop.main(['--videos', path, '--out', str(out), '--chunk', str(CHUNK),
                    '--all-faces', '--smooth', '3']) == 0
  assert sorted(os.listdir(out / 'cropped_aligned')) == ['two_left', 'two_right']
  for side in ('two_left', 'two_right'):
    assert len(os.listdir(out / 'cropped_aligned' / side)) == 6
  assert crop.main(['--videos', path, '--out', str(tmp_path / 'largest'), '--chunk',
                    str(CHUNK)]) == 0
  assert os.listdir(tmp_path / 'largest' / 'cropped_aligned') == ['two']


def test_a_temporal_run_gets_the_crops_features_from_its_image_run(clips, config, uninterrupted,
                                                                    tmp_path):
  """A GRU on the session run's features: analyze extracts the crops' features with that image
  run and checkpoint (from the features' meta.json), as mode=features does, then predicts."""
  from affectjax import trainer  # pylint: disable=import-outside-toplevel
  from affectjax.data import sequences  # pylint: disable=import-outside-toplevel
  from run_helpers import load_config  # pylint: disable=import-outside-toplevel
  workdir = str(uninterrupted[1])
  image = config.copy_and_resolve_references()
  image.eval_checkpoint, image.features_out = 'latest', str(tmp_path / 'features')
  extracted = inference.extract_features(image, workdir)
  temporal = load_config('temporal', 'gru,test')
  temporal.temporal.features_dir = extracted['out']
  temporal.num_devices = 1
  temporal.global_batch_size = temporal.eval_batch_size = 2
  trainer.train_and_evaluate(temporal, str(tmp_path / 'gru'))
  assert analyze.image_runs(temporal) == [(workdir, extracted['step'])]
  out = tmp_path / 'out'
  assert analyze.main(['--video', clips[0], '--run', str(tmp_path / 'gru'), '--out', str(out),
                       '--chunk', str(CHUNK), '--quiet', '--no-plots', '--no-tuned']) == 0
  rows = list(csv.DictReader(open(out / 'astronaut.csv')))
  have = [k for k in range(FRAMES) if k not in NO_FACE]
  assert all(rows[k]['expression'] and rows[k]['valence'] for k in have)
  assert not any(rows[k]['expression'] for k in NO_FACE)
  # The same crops' features, extracted by mode=features with a test list, then mode=predict.
  (tmp_path / 'list.txt').write_text('astronaut\n')
  image.data.root, image.data.cache_dir = str(out), str(tmp_path / 'cache')
  image.predict.videos, image.features_out = str(tmp_path / 'list.txt'), str(tmp_path / 'f2')
  inference.extract_features(image, workdir, test_only=True)
  features = sequences.FeatureSet(image.features_out, 'test_list')
  assert len(features.index) == len(have) and features.ok.all()
  temporal.temporal.features_dir, temporal.mode = image.features_out, 'predict'
  temporal.predict.videos, temporal.predict.format = str(tmp_path / 'list.txt'), 'per_video'
  temporal.predict.out = str(tmp_path / 'predicted')
  temporal.predict.au_thresholds, temporal.predict.va_window = '', 1
  inference.predict_checkpoint(temporal, str(tmp_path / 'gru'))
  va = open(tmp_path / 'predicted' / 'VA' / 'astronaut.txt').read().split('\n')[1:]
  expr = open(tmp_path / 'predicted' / 'EXPR' / 'astronaut.txt').read().split('\n')[1:]
  classes = labels.expr_classes(temporal.num_expr_classes)
  for k in have:
    np.testing.assert_allclose([float(rows[k]['valence']), float(rows[k]['arousal'])],
                               [float(v) for v in va[k].split(',')], atol=1e-4)
    assert rows[k]['expression'] == classes[int(expr[k])]


def test_features_from_the_fold_runs_mean_are_refused_with_why(tmp_path):
  """A temporal run on mode=oof features with data.oof_eval=folds: no one image run gives new
  frames' features as it was evaluated on, so analyze says so and names the file."""
  from affectjax.data import sequences  # pylint: disable=import-outside-toplevel
  from run_helpers import load_config  # pylint: disable=import-outside-toplevel
  for split, meta in (('train', {'workdir': str(tmp_path), 'oof_folds': 2}),
                      ('validation', {'oof_eval': 'folds', 'fold_steps': [4, 4],
                                      'fold_workdirs': ['a/fold_0', 'a/fold_1']})):
    (tmp_path / split).mkdir()
    (tmp_path / split / sequences.META).write_text(json.dumps(meta))
  temporal = load_config('temporal', 'gru,test')
  temporal.temporal.features_dir = str(tmp_path)
  with pytest.raises(analyze.AnalyzeError, match=r'validation/meta.json.*2 fold runs.*oof_eval=full'):
    analyze.image_runs(temporal)
