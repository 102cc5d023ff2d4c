"""Inference from a run's checkpoints: `mode=eval` (metrics of a split, tuned post-processing,
per-frame predictions), `mode=predict` (ABAW submission files for unlabelled test lists) and
`mode=features` (per-frame features for the temporal models)."""
import errno
import json
import os
import time

import jax
import ml_collections
import numpy as np

from affectjax import checkpoint as ckpt_lib
from affectjax import evaluation, kinds, labels, logs, metrics as metrics_lib, parallel
from affectjax import predictions, runs
from affectjax import report
from affectjax import files
from affectjax.data import sequences, unlabelled


def restore(config: ml_collections.ConfigDict, workdir: str, data):
  """(run, state) of the checkpoint `config.eval_checkpoint` of WORKDIR; `data` is a split
  loaded by the config's kind. The run's config is the resolved one."""
  run = runs.build_run(runs.resolve_config(config), data)
  # Read-only: creates nothing (a mistyped WORKDIR stays absent) and works on read-only copies.
  checkpoints = ckpt_lib.Checkpoints(os.path.join(workdir, 'checkpoints'), read_only=True)
  which = str(run.config.eval_checkpoint)
  step = {'best': checkpoints.best_step() or checkpoints.latest_step(),
          'latest': checkpoints.latest_step()}.get(which, None)
  step = int(which) if which.isdigit() else step
  if step not in checkpoints.manager.all_steps():
    raise ckpt_lib.CheckpointError(
        f'config.eval_checkpoint={which}: no such step in {checkpoints.directory} (steps there: '
        f'{", ".join(map(str, checkpoints.manager.all_steps()))})')
  state = checkpoints.restore_model(parallel.replicate(run.state, run.mesh), step)
  checkpoints.close()
  return run, state


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """mode=eval: restores a checkpoint of WORKDIR, evaluates a split, writes metrics/predictions."""
  workdir = os.path.abspath(workdir)
  kind = kinds.get_kind(config)
  data = kind.load_split(config, config.eval_split)
  index = kind.frame_index(data)
  run, state = restore(config, workdir, data)
  eval_metrics, rows = evaluation.evaluate(run, run.eval_step(), state, data,
                                           keep_predictions=run.config.write_predictions,
                                           tune=True)
  step = int(state.step)
  report_evaluation(run.config, workdir, eval_metrics, rows, index, run.tasks, f'step{step}',
                    f'checkpoint step {step}')
  return eval_metrics


def report_evaluation(config, workdir: str, eval_metrics: dict, rows, index, tasks: tuple,
                      name: str, what: str) -> None:
  """Scores, prints and writes (under config.eval_out or WORKDIR) an evaluation's metrics, its
  tuned post-processing and, given its (outputs, batch) `rows`, the per-frame predictions:
  eval_<split>_<name>.json and predictions_<split>_<name>.csv."""
  out_dir = os.path.abspath(config.eval_out or workdir)
  writable = files.is_writable(out_dir)
  if not writable and parallel.is_main_process():
    print(f'{out_dir} is not writable: the results are printed, not written '
          '(set --config.eval_out=DIR to write them)', flush=True)
  eval_metrics['score'] = metrics_lib.score(eval_metrics, tasks, config.edition)
  if parallel.is_main_process():
    # Named by split and step: runs evaluating other checkpoints or splits write other files,
    # and a file appears whole (atomic rename) even when two evaluate the same one.
    out = os.path.join(out_dir, f'eval_{config.eval_split}_{name}.json')
    if writable:
      with files.atomic_write(out) as f:
        json.dump(eval_metrics, f, indent=2)
    print(f'Evaluated {what} on {config.eval_split} ({len(index)} frames): '
          f'score {eval_metrics["score"]:.4f}\n  ' +
          logs.format_metrics(eval_metrics, evaluation.HEADLINE_KEYS) +
          evaluation.format_frame_counts(eval_metrics, prefix='\n  ') +
          (f'\n  wrote {out}' if writable else ''), flush=True)
    if 'au_thresholds' in eval_metrics:
      where = (f'saved in {out}, use them for test predictions with '
               f'--config.predict.au_thresholds={out}' if writable else
               f"{','.join(f'{t:.2f}' for t in eval_metrics['au_thresholds'])}")
      print(f'  AU thresholds tuned on {config.eval_split} (per-AU F1 maximum; {where}): '
            f'AU F1 {eval_metrics["au_f1"]:.4f} at 0.5, {eval_metrics["au_f1_tuned"]:.4f} '
            'tuned (optimistic on the tuning split)', flush=True)
    if 'va_window' in eval_metrics:
      print(f'  VA smoothing window tuned on {config.eval_split}: {eval_metrics["va_window"]} '
            f'frames (use --config.predict.va_window={eval_metrics["va_window"]}): VA CCC '
            f'{eval_metrics["va_ccc"]:.4f} unsmoothed, {eval_metrics["va_ccc_smoothed"]:.4f} '
            'smoothed (optimistic on the tuning split)', flush=True)
    if rows is not None and writable:
      path = predictions.write_predictions(
          os.path.join(out_dir, f'predictions_{config.eval_split}_{name}.csv'), rows,
          index, tasks)
      print(f'  wrote {path}', flush=True)
    if writable:  # the figures (report.py), also as TensorBoard images
      numbers = report.figure_numbers(eval_metrics, rows, index, tasks, config.num_expr_classes,
                                      logs.read_records(os.path.join(workdir, 'metrics.jsonl')))
      folder = os.path.join(out_dir, f'report_{config.eval_split}_{name}')
      written = report.write_report(folder, numbers, os.path.join(out_dir, 'tensorboard', 'eval'),
                                    int(name[4:]) if name[4:].isdigit() else 0)
      print(f'  wrote {folder}: {", ".join(os.path.basename(p) for p in written)}', flush=True)


