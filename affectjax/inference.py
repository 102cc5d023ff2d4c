"""Inference from a run's checkpoints: `mode=eval` (metrics of a split, tuned post-processing,
per-frame predictions), `mode=predict` (ABAW submission files for unlabelled test lists) and
`mode=features` (per-frame features for the temporal models)."""
import functools
import json
import os
import time

import jax
import ml_collections
import numpy as np

from affectjax import checkpoint as ckpt_lib
from affectjax import labels
from affectjax import logs, metrics as metrics_lib, parallel, predictions, splits, train, trainer
from affectjax.data import sequences, unlabelled


def restore(config: ml_collections.ConfigDict, workdir: str):
  """(run, state, eval step function) of the checkpoint `config.eval_checkpoint` of WORKDIR."""
  run = trainer.build_run(config, steps_per_epoch=1)
  checkpoints = ckpt_lib.Checkpoints(os.path.join(workdir, 'checkpoints'))
  which = str(run.config.eval_checkpoint)
  step = {'best': checkpoints.best_step() or checkpoints.latest_step(),
          'latest': checkpoints.latest_step()}.get(which, None)
  step = int(which) if which.isdigit() else step
  state, _ = checkpoints.restore(parallel.replicate(run.state, run.mesh), step)
  checkpoints.close()
  eval_fn = parallel.data_parallel(functools.partial(train.eval_step, config=run.config),
                                   run.mesh, batch_out=True)
  return run, state, eval_fn


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """mode=eval: restores a checkpoint of WORKDIR, evaluates a split, writes metrics/predictions."""
  workdir = os.path.abspath(workdir)
  tasks = labels.parse_tasks(config.tasks)
  data = splits.load_split(config, config.eval_split, tasks)
  index = splits.frame_index(data)
  run, state, eval_fn = restore(config, workdir)
  config = run.config
  eval_metrics, rows = trainer.evaluate(run, eval_fn, state, data,
                                        keep_predictions=config.write_predictions, tune=True)
  eval_metrics['score'] = metrics_lib.score(eval_metrics, run.tasks, config.edition)
  step = int(state.step)
  if parallel.is_main_process():
    writer = logs.RunWriter(workdir)
    writer.write(step, f'eval_{config.eval_split}', eval_metrics)
    writer.close()
    out = os.path.join(workdir, f'eval_{config.eval_split}_step{step}.json')
    with open(out, 'w') as f:
      json.dump(eval_metrics, f, indent=2)
    print(f'Evaluated checkpoint step {step} on {config.eval_split} ({len(index)} frames): '
          f'score {eval_metrics["score"]:.4f}\n  ' +
          logs.format_metrics(eval_metrics, trainer.HEADLINE_KEYS) + f'\n  wrote {out}',
          flush=True)
    if 'au_thresholds' in eval_metrics:
      print(f'  AU thresholds tuned on {config.eval_split} (per-AU F1 maximum; saved in {out}, '
            f'use them for test predictions with --config.predict.au_thresholds={out}): '
            f'AU F1 {eval_metrics["au_f1"]:.4f} at 0.5, {eval_metrics["au_f1_tuned"]:.4f} '
            'tuned (optimistic on the tuning split)', flush=True)
    if 'va_window' in eval_metrics:
      print(f'  VA smoothing window tuned on {config.eval_split}: {eval_metrics["va_window"]} '
            f'frames (use --config.predict.va_window={eval_metrics["va_window"]}): VA CCC '
            f'{eval_metrics["va_ccc"]:.4f} unsmoothed, {eval_metrics["va_ccc_smoothed"]:.4f} '
            'smoothed (optimistic on the tuning split)', flush=True)
    if rows is not None:
      path = predictions.write_predictions(
          os.path.join(workdir, f'predictions_{config.eval_split}_step{step}.csv'), rows,
          index, run.tasks)
      print(f'  wrote {path}', flush=True)
  return eval_metrics


def test_list(config: ml_collections.ConfigDict) -> str:
  """The test list file of `config.predict` (exactly one of videos / images)."""
  p = config.predict
  if bool(p.videos) == bool(p.images):
    raise ValueError('mode=predict needs exactly one of predict.videos (a file with one test '
                     'video per line) and predict.images (a file of <video>/<frame>.jpg lines)')
  return p.videos or p.images


def list_name(list_path: str) -> str:
  """A test list's name: its file name without the extension."""
  return os.path.splitext(os.path.basename(list_path))[0]


def test_split(list_path: str) -> str:
  """The features folder of a test list's frames: `test_<list name>`."""
  return 'test_' + list_name(list_path)


def test_frames(config: ml_collections.ConfigDict):
  """The frame index (labels missing) of the test list, crops under predict.root."""
  p = config.predict
  root = p.root or splits.data_root(config)
  return unlabelled.frames_index(
      root, videos=unlabelled.read_video_list(p.videos) if p.videos else None,
      images=unlabelled.read_image_list(p.images) if p.images else None)


def _test_frame_iterator(config: ml_collections.ConfigDict, index):
  """Every listed frame once, read from the crop folders (not from packed training data)."""
  config = config.copy_and_resolve_references()
  config.data.source = 'jpeg'
  return splits.make_eval_iterator(config, index, labelled_only=False)


