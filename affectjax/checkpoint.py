"""Orbax checkpoints: exact resume (state + input-pipeline position), best-K, weights-only init."""
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import traverse_util
from orbax.checkpoint import checkpoint_managers as policies

from affectjax import weights

STATE_FIELDS = ('step', 'params', 'batch_stats', 'opt_state', 'rng')
SCORE_KEY = 'score'


def state_tree(state) -> dict:
  """The saved part of a TrainState: everything but the static apply_fn and tx."""
  return {k: getattr(state, k) for k in STATE_FIELDS}


def _score(metrics: dict) -> float:
  return float(metrics.get(SCORE_KEY, -np.inf))


class Checkpoints:
  """`WORKDIR/checkpoints`: asynchronous saves; keeps the latest N and the best K by score."""

  def __init__(self, directory: str, *, keep_latest: int = 2, keep_best: int = 1,
               async_save: bool = True):
    self.directory = os.path.abspath(directory)
    keep = [policies.LatestN(n=keep_latest)]
    if keep_best:
      keep.append(policies.BestN(get_metric_fn=_score, reverse=False, n=keep_best,
                                 keep_checkpoints_without_metrics=False))
    # best_fn makes Orbax write each save's metrics next to it, so the best-K policy and
    # best_step() still see the scores of earlier runs' checkpoints after a resume.
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policies.AnyPreservationPolicy(keep), best_fn=_score,
        best_mode='max', enable_async_checkpointing=async_save, create=True,
        cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=('state', 'input'))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

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
    """Starts an asynchronous save; `score` (higher is better) ranks it for best-K."""
    if step in self.manager.all_steps():
      return False
    args = {'state': ocp.args.StandardSave(state_tree(state))}
    args['input'] = ocp.args.JsonSave(input_state if input_state is not None else {})
    # Saves without an evaluation carry empty metrics (ranked last), not None (Orbax warns).
    metrics = {SCORE_KEY: float(score)} if score is not None else {}
    return self.manager.save(step, args=ocp.args.Composite(**args), metrics=metrics,
                             force=force)

  def restore(self, state, step: int | None = None) -> tuple[Any, dict]:
    """Restores `step` (default latest) into the structure and shardings of `state`."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {self.directory}')
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state_tree(state))
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), input=ocp.args.JsonRestore()))
    return state.replace(**restored['state']), dict(restored['input'] or {})

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


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
  return sorted(int(e.name) for e in os.scandir(folder) if e.name.isdigit() and e.is_dir())


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
  else:
    options = ocp.CheckpointManagerOptions(create=False, read_only=True)
    manager = ocp.CheckpointManager(folder, options=options, item_names=('state', 'input'))
    step = manager.best_step() or manager.latest_step()
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    restored = restored['state']
    manager.close()
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
  loaded = read_variables(path)
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
