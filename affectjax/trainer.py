"""The training loop: `train_and_evaluate` trains a run with periodic evaluation and
checkpoints, and resumes from its workdir. Building the run is `affectjax.runs`, the evaluation
pass `affectjax.evaluation`, the steps `affectjax.train`."""
import contextlib
import os
import signal
import time

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from affectjax import checkpoint as ckpt_lib
from affectjax import config as config_lib
from affectjax import evaluation, kinds, logs, metrics as metrics_lib, optim, parallel, runs, train
from affectjax import workdir as workdir_lib


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
  """Turns SIGTERM into a flag the loop checks between steps (then it saves and exits).

  With several processes the stop must be joint (the save is a collective): each process's
  flag is combined with the others' at `agreed(at_sync=True)`, which every process calls at
  the same steps (the logging steps), so all of them stop after the same step."""

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

  def agreed(self, at_sync: bool) -> bool:
    """Whether to stop after this step: this process's flag alone, or with several processes,
    at a step where every process calls this with at_sync=True, whether any was signalled."""
    if jax.process_count() == 1:
      return self.requested
    if not at_sync:
      return False
    return bool(np.any(multihost_utils.process_allgather(np.int32(self.requested))))


def _save_config(config: ml_collections.ConfigDict, workdir: str):
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))