def predict_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """mode=predict: restores a checkpoint of WORKDIR and writes the predictions of an
  unlabelled test list (`config.predict`) in an ABAW submission format. A temporal run reads
  the test frames' features, extracted by its image run's mode=features with the same list."""
  workdir = os.path.abspath(workdir)
  p = config.predict
  list_path = test_list(config)
  fmt = p.format if p.format != 'auto' else ('mtl' if p.images else 'per_video')
  if fmt not in predictions.FORMATS:
    raise ValueError(f'predict.format must be auto or one of {predictions.FORMATS}, got {fmt!r}')
  run, state, eval_fn = restore(config, workdir)
  config = run.config
  if splits.is_temporal(config):  # the test frames' features, extracted by the image run
    data = sequences.FeatureSet(config.temporal.features_dir, test_split(list_path))
    index = data.index
    iterator = splits.make_eval_iterator(config, data, labelled_only=False)
  else:
    index = test_frames(config)
    iterator = _test_frame_iterator(config, index)
  rows = []
  trainer.infer(run, eval_fn, state, iterator, lambda *pair: rows.append(pair))
  skipped = trainer.skipped_frames(iterator)
  decided, predicted = predictions.gather_decisions(
      rows, len(index), run.tasks, predictions.read_au_thresholds(p.au_thresholds))
  if 'va' in run.tasks and p.va_window > 1:  # over each video's predicted frames, in order
    have = np.flatnonzero(predicted)
    decided['va'][have] = metrics_lib.smooth_per_video(decided['va'][have],
                                                       index.video_id[have], p.va_window)
  step = int(state.step)
  out = p.out or os.path.join(workdir, f'predictions_{list_name(list_path)}_step{step}')
  written = []
  if parallel.is_main_process():
    if fmt == 'per_video':
      counts = predictions.read_frame_counts(p.frame_counts) if p.frame_counts else None
      written = predictions.write_per_video(out, index, decided, predicted, run.tasks,
                                            config.num_expr_classes, counts)
    else:
      filled = {k: v[predictions.fill_rows(index, predicted)] for k, v in decided.items()}
      if fmt == 'mtl':
        os.makedirs(os.path.dirname(out) or '.', exist_ok=True)
        written = [predictions.write_mtl(out if out.endswith('.csv') else out + '.csv', index,
                                         filled, range(len(index)))]
      else:
        written = predictions.write_per_task(out, index, filled, run.tasks,
                                             config.num_expr_classes)
    print(f'Predicted {int(predicted.sum())} of {len(index)} listed frames of '
          f'{len(index.video_names)} videos ({list_path}) with checkpoint step {step}; '
          f'{skipped} unreadable frames filled from their nearest neighbour; AU thresholds '
          f'{p.au_thresholds or 0.5}; VA smoothing window {p.va_window}.\n'
          f'  format {fmt}: wrote {len(written)} files, e.g. {written[0] if written else "-"}',
          flush=True)
  return {'step': step, 'frames': len(index), 'predicted': int(predicted.sum()),
          'skipped_frames': skipped, 'format': fmt, 'files': written, 'out': out}


def extract_features(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """mode=features: the per-frame features of a checkpoint of this image run (its heads'
  shared layer, `embedding`: the pooled backbone features when model.head_hidden=0) for every
  frame of the training and evaluation splits, written for the temporal models
  (affectjax.data.sequences) to `config.features_out` (default WORKDIR/features)."""
  if splits.is_temporal(config):
    raise ValueError('mode=features extracts per-frame features with an image run')
  workdir = os.path.abspath(workdir)
  tasks = labels.parse_tasks(config.tasks)
  run, state, eval_fn = restore(config, workdir)
  out = config.features_out or os.path.join(workdir, 'features')
  written = {}
  wanted = ['train', config.eval_split]
  test_name = None
  if config.predict.videos or config.predict.images:  # and the test list's frames
    test_name = test_split(test_list(config))
    wanted.append(test_name)
  for split in dict.fromkeys(wanted):
    if split == test_name:
      index = test_frames(config)
      iterator = _test_frame_iterator(run.config, index)
    else:
      index = splits.load_index(config, split, tasks)
      iterator = splits.make_eval_iterator(run.config, index, labelled_only=False)
    features = probs = ok = None

    def on_batch(outputs, batch):
      nonlocal features, probs, ok
      embedding = np.asarray(outputs['embedding'])
      if features is None:
        features = np.zeros((len(index), embedding.shape[-1]), np.float16)
        ok = np.zeros(len(index), bool)
        if 'expr' in outputs:
          probs = np.zeros((len(index), outputs['expr'].shape[-1]), np.float16)
      keep = np.asarray(batch['valid'], bool)
      rows = np.asarray(batch['index'])[keep]
      features[rows] = embedding[keep]
      if probs is not None:  # EXPR class probabilities (the STAT / LSTM input of method 2)
        probs[rows] = np.asarray(jax.nn.softmax(np.asarray(outputs['expr'])[keep], axis=-1))
      ok[rows] = True

    start = time.time()
    trainer.infer(run, eval_fn, state, iterator, on_batch)
    if parallel.is_main_process():
      meta = {'workdir': workdir, 'step': int(state.step), 'tasks': list(run.tasks),
              'model': run.config.model.to_dict(), 'image_size': run.config.data.image_size}
      written[split] = sequences.write_feature_set(out, split, index, features, ok, meta,
                                                   probs=probs)
      print(f'features of {split}: {len(index)} frames x {features.shape[1]} '
            f'({int((~ok).sum())} unreadable) in {time.time() - start:.1f} s -> '
            f'{written[split]}', flush=True)
  if parallel.is_main_process():
    print(f'Extracted features with checkpoint step {int(state.step)}; train a temporal model '
          f'on them with --config=configs/temporal.py --config.temporal.features_dir={out}',
          flush=True)
  return {'step': int(state.step), 'out': out, 'splits': written}
