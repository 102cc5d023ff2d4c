"""Orbax checkpoints: exact resume (state + input-pipeline position), best-K, weights-only init.

A save that cannot be written (a full disk, a quota, a lost mount) stops the run with one
`CheckpointSaveError` naming the step, the folder, the cause and the latest complete checkpoint,
which stays intact (Orbax writes each step under a temporary name and renames it when complete;
the failed step's temporary folder is removed). Before each save the free space is checked
against the size of the state, so a disk that is already too full fails before writing.
"""
import glob
import logging as py_logging
import os
import re
import shutil
import sys
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import traverse_util
from orbax.checkpoint import checkpoint_managers as policies

from affectjax import logs, weights
from affectjax.models import resnet

STATE_FIELDS = ('step', 'params', 'batch_stats', 'opt_state', 'rng')
SCORE_KEY = 'score'
_TMP_SUFFIX = '.orbax-checkpoint-tmp'  # Orbax's name for a step still being written


def state_tree(state) -> dict:
  """The saved part of a TrainState: everything but the static apply_fn and tx (and `carry`
  only for models that carry their state, so other checkpoints keep their layout)."""
  carry = ('carry',) if getattr(state, 'carry', None) is not None else ()
  return {k: getattr(state, k) for k in STATE_FIELDS + carry}


def _score(metrics: dict) -> float:
  return float(metrics.get(SCORE_KEY, -np.inf))


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written; the message says what is still there."""


# Causes a save can meet in the storage, and what the user does about each.
_STORAGE_CAUSES = {
    'No space left on device': 'free some space',
    'Disk quota exceeded': 'free some space (or raise the quota)',
    'Read-only file system': 'make the checkpoints folder writable',
    'Permission denied': 'make the checkpoints folder writable',
}


def _root_cause(error: BaseException) -> str:
  """The innermost cause of an (Orbax, tensorstore, asyncio) error, in one line."""
  while error.__cause__ is not None or (error.__context__ is not None and
                                        not error.__suppress_context__):
    error = error.__cause__ or error.__context__
  text = str(error).splitlines()[0] if str(error) else type(error).__name__
  found = re.search('|'.join(_STORAGE_CAUSES), text)
  return found.group(0) if found else text[:300]


def state_bytes(tree) -> int:
  """Bytes of a state's arrays (their global sizes), about what a checkpoint of it takes."""
  return int(sum(getattr(x, 'nbytes', None) or np.asarray(x).nbytes for x in jax.tree.leaves(tree)))


def _mute_closed_loop_errors() -> None:
  """After a failed save, tensorstore still completes the save's other writes and reports each
  to Orbax's event loop, which the failure closed: every one would print a traceback of
  "RuntimeError: Event loop is closed" (through sys.excepthook), hundreds for a full disk.
  Those, only, are dropped."""
  previous = sys.excepthook
  if getattr(previous, 'affectjax_mutes_closed_loop', False):
    return

  def hook(kind, value, traceback):
    if not (kind is RuntimeError and str(value) == 'Event loop is closed'):
      previous(kind, value, traceback)

  hook.affectjax_mutes_closed_loop = True
  sys.excepthook = hook


def _settle(directory: str, timeout: float = 10.0) -> None:
  """Waits until nothing under `directory` changes for half a second: the writer threads of a
  failed save finish failing (each remaining write hits the same full disk) before its
  temporary folder is removed and the failure reported."""
  def sizes():
    found = []
    for p in glob.glob(os.path.join(directory, '*' + _TMP_SUFFIX + '*', '**'), recursive=True):
      try:  # files come and go while the writers finish
        found.append((p, os.stat(p).st_size))
      except OSError:
        pass
    return sorted(found)
  deadline, last = time.monotonic() + timeout, None
  while time.monotonic() < deadline:
    now = sizes()
    if now == last:
      return
    last = now
    time.sleep(0.5)


class _QuietOrbaxErrors(py_logging.Filter):
  """Drops Orbax's error-level log records (its background threads log each failure with
  tracebacks, hundreds of lines for a full disk): the failure reaches the run as a
  CheckpointSaveError with the cause, and --verbosity shows everything again."""

  def filter(self, record) -> bool:
    return not (record.levelno >= py_logging.ERROR and
                f'{os.sep}orbax{os.sep}' in (record.pathname or ''))