class StepLedger:
  """The loop's asynchronous side: logging intervals and periodic saves, one step late.

  Step metrics are copied to the host asynchronously. A finished logging interval is read one
  step later, after the next step is dispatched, so the device never waits for the host's
  logging. Periodic saves likewise: the state is copied on the device (the next step donates
  it) and handed to Orbax after the next step is dispatched, so the device keeps working while
  Orbax copies it to the host. Every save first checks that each step up to it had a finite
  loss; a non-finite one stops the run before anything later is saved.
  """

  def __init__(self, checkpoints, writer, progress, steps_per_epoch: int):
    self.checkpoints, self.writer, self.progress = checkpoints, writer, progress
    self.steps_per_epoch = steps_per_epoch
    self.unlogged = []  # metrics of the steps since the last logging step
    self.interval = None  # (last step, its metrics list): a logging interval not yet read
    self.deferred = None  # (step, state copy, input state, metrics since the last logging step)
    self.throughput = []  # images/s of each logging interval
    self.input_wait = []  # the fraction of each logging interval spent waiting for batches

  def add_step(self, step: int, step_metrics: train.StepMetrics, ends_interval: bool) -> None:
    """Records a dispatched step; then writes the previous interval and the deferred save,
    whose steps are done or queued before this one."""
    step_metrics.vector.copy_to_host_async()
    self.unlogged.append(step_metrics)
    self.write_interval()
    self.save_deferred()
    if ends_interval:
      self.interval, self.unlogged = (step, self.unlogged), []

  def _read(self, end: int, interval_metrics: list) -> dict:
    """An interval's mean step metrics; stops the run if any loss was non-finite."""
    host = jax.device_get(interval_metrics)
    means = np.mean([m.vector for m in host], axis=0)
    summary = {k: float(v) for k, v in zip(host[0].names, means)}
    if summary['finite'] < 1.0:
      raise FloatingPointError(
          f'non-finite loss between steps {end - len(interval_metrics) + 1} and {end}: '
          f'stopping. The updates of those steps were skipped; the last good checkpoint is '
          f'step {self.checkpoints.latest_step()} in {self.checkpoints.directory}. Lower the '
          'learning rate or enable optim.grad_clip_norm.')
    return summary

  def write_interval(self) -> None:
    """Reads, logs and writes the finished interval, if one is waiting."""
    if self.interval is None:
      return
    (end, interval_metrics), self.interval = self.interval, None
    summary = self._read(end, interval_metrics)
    self.progress.update(end, summary)
    summary.update(epoch=end / self.steps_per_epoch,
                   images_per_second=self.progress.images_per_second,
                   input_wait_fraction=self.progress.input_wait_fraction)
    self.throughput.append(self.progress.images_per_second)
    self.input_wait.append(self.progress.input_wait_fraction)
    self.writer.write(end, 'train', summary)

  def _save(self, step: int, state, input_state, unlogged: list, score=None) -> None:
    self.write_interval()
    if unlogged:
      self._read(step, unlogged)
    self.checkpoints.save(step, state, input_state, score=score)

  def save(self, step: int, state, input_state, score=None) -> None:
    """Saves now (evaluations, the end, SIGTERM, halt_after_steps)."""
    self._save(step, state, input_state, self.unlogged, score)

  def save_later(self, step: int, state_copy, input_state) -> None:
    """Hands `state_copy` (an on-device copy) to Orbax after the next step is dispatched."""
    self.deferred = (step, state_copy, input_state, list(self.unlogged))

  def save_deferred(self) -> None:
    if self.deferred is not None:
      args, self.deferred = self.deferred, None
      self._save(*args)

  def finish(self) -> None:
    self.write_interval()
    self.save_deferred()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains with periodic evaluation and checkpoints; resumes from WORKDIR if it has any.
  The workdir is locked for the run (`affectjax.workdir`): a second run on it stops at once."""
  workdir = os.path.abspath(workdir)
  config_lib.check_config(config)  # before anything is loaded or written (main checks too)
  lock = workdir_lib.WorkdirLock(workdir, enabled=parallel.is_main_process())
  refused = None
  try:
    lock.acquire()
  except workdir_lib.WorkdirLocked as e:
    refused = e
  if not parallel.main_process_says(refused is None):  # every process stops, not only the 0th
    raise refused or workdir_lib.WorkdirLocked(f'{workdir} is in use by another training run '
                                               '(see the message of process 0)')
  try:
    return _train_and_evaluate(config, workdir)
  finally:
    lock.release()


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  t_start = time.time()
  kind = kinds.get_kind(config)
  train_data = kind.load_split(config, 'train')
  eval_data = kind.load_split(config, config.eval_split)
  config = runs.resolve_config(config, train_index=kind.frame_index(train_data))
  train_iter = kind.train_iterator(config, train_data)
  kind.prepare_eval(config, eval_data)
  run = runs.build_run(config, train_data, train_iter.steps_per_epoch)
  checkpoints = ckpt_lib.Checkpoints(os.path.join(workdir, 'checkpoints'),
                                     keep_latest=config.keep_checkpoints,
                                     keep_best=config.keep_best_checkpoints)
  state = run.state
  best = {'score': -np.inf, 'step': None}
  try:  # restored first: a refused resume leaves config.json and metrics.jsonl as they were
    if checkpoints.latest_step() is not None:
      state, input_state = checkpoints.restore(parallel.replicate(state, run.mesh))
      train_iter.set_state(input_state)
      print(f'Resumed from {checkpoints.directory} at step {int(state.step)}', flush=True)
      if (best_step := checkpoints.best_step()) is not None:  # (scores stored by Orbax)
        best = {'score': checkpoints.score(best_step), 'step': best_step}
    else:
      warning = init_warning(config)
      if warning and parallel.is_main_process():
        print(warning, flush=True)
      if config.init_from:
        state, _ = ckpt_lib.init_from(state, config.init_from)
      state = parallel.replicate(state, run.mesh)
  except BaseException:
    checkpoints.close()
    raise
  writer = logs.RunWriter(workdir, enabled=parallel.is_main_process(),
                          resume_step=checkpoints.latest_step())
  if parallel.is_main_process():
    _save_config(config, workdir)

  step_fn, eval_fn = run.train_step(), run.eval_step()
  snapshot_fn = jax.jit(lambda tree: jax.tree_util.tree_map(jnp.copy, tree))
  step = int(state.step)
  eval_every = max(int(round(config.eval_every_epochs * run.steps_per_epoch)), 1)
  progress = logs.Progress(run.total_steps, step, config.global_batch_size,
                           enabled=config.progress_bar and parallel.is_main_process())
  ledger = StepLedger(checkpoints, writer, progress, run.steps_per_epoch)
  last_metrics, stop_reason = {}, 'finished'
  trained_input = train_iter.get_state()  # the input state after the latest trained batch
  prefetched = parallel.prefetch_to_mesh(  # a generator: nothing is read before the loop
      train_iter, run.mesh, size=config.prefetch_to_device, state_fn=train_iter.get_state,
      threaded=config.prefetch_thread)
  # On the way out, also on errors (NaN stop): the last good checkpoint finishes writing first
  # (stopping the reading thread may wait on a read in progress), then each is closed even if
  # one before failed (an ExitStack runs its callbacks last first; the loop's own error stays
  # the context of any they raise).
  with contextlib.ExitStack() as closing:
    for close in (writer.close, progress.close, checkpoints.close, prefetched.close,
                  checkpoints.wait):
      closing.callback(close)
    with _Preemption() as preemption:
      for batch, input_state in progress.timed(prefetched):
        if step >= run.total_steps:
          break
        state, step_metrics = step_fn(state, batch)
        step, trained_input = step + 1, input_state
        last = step >= run.total_steps
        ledger.add_step(step, step_metrics, step % config.log_every_steps == 0 or last)
        score = None
        if step % eval_every == 0 or last:
          ledger.write_interval()
          jax.block_until_ready(state)  # the queued training steps count as training time
          eval_start = time.perf_counter()
          eval_metrics, _ = evaluation.evaluate(run, eval_fn, state, eval_data)
          progress.exclude(time.perf_counter() - eval_start)  # img/s counts training only
          score = metrics_lib.score(eval_metrics, run.tasks, config.edition)
          eval_metrics['score'] = score
          state = state.replace(opt_state=optim.observe_plateau(config.optim, state.opt_state,
                                                                score))
          read, bad = evaluation.reading_counts(trained_input)
          eval_metrics.update(train_frames_read=read, train_bad_frames=bad)
          writer.write(step, config.eval_split, eval_metrics)
          progress.write(f'[step {step}, epoch {step / run.steps_per_epoch:.2f}] '
                         f'{config.eval_split}: score {score:.4f}  ' +
                         logs.format_metrics(eval_metrics, evaluation.HEADLINE_KEYS) +
                         evaluation.format_frame_counts(eval_metrics, prefix='\n  '))
          last_metrics = eval_metrics
          if score > best['score']:
            best = {'score': score, 'step': step}
        halt = bool(config.halt_after_steps) and step >= config.halt_after_steps
        preempted = preemption.agreed(step % config.log_every_steps == 0 or last)
        if last or preempted or halt or score is not None:
          ledger.save(step, state, evaluation.with_counts_of_every_process(input_state),
                      score=score)
        elif is_periodic_save(config, step, run.steps_per_epoch):
          ledger.save_later(step, snapshot_fn(state),
                            evaluation.with_counts_of_every_process(input_state))
        if preempted:
          stop_reason = 'preempted (SIGTERM): checkpoint saved'
          break
        if halt:
          stop_reason = f'halted after step {step} (config.halt_after_steps)'
          break
      ledger.finish()
  read, bad = evaluation.reading_counts(trained_input)
  summary = {'stop_reason': stop_reason, 'steps': step, 'train_frames_read': read,
             'train_bad_frames': bad, 'seconds': time.time() - t_start,
             'best_score': best['score'], 'best_step': best['step'],
             'final_metrics': last_metrics, 'workdir': workdir,
             'images_per_second': (float(np.median(ledger.throughput)) if ledger.throughput
                                   else None),
             'input_wait_fraction': (float(np.median(ledger.input_wait)) if ledger.input_wait
                                     else None),
             'state': state}
  if parallel.is_main_process():
    print(format_summary(summary, run), flush=True)
  return summary


def init_warning(config: ml_collections.ConfigDict) -> str | None:
  """The warning for a run that starts from scratch where its paper starts from pretrained
  weights (config.paper_init); None otherwise."""
  if not config.paper_init or config.init_from:
    return None
  rule = '!' * 78
  trainable = config.model.get('trainable', 'all')
  frozen = ('' if trainable == 'all' else f'\nIts frozen stages (model.trainable={trainable}: '
            'only that part and what follows train)\nkeep their random initial weights.')
  return (f'{rule}\nWARNING: the paper behind this config starts from {config.paper_init} weights; '
          'this run\ntrains from scratch (config.init_from is unset), so its scores are not the '
          f"paper's.{frozen}\nConvert the weights with python -m affectjax.convert and pass "
          f'--config.init_from=DIR\n(README: VGGFace2 or ImageNet weights).\n{rule}')


def format_summary(summary: dict, run: runs.Run) -> str:
  lines = [f"Run {summary['stop_reason']} at step {summary['steps']}/{run.total_steps} in "
           f"{summary['seconds']:.0f} s; workdir {summary['workdir']}"]
  if summary['images_per_second']:
    lines.append(f"  training throughput (median of logging intervals): "
                 f"{summary['images_per_second']:.0f} images/s, waiting for input "
                 f"{summary['input_wait_fraction']:.1%} of the time")
  if summary['best_step'] is not None:
    lines.append(f"  best validation score {summary['best_score']:.4f} at step "
                 f"{summary['best_step']}")
  final = summary['final_metrics']
  if final:
    lines.append('  final validation: ' + logs.format_metrics(final, evaluation.HEADLINE_KEYS))
  counts = evaluation.format_frame_counts(
      {k: v for k, v in final.items() if k in ('skipped_frames', 'eval_frames')} |
      {k: summary[k] for k in ('train_frames_read', 'train_bad_frames')}, prefix='\n  ')
  return '\n'.join(lines) + counts
