"""The training loop (`train_and_evaluate`) and what it shares with inference (affectjax.inference):
the run (model, optimiser, mesh, state) and evaluation."""
import dataclasses
import functools
import json
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from affectjax import checkpoint as ckpt_lib
from affectjax import labels
from affectjax import logs, metrics as metrics_lib, optim, parallel, splits, train, weights
from affectjax.data import sequences, sources
from affectjax.models import affect, preprocess, temporal

HEADLINE_KEYS = ('expr_f1', 'expr_acc', 'au_f1', 'au_acc', 'va_ccc_valence', 'va_ccc_arousal',
                 'va_ccc', 'mtl_score')


@dataclasses.dataclass
class Run:
  """Everything a run derives from its config before the first step."""
  config: ml_collections.ConfigDict  # resolved: dtype and preprocessing filled in
  tasks: tuple
  mesh: Any
  model: Any
  state: train.TrainState
  steps_per_epoch: int
  total_steps: int
  schedule: Any


def resolve_dtype(name: str) -> str:
  if name == 'auto':
    return 'float32' if jax.default_backend() == 'cpu' else 'bfloat16'
  if name not in ('float32', 'bfloat16'):
    raise ValueError(f"config.dtype must be 'auto', 'float32' or 'bfloat16', got {name!r}")
  return name


def resolve_preprocessing(config: ml_collections.ConfigDict) -> dict:
  """Input normalisation: from the init_from weights' metadata when 'auto', else the preset."""
  name = config.preprocessing
  if name == 'auto':
    meta = read_weights_meta(config.init_from) if config.init_from else None
    if meta is not None:
      return dict(meta['preprocessing'])
    name = 'unit'
  if name not in preprocess.PRESETS:
    raise ValueError(f'config.preprocessing={name!r}: expected auto or one of '
                     f'{", ".join(preprocess.PRESETS)}')
  return dict(preprocess.PRESETS[name])


def read_weights_meta(path: str) -> dict | None:
  """The metadata of converted weights (python -m affectjax.convert), None for a run dir."""
  meta_path = os.path.join(path, weights.META_FILE)
  if os.path.exists(meta_path):
    with open(meta_path) as f:
      return json.load(f)
  return None


def build_run(config: ml_collections.ConfigDict, steps_per_epoch: int) -> Run:
  """Model, optimiser, mesh and the replicated initial state."""
  config = config.copy_and_resolve_references()
  tasks = labels.parse_tasks(config.tasks)
  config.model.dtype = resolve_dtype(config.dtype)
  config.model.bn_axis_name = train.DATA_AXIS if config.model.sync_bn else None
  with config.unlocked():
    config.input_preprocessing = resolve_preprocessing(config)  # what the device applies
  meta = read_weights_meta(config.init_from) if config.init_from else None
  if meta is not None:
    # The block layout of the weights (VGGFace2: stride on the 1x1, ceil-mode pool) is part
    # of the weights; depth and width must be chosen to match them.
    config.model.stride_on, config.model.stem_pool = meta['stride_on'], meta['stem_pool']
    config.model.bn_epsilon = meta.get('bn_epsilon', config.model.bn_epsilon)
    weights.check_model_config(config.model, meta)
  mesh = parallel.make_mesh(config.num_devices)
  if config.global_batch_size % mesh.size or config.eval_batch_size % mesh.size:
    raise ValueError(f'global_batch_size={config.global_batch_size} and eval_batch_size='
                     f'{config.eval_batch_size} must be multiples of the {mesh.size} devices')
  total_steps = max(int(round(config.num_epochs * steps_per_epoch)), 1)
  schedule = optim.learning_rate_schedule(config.optim, steps_per_epoch, config.num_epochs)
  tx = optim.create_optimizer(config.optim, schedule, steps_per_epoch)
  if splits.is_temporal(config):
    model = temporal.create_model(config.temporal, tasks, config.num_expr_classes)
    features = sequences.FeatureSet(config.temporal.features_dir, 'train')
    length = config.temporal.length
    inputs = {'features': jnp.zeros((1, length, features.dim), jnp.float32),
              'mask': jnp.ones((1, length), bool)}
    if features.probs is not None:
      inputs['probs'] = jnp.zeros((1, length, features.probs.shape[1]), jnp.float32)
  else:
    model = affect.create_model(config.model, tasks, config.num_expr_classes)
    inputs = (config.data.image_size, config.data.image_size, 3)
  state = train.create_train_state(model, tx, config.seed, inputs)
  return Run(config, tasks, mesh, model, state, steps_per_epoch, total_steps, schedule)


