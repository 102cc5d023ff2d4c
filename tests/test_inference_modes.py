"""The inference modes on the trained test run (the `uninterrupted` session fixture of
conftest.py): predictions of test lists, per-frame features and temporal models on them,
ensembles, out-of-fold features."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from affectjax import metrics as metrics_lib
from affectjax import evaluation, inference, kinds, trainer
from run_helpers import assert_same_params, load_config, params_of


def _predict_config(config, **predict):
  c = config.copy_and_resolve_references()
  c.eval_checkpoint = 'latest'
  for key, value in predict.items():
    c.predict[key] = value
  return c


def _reversed_rows(csv: str) -> str:
  lines = csv.splitlines()
  return '\n'.join(lines[:1] + lines[:0:-1]) + '\n'


def test_predict_mode_writes_the_eval_predictions_for_an_image_list(uninterrupted, config,
                                                                    tmp_path):
  from affectjax import predictions
  _, workdir = uninterrupted
  # Reference: the labelled evaluation path on the same checkpoint.
  c = _predict_config(config)
  index = kinds.load_index(c, 'validation', ('expr', 'au', 'va'))
  run, state = inference.restore(c, str(workdir), index)
  _, rows = evaluation.evaluate(run, run.eval_step(), state, index, keep_predictions=True)
  reference = open(predictions.write_predictions(
      str(tmp_path / 'reference.csv'), rows, index, run.tasks)).read().splitlines()
  # The ABAW3/4 test list: the validation images in another order, under a header.
  names = [line.split(',')[0] for line in reference[1:]]
  image_list = tmp_path / 'MTL_test_set.txt'
  image_list.write_text('image\n' + '\n'.join(reversed(names)) + '\n')
  result = inference.predict_checkpoint(_predict_config(config, images=str(image_list)),
                                      str(workdir))
  assert result['format'] == 'mtl' and result['frames'] == len(names) == result['predicted']
  written = open(result['files'][0]).read().splitlines()
  assert os.path.basename(result['files'][0]) == (
      f'predictions_MTL_test_set_step{result["step"]}.csv')
  # The list's rows in the list's order, with the evaluation's decisions.
  assert written == reference[:1] + reference[:0:-1]
  # Per-AU thresholds (e.g. tuned by mode=eval on validation) decide the AUs.
  thresholds = np.linspace(0.2, 0.8, 12)
  threshold_file = tmp_path / 'thresholds.json'
  threshold_file.write_text(json.dumps({'au_thresholds': thresholds.tolist()}))
  decided, predicted = predictions.gather_decisions(rows, len(index), run.tasks, thresholds)
  expected = open(predictions.write_mtl(str(tmp_path / 'expected.csv'), index, decided,
                                        np.flatnonzero(predicted))).read()
  tuned = inference.predict_checkpoint(_predict_config(
      config, images=str(image_list), au_thresholds=str(threshold_file),
      out=str(tmp_path / 'tuned.csv')), str(workdir))
  assert open(tuned['files'][0]).read() == _reversed_rows(expected) != '\n'.join(
      reference[:1] + reference[:0:-1]) + '\n'
  # VA smoothing: a centred moving average over each video's predicted frames (5 video frames).
  decided, predicted = predictions.gather_decisions(rows, len(index), run.tasks)
  have = np.flatnonzero(predicted)
  decided['va'][have] = metrics_lib.smooth_per_video(decided['va'][have],
                                                     index.video_id[have], 5, index.frame[have])
  expected = open(predictions.write_mtl(str(tmp_path / 'smooth.csv'), index, decided,
                                        have)).read()
  smoothed = inference.predict_checkpoint(_predict_config(
      config, images=str(image_list), va_window=5, out=str(tmp_path / 'smoothed.csv')),
      str(workdir))
  assert open(smoothed['files'][0]).read() == _reversed_rows(expected)


def test_predict_mode_per_video_and_per_task_files(uninterrupted, config, tmp_path):
  from affectjax.data import layout
  _, workdir = uninterrupted
  root = kinds.data_root(config)
  videos = sorted(os.listdir(os.path.join(root, layout.IMAGE_DIR)))[:3]
  video_list = tmp_path / 'test_videos.txt'
  video_list.write_text(''.join(f'{v}.mp4\n' for v in videos))
  crops = {v: np.sort(layout.image_frames(os.path.join(root, layout.IMAGE_DIR, v)))
           for v in videos}
  counts = tmp_path / 'frame_counts.csv'
  counts.write_text('video,frames\n' + ''.join(f'{v},{crops[v].max() + 3}\n' for v in videos))
  # The per-frame decisions, as an ABAW3/4 file over the same crops.
  image_list = tmp_path / 'images.txt'
  image_list.write_text(''.join(f'{v}/{f:05d}.jpg\n' for v in videos for f in crops[v]))
  mtl = inference.predict_checkpoint(_predict_config(config, images=str(image_list)),
                                   str(workdir))
  per_frame = {line.split(',')[0]: line.split(',')[1:]
               for line in open(mtl['files'][0]).read().splitlines()[1:]}

  result = inference.predict_checkpoint(
      _predict_config(config, videos=str(video_list), frame_counts=str(counts),
                      out=str(tmp_path / 'abaw2')), str(workdir))
  assert result['format'] == 'per_video' and len(result['files']) == 3 * len(videos)
  for v in videos:
    va = open(tmp_path / 'abaw2' / 'VA' / f'{v}.txt').read().splitlines()
    expr = open(tmp_path / 'abaw2' / 'EXPR' / f'{v}.txt').read().splitlines()
    au = open(tmp_path / 'abaw2' / 'AU' / f'{v}.txt').read().splitlines()
    assert va[0] == 'valence,arousal' and au[0] == ','.join(
        ['AU1', 'AU2', 'AU4', 'AU6', 'AU7', 'AU10', 'AU12', 'AU15', 'AU23', 'AU24', 'AU25',
         'AU26'])
    assert expr[0].split(',')[-1] == 'Other'  # the 8-class config
    assert len(va) == len(expr) == len(au) == 1 + crops[v].max() + 3  # every frame 1..N
    for frame in range(1, crops[v].max() + 4):  # each frame takes its nearest crop's decision
      distance = np.abs(crops[v] - frame)
      nearest = crops[v][np.flatnonzero(distance == distance.min())[0]]
      values = per_frame[f'{v}/{nearest:05d}.jpg']
      assert va[frame].split(',') == values[:2]
      assert expr[frame] == values[2]
      assert au[frame].split(',') == values[3:]

  per_task = inference.predict_checkpoint(
      _predict_config(config, videos=str(video_list), format='per_task',
                      out=str(tmp_path / 'abaw5')), str(workdir))
  assert sorted(os.path.basename(f) for f in per_task['files']) == ['AU.csv', 'EXPR.csv',
                                                                     'VA.csv']
  expr_rows = open(tmp_path / 'abaw5' / 'EXPR.csv').read().splitlines()
  assert expr_rows[0].startswith('image_location,Neutral,Anger')
  assert {r.split(',')[0]: r.split(',')[1] for r in expr_rows[1:]} == {
      name: values[2] for name, values in per_frame.items()}

  bad_list = tmp_path / 'bad.txt'
  bad_list.write_text('image\nvideo1/00001.jpg\nvideo1/frame.png\n')
  with pytest.raises(ValueError, match=r'bad\.txt:3: expected <video>/<frame>\.jpg'):
    inference.predict_checkpoint(_predict_config(config, images=str(bad_list)), str(workdir))


def _reference_predictions(outputs) -> np.ndarray:
  """A frame's EXPR softmax, AU sigmoids and clipped VA, by NumPy formulas."""
  expr = np.exp(outputs['expr'] - outputs['expr'].max(-1, keepdims=True))
  return np.concatenate([expr / expr.sum(-1, keepdims=True), 1 / (1 + np.exp(-outputs['au'])),
                         np.clip(outputs['va'], -1, 1)], axis=-1)