def predict_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """mode=predict: restores a checkpoint of WORKDIR and writes the predictions of an
  unlabelled test list (`config.predict`) in an ABAW submission format. A temporal run reads
  the test frames' features, extracted by its image run's mode=features with the same list."""
  workdir = os.path.abspath(workdir)
  p = config.predict
  list_path = kinds.test_list(config)
  fmt = predictions.submission_format(p.format, image_list=bool(p.images))
  kind = kinds.get_kind(config)
  data = kind.load_test(config)
  index = kind.frame_index(data)
  run, state = restore(config, workdir, data)
  step = int(state.step)
  out = p.out or os.path.join(workdir, f'predictions_{kinds.list_name(list_path)}_step{step}')
  folder = os.path.dirname(os.path.abspath(out))
  if not parallel.main_process_says(not parallel.is_main_process() or
                                    files.is_writable(folder)):
    raise OSError(errno.EROFS, f'{folder} is not writable, where mode=predict writes {out}: '
                  'set --config.predict.out to a path on a writable disk')
  iterator = kind.test_iterator(run.config, data)
  rows = []
  evaluation.infer(run, run.eval_step(), state, iterator, lambda *pair: rows.append(pair))
  skipped = evaluation.skipped_frames(iterator)
  written, predicted = write_test_predictions(
      config, fmt, out, rows, index, run.tasks, run.config.num_expr_classes,
      f'{list_path}) with checkpoint step {step}; {skipped} unreadable frames filled from their '
      'nearest neighbour')
  return {'step': step, 'frames': len(index), 'predicted': int(predicted.sum()),
          'skipped_frames': skipped, 'format': fmt, 'files': written, 'out': out}


def write_test_predictions(config, fmt: str, out: str, rows, index, tasks: tuple,
                           num_expr_classes: int, what: str) -> tuple:
  """Decides a test list's (outputs, batch) `rows` with config.predict's AU thresholds and VA
  window, writes them in the submission format `fmt` to `out` and says so (`what`: the list
  and the model); returns (files written, predicted bool per index row)."""
  p = config.predict
  decided, predicted = predictions.gather_decisions(
      rows, len(index), tasks, predictions.read_au_thresholds(p.au_thresholds))
  if 'va' in tasks and p.va_window > 1:  # each video's predicted frames within the window
    have = np.flatnonzero(predicted)
    decided['va'][have] = metrics_lib.smooth_per_video(
        decided['va'][have], index.video_id[have], p.va_window, index.frame[have])
  written = []
  if parallel.is_main_process():
    counts = (predictions.read_frame_counts(p.frame_counts)
              if p.frame_counts and fmt in ('per_video', 'per_task') else None)
    order = (predictions.list_order(index, unlabelled.read_image_list(p.images))
             if p.images else None)
    written = predictions.write_submission(fmt, out, index, decided, predicted, tasks,
                                           num_expr_classes, counts, order)
    print(f'Predicted {int(predicted.sum())} of {len(index)} listed frames of '
          f'{len(index.video_names)} videos ({what}; AU thresholds '
          f'{p.au_thresholds or 0.5}; VA smoothing window {p.va_window}.\n'
          f'  format {fmt}: wrote {len(written)} files, e.g. {written[0] if written else "-"}',
          flush=True)
  return written, predicted