def is_periodic_save(config: ml_collections.ConfigDict, step: int, steps_per_epoch: int) -> bool:
  """Whether the policy saves at `step`: every checkpoint_every_steps and every
  checkpoint_every_epochs (0 = never by epochs). Runs also save after evaluations, at the end,
  on SIGTERM and at halt_after_steps."""
  if step % config.checkpoint_every_steps == 0:
    return True
  if config.checkpoint_every_epochs <= 0:
    return False
  return step % max(int(round(config.checkpoint_every_epochs * steps_per_epoch)), 1) == 0


class _Preemption:
  """Turns SIGTERM into a flag the loop checks between steps (then it saves and exits)."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: no handler
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _mean_metrics(pending: list) -> dict:
  """Averages the fetched per-step metrics of a logging interval."""
  host = jax.device_get(pending)
  return {k: float(np.mean([m[k] for m in host])) for k in host[0]}


def infer(run: Run, eval_step, state, iterator, on_batch) -> None:
  """Runs `eval_step` over every batch of `iterator`; `on_batch(outputs, batch)` gets the
  outputs and the labels (no images) of the global batch, on every process."""
  for local_batch in iterator:
    outputs = eval_step(state, parallel.global_batch(local_batch, run.mesh))
    outputs = multihost_utils.process_allgather(outputs, tiled=True)
    batch = multihost_utils.process_allgather(
        {k: v for k, v in local_batch.items() if k not in ('image', 'features')}, tiled=True)
    on_batch(*train.flatten_time(outputs, batch))  # segments: one row per frame


def skipped_frames(iterator) -> int:
  """Undecodable frames of an evaluation pass, summed over processes."""
  return int(np.sum(multihost_utils.process_allgather(np.asarray([iterator.num_skipped]))))


def evaluate(run: Run, eval_step, state, data, *, keep_predictions: bool = False,
             tune: bool = False):
  """A full pass over `data` (a split from `splits.load_split`: every frame exactly once);
  returns (metrics, predictions).

  With `tune`, also the post-processing that does best on this pass: per-AU thresholds
  maximising each AU's F1 (`au_thresholds`, a list; `au_f1_tuned`) and the VA smoothing
  window maximising the mean CCC (`va_window`; `va_ccc_smoothed`, the moving average over each
  video's VA-labelled frames). Both scores are optimistic, tuned on the very frames they are
  measured on: apply the settings to another split."""
  config = run.config
  tune_au = tune and 'au' in run.tasks
  accumulator = metrics_lib.MetricsAccumulator(run.tasks, config.num_expr_classes,
                                               keep_predictions=tune_au)
  rows = [] if keep_predictions else None
  index = splits.frame_index(data)
  iterator = splits.make_eval_iterator(config, data)

  def on_batch(outputs, batch):
    accumulator.update(outputs, batch)
    if rows is not None:
      rows.append((outputs, batch))

  infer(run, eval_step, state, iterator, on_batch)
  results = accumulator.compute()
  results['skipped_frames'] = skipped_frames(iterator)  # padding rows in the batches
  kept_rows = accumulator.predictions() if tune else {}
  if tune_au:
    kept = kept_rows['au']
    thresholds = metrics_lib.tune_au_thresholds(kept['pred'], kept['target'])
    results['au_f1_tuned'] = metrics_lib.au_metrics(kept['pred'], kept['target'],
                                                    thresholds)['au_f1']
    results['au_thresholds'] = [float(t) for t in thresholds]
  if tune and 'va' in run.tasks:
    kept = kept_rows.get('va')
    if kept is not None and len(kept['pred']):
      video = index.video_id[kept['index']]
      window = metrics_lib.tune_va_window(kept['pred'], kept['target'], video)
      results['va_window'] = window
      results['va_ccc_smoothed'] = metrics_lib.va_metrics(
          metrics_lib.smooth_per_video(kept['pred'], video, window), kept['target'])['va_ccc']
  return results, rows


def _save_config(config: ml_collections.ConfigDict, workdir: str):
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains with periodic evaluation and checkpoints; resumes from WORKDIR if it has any."""
  t_start = time.time()
  workdir = os.path.abspath(workdir)
  tasks = labels.parse_tasks(config.tasks)
  train_data = splits.load_split(config, 'train', tasks)
  eval_data = splits.load_split(config, config.eval_split, tasks)
  train_iter = splits.make_train_iterator(config, train_data)
  config = splits.with_label_weights(config, splits.frame_index(train_data))
  if config.data.decoded_cache and not splits.is_temporal(config):
    sources.make_source(eval_data, config.data)  # decode the evaluation frames now
  run = build_run(config, train_iter.steps_per_epoch)
  config = run.config
  writer = logs.RunWriter(workdir, enabled=parallel.is_main_process())
  if parallel.is_main_process():
    _save_config(config, workdir)
  checkpoints = ckpt_lib.Checkpoints(os.path.join(workdir, 'checkpoints'),
                                     keep_latest=config.keep_checkpoints,
                                     keep_best=config.keep_best_checkpoints)
  state = run.state
  if checkpoints.latest_step() is not None:
    state, input_state = checkpoints.restore(parallel.replicate(state, run.mesh))
    train_iter.set_state(input_state)
    print(f'Resumed from {checkpoints.directory} at step {int(state.step)}', flush=True)
  else:
    if config.init_from:
      state, _ = ckpt_lib.init_from(state, config.init_from)
    state = parallel.replicate(state, run.mesh)

  step_fn = parallel.data_parallel(
      functools.partial(train.train_step, config=config, lr_schedule=run.schedule), run.mesh,
      donate_state=True)
  eval_fn = parallel.data_parallel(functools.partial(train.eval_step, config=config), run.mesh,
                                   batch_out=True)
  snapshot_fn = jax.jit(lambda tree: jax.tree_util.tree_map(jnp.copy, tree))
  step = int(state.step)
  eval_every = max(int(round(config.eval_every_epochs * run.steps_per_epoch)), 1)
  progress = logs.Progress(run.total_steps, step, config.global_batch_size,
                           enabled=config.progress_bar and parallel.is_main_process())
  best = {'score': -np.inf, 'step': None, 'metrics': None}
  last_metrics, stop_reason, throughput = {}, 'finished', []
  # Step metrics are copied to the host asynchronously. A finished logging interval is read
  # one step later, after the next step is dispatched, so the device never waits for the host's
  # logging. Periodic saves likewise: the state is copied on the device (the next step donates
  # it) and handed to Orbax after the next step is dispatched, so the device keeps working
  # while Orbax copies it to the host. Evaluations and final saves read everything first.
  pending = []  # metrics of the steps since the last logging step
  interval = None  # (last step, its metrics list): a logging interval not yet read
  deferred_save = None  # (step, state copy, input state, metrics since the last logging step)

  def read_interval(end: int, interval_metrics: list) -> dict:
    """Averages an interval's step metrics; stops the run if any loss was non-finite."""
    summary = _mean_metrics(interval_metrics)
    if summary['finite'] < 1.0:
      raise FloatingPointError(
          f'non-finite loss between steps {end - len(interval_metrics) + 1} and {end}: '
          f'stopping. The updates of those steps were skipped; the last good checkpoint is '
          f'step {checkpoints.latest_step()} in {checkpoints.directory}. Lower the learning '
          'rate or enable optim.grad_clip_norm.')
    return summary

  def write_interval():
    nonlocal interval
    if interval is None:
      return
    end, interval_metrics = interval
    interval = None
    summary = read_interval(end, interval_metrics)
    progress.update(end, summary)
    summary.update(epoch=end / run.steps_per_epoch,
                   images_per_second=progress.images_per_second)
    throughput.append(progress.images_per_second)
    writer.write(end, 'train', summary)

  def save(saved_step, saved_state, saved_input, unlogged: list, score=None):
    """Saves after checking every step up to `saved_step` had a finite loss: the logging
    intervals (written here) and `unlogged`, the steps since the last logging step."""
    write_interval()
    if unlogged:
      read_interval(saved_step, unlogged)
    checkpoints.save(saved_step, saved_state, saved_input, score=score)

  def save_deferred():
    nonlocal deferred_save
    if deferred_save is not None:
      args, deferred_save = deferred_save, None
      save(*args)

  try:
    with _Preemption() as preemption:
      batches = parallel.prefetch_to_mesh(train_iter, run.mesh, state_fn=train_iter.get_state)
      for batch, input_state in batches:
        if step >= run.total_steps:
          break
        state, step_metrics = step_fn(state, batch)
        step += 1
        for value in step_metrics.values():
          value.copy_to_host_async()
        pending.append(step_metrics)
        write_interval()  # the previous interval, while this step runs
        save_deferred()
        last = step >= run.total_steps
        if step % config.log_every_steps == 0 or last:
          interval, pending = (step, pending), []
        score = None
        if step % eval_every == 0 or last:
          write_interval()
          jax.block_until_ready(state)  # the queued training steps count as training time
          eval_start = time.perf_counter()
          eval_metrics, _ = evaluate(run, eval_fn, state, eval_data)
          progress.exclude(time.perf_counter() - eval_start)  # img/s counts training only
          score = metrics_lib.score(eval_metrics, run.tasks, config.edition)
          eval_metrics['score'] = score
          writer.write(step, config.eval_split, eval_metrics)
          progress.write(f'[step {step}, epoch {step / run.steps_per_epoch:.2f}] '
                         f'{config.eval_split}: score {score:.4f}  ' +
                         logs.format_metrics(eval_metrics, HEADLINE_KEYS))
          last_metrics = eval_metrics
          if score > best['score']:
            best = {'score': score, 'step': step, 'metrics': eval_metrics}
        halt = bool(config.halt_after_steps) and step >= config.halt_after_steps
        if last or preemption.requested or halt or score is not None:
          save(step, state, input_state, pending, score=score)
        elif is_periodic_save(config, step, run.steps_per_epoch):
          deferred_save = (step, snapshot_fn(state), input_state, list(pending))
        if preemption.requested:
          stop_reason = 'preempted (SIGTERM): checkpoint saved'
          break
        if halt:
          stop_reason = f'halted after step {step} (config.halt_after_steps)'
          break
      write_interval()
      save_deferred()
  finally:
    # Also on errors (NaN stop): let the last good checkpoint finish writing.
    checkpoints.wait()
    checkpoints.close()
    progress.close()
    writer.close()
  summary = {'stop_reason': stop_reason, 'steps': step, 'seconds': time.time() - t_start,
             'best_score': best['score'], 'best_step': best['step'],
             'final_metrics': last_metrics, 'workdir': workdir,
             'images_per_second': float(np.median(throughput)) if throughput else None,
             'state': state}
  if parallel.is_main_process():
    print(format_summary(summary, run), flush=True)
  return summary


def format_summary(summary: dict, run: Run) -> str:
  lines = [f"Run {summary['stop_reason']} at step {summary['steps']}/{run.total_steps} in "
           f"{summary['seconds']:.0f} s; workdir {summary['workdir']}"]
  if summary['images_per_second']:
    lines.append(f"  training throughput (median of logging intervals): "
                 f"{summary['images_per_second']:.0f} images/s")
  if summary['best_step'] is not None:
    lines.append(f"  best validation score {summary['best_score']:.4f} at step "
                 f"{summary['best_step']}")
  if summary['final_metrics']:
    lines.append('  final validation: ' + logs.format_metrics(summary['final_metrics'],
                                                              HEADLINE_KEYS))
  return '\n'.join(lines)