def quiet_orbax_errors() -> None:
  """Installs `_QuietOrbaxErrors` on the absl logger and `_mute_closed_loop_errors` (the
  command line does, unless verbose)."""
  _mute_closed_loop_errors()
  logger = py_logging.getLogger('absl')
  if not any(isinstance(f, _QuietOrbaxErrors) for f in logger.filters):
    logger.addFilter(_QuietOrbaxErrors())


class Checkpoints:
  """`WORKDIR/checkpoints`: asynchronous saves; keeps the latest N and the best K by score."""

  def __init__(self, directory: str, *, keep_latest: int = 2, keep_best: int = 1,
               async_save: bool = True, read_only: bool = False):
    self.directory = os.path.abspath(directory)
    if read_only and not _steps(self.directory):
      raise CheckpointError(f'{self.directory}: no checkpoint there (checkpoints are numbered '
                            'step folders, written by a training run in WORKDIR/checkpoints)')
    keep = [policies.LatestN(n=keep_latest)]
    if keep_best:
      keep.append(policies.BestN(get_metric_fn=_score, reverse=False, n=keep_best,
                                 keep_checkpoints_without_metrics=False))
    # best_fn makes Orbax write each save's metrics next to it, so the best-K policy and
    # best_step() still see the scores of earlier runs' checkpoints after a resume.
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policies.AnyPreservationPolicy(keep), best_fn=_score,
        best_mode='max', enable_async_checkpointing=async_save, create=not read_only,
        cleanup_tmp_directories=not read_only)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
        'state': ocp.StandardCheckpointHandler(), 'input': ocp.JsonCheckpointHandler()})
    self.failure = None  # the CheckpointSaveError of a failed save
    self._pending = None  # the step of the latest save started

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def score(self, step: int) -> float:
    """The score saved with `step` (-inf without one)."""
    return _score(self.manager.metrics(step) or {})

  def best_step(self) -> int | None:
    """The kept step with the highest score (the later one on a tie); None if no kept step
    has a score (Orbax's own `best_step` would also return unscored periodic saves)."""
    scored = []
    for step in self.manager.all_steps():
      metrics = self.manager.metrics(step)
      if metrics and SCORE_KEY in metrics:
        scored.append((float(metrics[SCORE_KEY]), step))
    return max(scored)[1] if scored else None

  def save(self, step: int, state, input_state: dict | None, score: float | None = None,
           force: bool = False) -> bool:
    """Starts an asynchronous save; `score` (higher is better) ranks it for best-K.
    CheckpointSaveError if this save, or the previous one still being written, fails."""
    if step in self.manager.all_steps():
      return False
    tree = state_tree(state)
    self._check_space(step, state_bytes(tree))
    args = {'state': ocp.args.StandardSave(tree)}
    args['input'] = ocp.args.JsonSave(input_state if input_state is not None else {})
    # Saves without an evaluation carry empty metrics (ranked last), not None (Orbax warns).
    metrics = {SCORE_KEY: float(score)} if score is not None else {}
    self._pending = step
    try:
      return self.manager.save(step, args=ocp.args.Composite(**args), metrics=metrics,
                               force=force)
    except Exception as e:  # pylint: disable=broad-except
      raise self._failed(e) or e

  def _check_space(self, step: int, size: int) -> None:
    """CheckpointSaveError on every process when one process's disk lacks the space (after
    the previous save has finished: Orbax waits for it too)."""
    self.wait()
    need = int(size * 1.05) + (256 << 10)  # metadata and the input state
    free = shutil.disk_usage(self.directory).free
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      # As float32 (JAX without x64 would make an int64 an int32, which overflows at 2 GB);
      # its 24-bit mantissa is exact enough for a size.
      free = int(np.min(multihost_utils.process_allgather(np.float32(free))))
    if need > free:
      self.failure = CheckpointSaveError(
          f'cannot save checkpoint step {step} in {self.directory}: it needs about '
          f'{logs.format_bytes(need)}, the disk has {logs.format_bytes(free)} free. '
          f'{self._what_is_kept()}')
      raise self.failure

  def _what_is_kept(self, fix: str = 'free some space') -> str:
    try:
      steps = [s for s in self.manager.all_steps() if os.path.isdir(
          os.path.join(self.directory, str(s)))]
    except Exception:  # pylint: disable=broad-except
      steps = []
    if not steps:
      return 'No checkpoint of this run is complete yet.'
    return (f'The latest complete checkpoint, step {max(steps)}, is intact: {fix} and run the '
            'same command again to resume from it.')

  def _failed(self, error: BaseException) -> CheckpointSaveError | None:
    """The error of a save that the storage refused (full, read-only, no permission), after
    removing its temporary folders; None for other errors (raised as they are)."""
    cause = _root_cause(error)
    if self.failure is None and cause in _STORAGE_CAUSES:
      _settle(self.directory)
      steps = []
      for tmp in glob.glob(os.path.join(self.directory, '*' + _TMP_SUFFIX + '*')):
        steps.append(os.path.basename(tmp).split('.')[0])
        shutil.rmtree(tmp, ignore_errors=True)
      steps = sorted(set(steps)) or ([str(self._pending)] if self._pending is not None else [])
      self.failure = CheckpointSaveError(
          f'could not save checkpoint step {", ".join(steps) or "?"} in {self.directory}: '
          f'{cause}. {self._what_is_kept(_STORAGE_CAUSES[cause])}')
    return self.failure

  def restore(self, state, step: int | None = None) -> tuple[Any, dict]:
    """Restores `step` (default latest) into the structure and shardings of `state`, its
    kernels in `state`'s layout whatever layout they were saved in (`resnet.relayout`)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {self.directory}')
    saved = self.manager.item_metadata(step)['state']  # (a tree, or a TreeMetadata of one)
    saved = resnet.kernel_layout_of(getattr(saved, 'tree', saved)['params'])
    layout, tree = resnet.kernel_layout_of(state.params), state_tree(state)
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)
    restored = self.manager.restore(step, args=ocp.args.Composite(input=ocp.args.JsonRestore(),
        state=ocp.args.StandardRestore(resnet.relayout(abstract, saved, layout))))
    state = state.replace(**resnet.relayout(restored['state'], layout, saved))
    return state, dict(restored['input'] or {})

  def restore_model(self, state, step: int):
    """`state` with the model of checkpoint `step` (its step, params and BatchNorm statistics,
    in `state`'s shardings and kernel layout), whatever optimiser the run trained with: for
    inference, whose config may set the optimiser otherwise."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))['state']
    restored['params'] = resnet.relayout(restored['params'], resnet.kernel_layout_of(state.params))
    try:
      model = {k: jax.tree_util.tree_map(
          lambda old, new: jax.device_put(np.asarray(new, old.dtype), old.sharding),
          getattr(state, k), restored[k]) for k in ('step', 'params', 'batch_stats')}
    except (ValueError, TypeError, KeyError) as e:
      raise CheckpointError(
          f"{self.directory}/{step}: its network differs from the config's (train and evaluate "
          f'with the same model settings): {e}'[:600]) from None
    return state.replace(**model)

  def wait(self):
    """Waits for the pending save; CheckpointSaveError if it failed."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._failed(e) or e

  def close(self):
    try:
      self.manager.close()
    except Exception as e:  # pylint: disable=broad-except
      if self.failure is None:  # a failure already reported is not reported twice
        raise self._failed(e) or e


class CheckpointError(ValueError):
  """`init_from` names nothing that holds weights; one line: what was found, what is expected."""


_EXPECTED_INIT = ("expected converted weights (python -m affectjax.convert --out) or a run's "
                  'workdir / checkpoints folder / step folder')
_WEIGHTS_FILES = ('.pth', '.pt', '.pkl', '.pickle')


def _listing(folder: str, most: int = 8) -> str:
  names = sorted(e.name + ('/' if e.is_dir() else '') for e in os.scandir(folder))
  return ', '.join(names[:most]) + (f', ... ({len(names)} entries)' if len(names) > most else '')


def _steps(folder: str) -> list:
  """The finished Orbax steps of a checkpoints folder (numbered folders; unfinished saves carry
  a suffix)."""
  try:
    return sorted(int(e.name) for e in os.scandir(folder) if e.name.isdigit() and e.is_dir())
  except (FileNotFoundError, NotADirectoryError):
    return []


def locate_variables(path: str) -> tuple[str, str]:
  """What `init_from=path` names: ('converted', folder), ('steps', checkpoints folder) or
  ('step', step folder). Reads folder listings only and creates nothing; `CheckpointError`
  when `path` is none of them."""
  where = f'init_from={path}'
  if not os.path.exists(path):
    raise CheckpointError(f'{where}: no such file or directory; {_EXPECTED_INIT}')
  if not os.path.isdir(path):
    hint = (' (convert a weights file first: python -m affectjax.convert --source FILE --out '
            'DIR)' if path.lower().endswith(_WEIGHTS_FILES) else '')
    raise CheckpointError(f'{where}: a file, not a folder{hint}; {_EXPECTED_INIT}')
  path = os.path.abspath(path)
  if os.path.exists(os.path.join(path, weights.META_FILE)):
    if not os.path.isdir(os.path.join(path, weights.VARIABLES_DIR)):
      raise CheckpointError(f'{where}: converted weights without their {weights.VARIABLES_DIR}/ '
                            'folder (an interrupted conversion?); convert them again')
    return 'converted', path
  if os.path.isdir(os.path.join(path, 'state')):
    return 'step', path
  folder = os.path.join(path, 'checkpoints')
  folder = folder if os.path.isdir(folder) else path
  if _steps(folder):
    return 'steps', folder
  found = _listing(folder)
  no_step = f'holds no checkpoint step (found: {found or "nothing"}; steps are numbered folders)'
  if folder != path:
    problem = f'a workdir whose checkpoints/ folder {no_step}'
  elif os.path.basename(path) == 'checkpoints':
    problem = f'a checkpoints folder that {no_step}'
  elif not found:
    problem = 'an empty folder'
  else:
    problem = (f'a folder of neither converted weights ({weights.META_FILE}) nor checkpoints '
               f'(found: {found})')
  raise CheckpointError(f'{where}: {problem}; {_EXPECTED_INIT}')


def read_variables(path: str) -> dict:
  """Loads {'params', 'batch_stats'} from converted weights or a run (workdir, checkpoints
  folder or step folder, the best step first); `CheckpointError` for anything else."""
  kind, folder = locate_variables(path)
  if kind == 'converted':
    variables, _ = weights.load_converted(folder)
    return variables
  if kind == 'step':
    restored = ocp.StandardCheckpointer().restore(os.path.join(folder, 'state'))
  else:  # (the scores are read as Checkpoints reads them: a plain manager has no best_fn)
    checkpoints = Checkpoints(folder, read_only=True, async_save=False)
    step = checkpoints.best_step()
    step = checkpoints.latest_step() if step is None else step
    restored = checkpoints.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))['state']
    checkpoints.close()
  return {'params': restored['params'], 'batch_stats': restored.get('batch_stats', {})}


def merge_variables(target: dict, loaded: dict) -> tuple[dict, dict]:
  """Copies the leaves of `loaded` into `target` where path and shape agree.

  Returns the merged tree and a report: `loaded` (paths copied), `missing` (in the model,
  not in the file: keep their initialisation), `unexpected` (in the file only) and
  `mismatched` (same path, other shape: kept from the initialisation).
  """
  flat_target = traverse_util.flatten_dict(target, sep='/')
  flat_loaded = traverse_util.flatten_dict(loaded, sep='/')
  merged, report = dict(flat_target), {'loaded': [], 'missing': [], 'unexpected': [],
                                       'mismatched': []}
  for key, value in flat_loaded.items():
    if key not in flat_target:
      report['unexpected'].append(key)
    elif np.shape(value) != np.shape(flat_target[key]):
      report['mismatched'].append(f'{key}: {np.shape(value)} vs {np.shape(flat_target[key])}')
    else:
      merged[key] = np.asarray(value, dtype=flat_target[key].dtype)
      report['loaded'].append(key)
  report['missing'] = sorted(set(flat_target) - set(flat_loaded))
  return traverse_util.unflatten_dict(merged, sep='/'), report


def init_from(state, path: str):
  """Weights-only initialisation (params and batch_stats) from `path`; logs what matched."""
  loaded = resnet.relayout(read_variables(path), resnet.kernel_layout_of(state.params))
  params, report = merge_variables(jax.device_get(state.params), loaded['params'])
  stats, stats_report = merge_variables(jax.device_get(state.batch_stats),
                                        loaded.get('batch_stats', {}))
  for k in report:
    report[k] += [f'batch_stats/{p}' for p in stats_report[k]]
  print(f"init_from {path}: {len(report['loaded'])} arrays loaded, {len(report['missing'])} "
        f"missing (kept from initialisation), {len(report['unexpected'])} unexpected, "
        f"{len(report['mismatched'])} with another shape", flush=True)
  for kind in ('missing', 'unexpected', 'mismatched'):
    if report[kind]:
      logging.warning('init_from %s keys: %s', kind, ', '.join(report[kind][:20]) +
                      (' ...' if len(report[kind]) > 20 else ''))
  if not report['loaded']:
    raise ValueError(f'init_from={path}: no parameter matched the model')
  return state.replace(params=params, batch_stats=stats), report