def frame_predictions(outputs: dict) -> np.ndarray:
  """[..., P] float32: a frame model's predictions as one vector per frame, its tasks in
  labels.TASKS order: EXPR class probabilities, AU probabilities, valence and arousal (clipped
  to [-1, 1]): what `temporal.inputs='predictions'` reads."""
  parts = {'expr': lambda x: jax.nn.softmax(x, axis=-1), 'au': metrics_lib.sigmoid,
           'va': predictions.clip_va}
  return np.concatenate([np.asarray(parts[t](np.asarray(outputs[t], np.float32)), np.float32)
                         for t in labels.TASKS if t in outputs], axis=-1)


class FrameFeatures:
  """Collects the per-frame features (`embedding`), EXPR probabilities and predictions
  (`frame_predictions`) of an inference pass over the `num_frames` rows of a frame index
  (`on_batch` of `evaluation.infer`)."""

  def __init__(self, num_frames: int):
    self.num_frames = num_frames
    self.features = self.probs = self.predictions = None
    self.ok = np.zeros(num_frames, bool)

  def on_batch(self, outputs, batch) -> None:
    embedding = np.asarray(outputs['embedding'])
    predictions = frame_predictions(outputs)
    if self.features is None:
      self.features = np.zeros((self.num_frames, embedding.shape[-1]), np.float16)
      self.predictions = np.zeros((self.num_frames, predictions.shape[-1]), np.float16)
      if 'expr' in outputs:
        self.probs = np.zeros((self.num_frames, outputs['expr'].shape[-1]), np.float16)
    keep = np.asarray(batch['valid'], bool)
    rows = np.asarray(batch['index'])[keep]
    self.features[rows] = embedding[keep]
    self.predictions[rows] = predictions[keep]
    if self.probs is not None:  # EXPR class probabilities (the STAT / LSTM input of method 2):
      self.probs[rows] = predictions[keep, :self.probs.shape[1]]  # the predictions' first columns
    self.ok[rows] = True


def extract_features(config: ml_collections.ConfigDict, workdir: str,
                     train: bool = True, test_only: bool = False) -> dict:
  """mode=features: the per-frame features of a checkpoint of this image run (its heads'
  shared layer, `embedding`: the pooled backbone features when model.head_hidden=0) for every
  frame of the training and evaluation splits (and of the test list of `config.predict`, as
  `test_<list name>`), written for the temporal models (affectjax.data.sequences) to
  `config.features_out` (default WORKDIR/features). Without `train`, the other splits only
  (mode=oof writes the training frames' features from its fold runs); `test_only`: the test
  list's frames only (affectjax.analyze)."""
  kind = kinds.get_kind(config)
  if not kind.extracts_features:
    raise ValueError(f'mode=features extracts per-frame features with an image run, not a '
                     f'{kind.name} run')
  workdir = os.path.abspath(workdir)
  run, state = restore(config, workdir, data=None)
  config = run.config
  eval_fn = run.eval_step()
  out = config.features_out or os.path.join(workdir, 'features')
  written = {}
  wanted = [] if test_only else ['train'] * train + [config.eval_split]
  test_name = None
  if config.predict.videos or config.predict.images:  # and the test list's frames
    test_name = kinds.test_split(kinds.test_list(config))
    wanted.append(test_name)
  for split in dict.fromkeys(wanted):
    if split == test_name:
      index = kind.load_test(config)
      iterator = kind.test_iterator(config, index)
    else:
      index = kind.load_split(config, split)
      iterator = kind.eval_iterator(config, index, labelled_only=False)
    collected = FrameFeatures(len(index))
    start = time.time()
    evaluation.infer(run, eval_fn, state, iterator, collected.on_batch)
    if parallel.is_main_process():
      meta = {'workdir': workdir, 'step': int(state.step), 'tasks': list(run.tasks),
              'model': config.model.to_dict(), 'image_size': config.data.image_size}
      written[split] = sequences.write_feature_set(out, split, index, collected.features,
                                                   collected.ok, meta, probs=collected.probs,
                                                   predictions=collected.predictions)
      print(f'features of {split}: {len(index)} frames x {collected.features.shape[1]} '
            f'({int((~collected.ok).sum())} unreadable) in {time.time() - start:.1f} s -> '
            f'{written[split]}', flush=True)
  if parallel.is_main_process():
    print(f'Extracted features with checkpoint step {int(state.step)}; train a temporal model '
          f'on them with --config=configs/temporal.py --config.temporal.features_dir={out}',
          flush=True)
  return {'step': int(state.step), 'out': out, 'splits': written}
