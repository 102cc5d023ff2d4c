"""The evaluation pass shared by the training loop and inference: a split's frames through the
jitted inference step, the ABAW metrics, and the post-processing tuned on them."""
import jax
import numpy as np
from jax.experimental import multihost_utils

from affectjax import labels, metrics as metrics_lib, parallel, train

HEADLINE_KEYS = ('expr_f1', 'expr_acc', 'au_f1', 'au_acc', 'va_ccc_valence', 'va_ccc_arousal',
                 'va_ccc', 'mtl_score')
# What evaluation consumers read of a batch: its labels and where its rows come from.
LABEL_KEYS = labels.TASKS + ('valid', 'index')


def infer(run, eval_step, state, iterator, on_batch) -> None:
  """Runs `eval_step` over every batch of `iterator`; `on_batch(outputs, batch)` gets the
  outputs and the labels (`LABEL_KEYS`) of the global batch, one row per frame, on every
  process."""
  for local_batch in iterator:
    outputs = eval_step(state, parallel.global_batch(local_batch, run.mesh))
    outputs = multihost_utils.process_allgather(outputs, tiled=True)
    batch = multihost_utils.process_allgather(
        {k: local_batch[k] for k in LABEL_KEYS}, tiled=True)
    on_batch(*train.flatten_time(outputs, batch))  # segments: one row per frame


def skipped_frames(iterator) -> int:
  """Undecodable frames of an evaluation pass, summed over processes."""
  return int(np.sum(multihost_utils.process_allgather(np.asarray([iterator.num_skipped]))))


def reading_counts(state: dict) -> tuple[int, int]:
  """(frames read, frames that could not be read or decoded), summed over processes, from an
  input iterator's state (`get_state()`, or the state that came with a training batch: the
  counts up to that batch, not the batches read ahead)."""
  counts = np.asarray([state.get('frames_read', 0), state.get('bad_frames', 0)], np.int64)
  read, bad = np.asarray(multihost_utils.process_allgather(counts)).reshape(-1, 2).sum(axis=0)
  return int(read), int(bad)


def with_counts_of_every_process(input_state: dict) -> dict:
  """The input state to checkpoint: with several processes, the reading counts of each (Orbax
  writes the JSON of the primary process only; `set_state` takes its own entry back)."""
  if jax.process_count() == 1 or 'frames_read' not in input_state:
    return input_state
  counts = np.asarray(multihost_utils.process_allgather(np.asarray(
      [input_state['frames_read'], input_state['bad_frames']], np.int64))).reshape(-1, 2)
  return dict(input_state, frames_read=counts[:, 0].tolist(), bad_frames=counts[:, 1].tolist())


def format_frame_counts(metrics: dict, prefix: str = '') -> str:
  """'unreadable frames: training 3 of 1,200 read (substituted), validation 1 of 300 (left
  out of the score)' from an evaluation's metrics (`skipped_frames`, `eval_frames` and, during
  training, `train_bad_frames`, `train_frames_read`)."""
  parts = []  # temporal runs read features, not frames: nothing to say
  if metrics.get('train_frames_read'):
    parts.append(f"training {metrics['train_bad_frames']:,} of {metrics['train_frames_read']:,} "
                 'read' + (' (substituted)' if metrics['train_bad_frames'] else ''))
  if metrics.get('eval_frames'):
    parts.append(f"evaluation {metrics['skipped_frames']:,} of {metrics['eval_frames']:,}"
                 + (' (left out of the score)' if metrics['skipped_frames'] else ''))
  return f'{prefix}unreadable frames: ' + ', '.join(parts) if parts else ''


def tune_post_processing(kept: dict, tasks: tuple, index) -> dict:
  """The post-processing that does best on the kept predictions of an evaluation pass:
  per-AU thresholds maximising each AU's F1 (`au_thresholds`; `au_f1_tuned`) and the VA
  smoothing window maximising the mean CCC (`va_window`, in video frames; `va_ccc_smoothed`, the
  centred moving average over each video's VA-labelled frames within the window)."""
  results = {}
  if 'au' in tasks:
    au = kept['au']
    thresholds = metrics_lib.tune_au_thresholds(au['pred'], au['target'])
    results['au_f1_tuned'] = metrics_lib.au_metrics(au['pred'], au['target'],
                                                    thresholds)['au_f1']
    results['au_thresholds'] = [float(t) for t in thresholds]
  va = kept.get('va')
  if 'va' in tasks and va is not None and len(va['pred']):
    video, frame = index.video_id[va['index']], index.frame[va['index']]
    window = metrics_lib.tune_va_window(va['pred'], va['target'], video, frame=frame)
    results['va_window'] = window
    results['va_ccc_smoothed'] = metrics_lib.va_metrics(
        metrics_lib.smooth_per_video(va['pred'], video, window, frame), va['target'])['va_ccc']
  return results


def evaluate(run, eval_step, state, data, *, keep_predictions: bool = False,
             tune: bool = False):
  """A full pass over `data` (a split loaded by the run's kind: every frame exactly once);
  returns (metrics, the (outputs, batch) pairs when `keep_predictions`, else None).

  With `tune`, also `tune_post_processing`'s settings and scores. Both scores are optimistic,
  tuned on the very frames they are measured on: apply the settings to another split."""
  config = run.config
  accumulator = metrics_lib.MetricsAccumulator(run.tasks, config.num_expr_classes,
                                               keep_predictions=tune and 'au' in run.tasks)
  rows = [] if keep_predictions else None
  iterator = run.kind.eval_iterator(config, data)

  def on_batch(outputs, batch):
    accumulator.update(outputs, batch)
    if rows is not None:
      rows.append((outputs, batch))

  infer(run, eval_step, state, iterator, on_batch)
  results = metrics_of(accumulator, run.tasks, run.kind.frame_index(data), tune)
  results['skipped_frames'] = skipped_frames(iterator)  # left out of the metrics
  results['eval_frames'] = reading_counts(iterator.get_state())[0]
  return results, rows


def metrics_of(accumulator, tasks: tuple, index, tune: bool) -> dict:
  """The metrics of an accumulated pass and, with `tune`, `tune_post_processing`'s."""
  results = accumulator.compute()
  if tune:
    results.update(tune_post_processing(accumulator.predictions(), tasks, index))
  return results