def test_features_then_a_temporal_model(uninterrupted, config, tmp_path):
  from affectjax.data import sequences
  _, workdir = uninterrupted
  c = config.copy_and_resolve_references()
  c.eval_checkpoint = 'latest'
  c.features_out = str(tmp_path / 'features')
  result = inference.extract_features(c, str(workdir))
  # Reference: the embedding output of the evaluation path on the same checkpoint.
  index = kinds.load_index(c, 'validation', ('expr', 'au', 'va'))
  run, state = inference.restore(c, str(workdir), index)
  _, rows = evaluation.evaluate(run, run.eval_step(), state, index, keep_predictions=True)
  extracted = sequences.FeatureSet(result['out'], 'validation')
  predicted = sequences.FeatureSet(result['out'], 'validation', 'predictions')
  assert extracted.meta['step'] == result['step'] and extracted.ok.all()
  for outputs, batch in rows:
    keep = batch['valid']
    np.testing.assert_allclose(extracted.features[batch['index'][keep]],
                               outputs['embedding'][keep], rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(predicted.features[batch['index'][keep]],
                               _reference_predictions(outputs)[keep], atol=1e-3)

  temporal_config = load_config('temporal', 'gru,test')
  temporal_config.temporal.features_dir = result['out']
  temporal_config.num_devices = 2
  temporal_config.global_batch_size = temporal_config.eval_batch_size = 2
  run_dir = tmp_path / 'temporal'
  summary = trainer.train_and_evaluate(temporal_config, str(run_dir))
  assert summary['stop_reason'] == 'finished' and summary['steps'] >= 2
  evals = [json.loads(line) for line in open(run_dir / 'metrics.jsonl')]
  final = [r for r in evals if r['split'] == 'validation'][-1]
  for key in ('expr_f1', 'au_f1', 'va_ccc', 'mtl_score'):
    assert np.isfinite(final[key])
  # Every validation frame evaluated once: the labelled counts equal the image run's.
  image_eval = [json.loads(line) for line in open(workdir / 'metrics.jsonl')
                if '"validation"' in line][-1]
  for key in ('count_expr', 'count_au', 'count_va'):
    assert final[key] == image_eval[key], key
  temporal_config.eval_checkpoint = 'latest'
  evaluated = inference.evaluate_checkpoint(temporal_config, str(run_dir))
  np.testing.assert_allclose(evaluated['mtl_score'], final['mtl_score'], rtol=1e-5)
  # The same temporal model on the image run's predictions instead of its embedding.
  on_predictions = temporal_config.copy_and_resolve_references()
  on_predictions.temporal.inputs, on_predictions.halt_after_steps = 'predictions', 1
  halted = trainer.train_and_evaluate(on_predictions, str(tmp_path / 'on_predictions'))
  assert halted['steps'] == 1 and predicted.dim == c.num_expr_classes + 12 + 2
  fan_in = {leaf.shape[0] for leaf in jax.tree_util.tree_leaves(params_of(halted))
            if leaf.ndim == 2}  # the encoder's input kernels read the predictions
  assert predicted.dim in fan_in

  # Test predictions of the temporal run: the image run extracts the listed frames' features,
  # the temporal run predicts them. Listing the validation frames gives the same segments, so
  # the same decisions as the evaluation's predictions file.
  eval_csv = open(run_dir / f'predictions_validation_step{summary["steps"]}.csv').read()
  image_list = tmp_path / 'valframes.txt'
  image_list.write_text(''.join(line.split(',')[0] + '\n'
                                for line in eval_csv.splitlines()[1:]))
  c.predict.images = str(image_list)
  inference.extract_features(c, str(workdir))
  assert sequences.FeatureSet(result['out'], 'test_valframes').ok.all()
  temporal_config.predict.images = str(image_list)
  temporal_config.predict.out = str(tmp_path / 'temporal_test.csv')
  predicted = inference.predict_checkpoint(temporal_config, str(run_dir))
  assert predicted['frames'] == predicted['predicted'] == len(eval_csv.splitlines()) - 1
  assert open(predicted['files'][0]).read() == eval_csv

  # The GRU carries its state across a video's segments (configs/temporal.py): the carried
  # states are part of the checkpoint, so a run halted and resumed ends where one that ran
  # through does (the lanes' data order being a function of the step).
  assert temporal_config.temporal.carry_state and summary['state'].carry is not None
  temporal_config.halt_after_steps = 1
  trainer.train_and_evaluate(temporal_config, str(tmp_path / 'resumed'))
  temporal_config.halt_after_steps = 0
  resumed = trainer.train_and_evaluate(temporal_config, str(tmp_path / 'resumed'))
  assert resumed['steps'] == summary['steps']
  assert_same_params(resumed['state'].carry, summary['state'].carry)
  assert_same_params(params_of(resumed), params_of(summary))
  assert np.abs(jax.tree_util.tree_leaves(summary['state'].carry)[0]).max() > 0

  # The temporal statistical model on blocks of the same features (8 EXPR classes here).
  stat_config = load_config('temporal_stat', 'stat_lstm,test')
  stat_config.temporal.features_dir = result['out']
  stat_config.num_expr_classes = 8
  stat_config.num_devices = 2
  stat_dir = tmp_path / 'stat'
  summary = trainer.train_and_evaluate(stat_config, str(stat_dir))
  assert summary['stop_reason'] == 'finished'
  records = [json.loads(line) for line in open(stat_dir / 'metrics.jsonl')]
  assert all('loss_va5' in r for r in records if r['split'] == 'train')
  final = [r for r in records if r['split'] == 'validation'][-1]
  for key in ('count_expr', 'count_va'):  # each labelled frame predicted once from its block
    assert final[key] == image_eval[key], key
  assert np.isfinite(final['expr_f1']) and np.isfinite(final['va_ccc'])


def test_ensemble_averages_the_members_probabilities(uninterrupted, config, tmp_path):
  """mode=ensemble of two checkpoints of one run against a NumPy average of their own
  evaluations; an ensemble of one member is that member."""
  from affectjax import ensemble, predictions
  _, workdir = uninterrupted
  steps = sorted(int(s) for s in os.listdir(workdir / 'checkpoints') if s.isdigit())[-2:]
  c = config.copy_and_resolve_references()
  index = kinds.load_index(c, 'validation', ('expr', 'au', 'va'))
  probs, evaluated = [], []
  for step in steps:
    c.eval_checkpoint = str(step)
    run, state = inference.restore(c, str(workdir), index)
    metrics, rows = evaluation.evaluate(run, run.eval_step(), state, index,
                                        keep_predictions=True, tune=True)
    evaluated.append((metrics, rows))
    p = {'expr': np.zeros((len(index), c.num_expr_classes)), 'au': np.zeros((len(index), 12)),
         'va': np.zeros((len(index), 2))}
    for outputs, batch in rows:
      keep = np.asarray(batch['valid'])
      at = np.asarray(batch['index'])[keep]
      logits = np.asarray(outputs['expr'], np.float64)[keep]
      p['expr'][at] = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
      p['au'][at] = 1 / (1 + np.exp(-np.asarray(outputs['au'], np.float64)[keep]))
      p['va'][at] = np.asarray(outputs['va'])[keep]
    probs.append(p)
  mean = {k: (probs[0][k] + probs[1][k]) / 2 for k in probs[0]}
  decided = {'expr': mean['expr'].argmax(-1), 'au': (mean['au'] >= 0.5).astype(np.int64),
             'va': np.clip(mean['va'], -1, 1)}
  expected = open(predictions.write_mtl(str(tmp_path / 'expected.csv'), index, decided,
                                        range(len(index)))).read()
  e = config.copy_and_resolve_references()
  e.mode, e.ensemble.members = 'ensemble', ','.join(f'{workdir}@{s}' for s in steps)
  summary = ensemble.run_ensemble(e, str(tmp_path / 'ens'))
  assert open(tmp_path / 'ens' / 'predictions_validation_ensemble.csv').read() == expected
  assert [m['checkpoint_step'] for m in summary['members']] == steps
  assert summary['shared_frames'] == len(index)
  # The ensemble's VA CCC: NumPy's formula on the averaged values of the VA-labelled frames.
  target = np.full((len(index), 2), -5.0)
  for _, batch in evaluated[0][1]:
    keep = np.asarray(batch['valid'])
    target[np.asarray(batch['index'])[keep]] = np.asarray(batch['va'])[keep]
  labelled = (target > -2).all(-1)
  x, y = mean['va'][labelled], target[labelled]
  ccc = 2 * ((x - x.mean(0)) * (y - y.mean(0))).mean(0) / (
      x.var(0) + y.var(0) + (x.mean(0) - y.mean(0)) ** 2)
  assert summary['eval']['va_ccc'] == pytest.approx(ccc.mean(), abs=1e-5)
  # One member: the ensemble's outputs give that member's metrics and decisions.
  metrics, rows = evaluated[-1]
  member = ensemble.MemberPass(index, ('expr', 'au', 'va'))
  for pair in rows:
    member.on_batch(*pair)
  tasks, combined, extra = ensemble.combine([member])
  assert extra == [0]
  accumulator = metrics_lib.MetricsAccumulator(tasks, c.num_expr_classes, keep_predictions=True)
  accumulator.update(*combined[0])
  alone = evaluation.metrics_of(accumulator, tasks, index, tune=True)
  for key in ('expr_f1', 'au_f1', 'va_ccc', 'au_f1_tuned', 'va_window'):
    assert alone[key] == pytest.approx(metrics[key], abs=1e-9), key


def _stand_in_fold_runs(workdir, monkeypatch, full: int = -1) -> tuple:
  """mode=oof's runs stood in for by the last two checkpoints of the finished run in `workdir`
  (fold j: the j-th, the full run: the `full`-th); returns (those steps, the runs asked for)."""
  steps = sorted(int(s) for s in os.listdir(workdir / 'checkpoints') if s.isdigit())[-2:]
  trained = []

  def stand_in(c, folder):  # a "run" of fold c.data.fold: one checkpoint of the finished run
    trained.append((c.data.fold, c.data.folds, os.path.basename(folder)))
    step = steps[c.data.fold] if c.data.fold >= 0 else steps[full]
    shutil.copytree(workdir / 'checkpoints' / str(step),
                    os.path.join(folder, 'checkpoints', str(step)))
    return {'stop_reason': 'finished'}

  monkeypatch.setattr(trainer, 'train_and_evaluate', stand_in)
  return steps, trained


def test_out_of_fold_evaluation_features_can_be_the_fold_runs_mean(
    uninterrupted, config, tmp_path, monkeypatch):
  """oof_eval=folds: the evaluation frames' predictions and embeddings are the mean of the fold
  runs' own (each fold's checkpoint evaluated on its own here), the training frames' as with
  'full'. The full run stands in with fold 0's checkpoint: reading it, or one fold, in place of
  the two folds gives other numbers."""
  from affectjax import oof
  from affectjax.data import sequences
  _, workdir = uninterrupted
  steps, trained = _stand_in_fold_runs(workdir, monkeypatch, full=0)
  c = config.copy_and_resolve_references()
  c.data.folds, c.data.oof_eval, c.eval_checkpoint = 2, 'folds', 'latest'
  result = oof.run_oof(c, str(tmp_path))
  assert trained == [(0, 2, 'fold_0'), (1, 2, 'fold_1'), (-1, 2, 'full')]
  validation = sequences.FeatureSet(result['out'], 'validation', 'predictions')
  embedding = sequences.FeatureSet(result['out'], 'validation')
  assert validation.meta['oof_eval'] == 'folds' and validation.meta['fold_steps'] == steps
  assert 'workdir' not in validation.meta and len(validation.meta['fold_workdirs']) == 2
  index = kinds.load_index(c, 'validation')
  np.testing.assert_array_equal(validation.index.frame, index.frame)
  assert validation.ok.all()
  mean = np.zeros_like(validation.features, np.float32)
  mean_embedding = np.zeros_like(embedding.features, np.float32)
  for step in steps:
    c.eval_checkpoint = str(step)
    run, state = inference.restore(c, str(workdir), index)
    _, pairs = evaluation.evaluate(run, run.eval_step(), state, index, keep_predictions=True)
    for outputs, batch in pairs:
      keep = np.asarray(batch['valid'])
      rows = np.asarray(batch['index'])[keep]
      mean[rows] += _reference_predictions(jax.device_get(outputs))[keep] / len(steps)
      mean_embedding[rows] += np.asarray(outputs['embedding'])[keep] / len(steps)
  np.testing.assert_allclose(validation.features, mean, atol=2e-3)
  np.testing.assert_allclose(embedding.features, mean_embedding, rtol=2e-3, atol=2e-3)
  train = sequences.FeatureSet(result['out'], 'train', 'predictions')
  assert train.meta['oof_eval'] == 'folds' and train.meta['full_step'] is None


def test_out_of_fold_features_come_from_models_that_left_their_videos_out(
    uninterrupted, config, tmp_path, monkeypatch):
  """mode=oof with 2 folds: each training frame's features come from its fold's run, which was
  asked to leave that fold out (kinds.load_index with data.fold, tested in test_holdout.py);
  the evaluation frames' from the full run. The runs themselves are stood in for by checkpoints
  of the finished run (another step per fold, so the models differ): the trainer is tested
  above."""
  from affectjax import oof
  from affectjax.data import sequences
  _, workdir = uninterrupted
  steps, trained = _stand_in_fold_runs(workdir, monkeypatch)
  c = config.copy_and_resolve_references()
  c.data.folds, c.eval_checkpoint = 2, 'latest'
  result = oof.run_oof(c, str(tmp_path))
  assert trained == [(0, 2, 'fold_0'), (1, 2, 'fold_1'), (-1, 2, 'full')]
  train = sequences.FeatureSet(result['out'], 'train')
  train_predictions = sequences.FeatureSet(result['out'], 'train', 'predictions')
  full_index = kinds.load_index(c, 'train')
  np.testing.assert_array_equal(train.index.frame, full_index.frame)
  assert train.ok.all() and train.meta['fold_steps'] == steps
  for j, step in enumerate(steps):
    rows = np.flatnonzero(result['fold'] == j)
    assert 0 < len(rows) < len(full_index)
    c.eval_checkpoint = str(step)
    run, state = inference.restore(c, str(workdir), full_index)
    _, pairs = evaluation.evaluate(run, run.eval_step(), state, full_index.subset(rows),
                                   keep_predictions=True)
    for outputs, batch in pairs:
      keep = np.asarray(batch['valid'])
      np.testing.assert_allclose(train.features[rows[np.asarray(batch['index'])[keep]]],
                                 np.asarray(outputs['embedding'])[keep], rtol=2e-3, atol=2e-3)
      np.testing.assert_allclose(
          train_predictions.features[rows[np.asarray(batch['index'])[keep]]],
          _reference_predictions(jax.device_get(outputs))[keep], atol=1e-3)
  validation = sequences.FeatureSet(result['out'], 'validation')
  assert validation.meta['workdir'] == str(tmp_path / 'full')
  assert validation.meta['step'] == steps[-1]
