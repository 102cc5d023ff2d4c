"""mode=ensemble: the average of several finished runs' per-frame predictions.

`--config.ensemble.members=runs/a,runs/b@latest,runs/c@1200` names the members: run folders
(each restored with the config it trained with, its WORKDIR/config.json) and, after `@`, the
checkpoint (`best`, `latest` or a step; default `config.eval_checkpoint`), so one run's
checkpoints can be members too. Members may differ in everything (image or temporal kind,
encoder, framework, seed). Per frame and task, the ensemble averages the members that predict
the task: EXPR class probabilities, AU probabilities and valence-arousal values (the average
fusion of the ABAW 2020 statistical system and the two-run average of the ABAW4 winners).

The ensemble is then evaluated as one model on `config.eval_split`: the same metrics, the same
post-processing tuning (per-AU thresholds, VA window) and the same files as mode=eval
(`eval_<split>_ensemble.json`, `predictions_<split>_ensemble.csv`, under WORKDIR). Frames are
matched by (video, frame); the ensemble scores the frames every member predicted, and says how
many each member had beyond those. With a test list (`config.predict.videos` or `.images`) it
also writes the submission files of mode=predict, with config.predict's thresholds and window.
`ensemble.json` records the members, their checkpoints and the frames shared.
"""
import json
import os

import ml_collections
import numpy as np

from affectjax import evaluation, files, inference, kinds, labels, metrics as metrics_lib
from affectjax import parallel, predictions

# Copied from the ensemble's config into each member's: what to evaluate and predict.
SHARED_FIELDS = ('eval_split', 'eval_checkpoint', 'eval_batch_size', 'predict')
_TINY = 1e-12


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


# What is averaged (EXPR and AU probabilities) and back to the models' output form (log
# probabilities: their softmax is the average; logits: their sigmoid is the average).
TO_PROBABILITY = {'expr': _softmax, 'au': metrics_lib.sigmoid}
FROM_PROBABILITY = {
    'expr': lambda p: np.log(np.maximum(p, _TINY)),
    'au': lambda p: np.log(np.clip(p, _TINY, 1)) - np.log(np.clip(1 - p, _TINY, 1))}


def parse_members(spec: str) -> list:
  """[(folder, checkpoint or '')] of `ensemble.members` ('DIR[@CHECKPOINT],...')."""
  members = []
  for item in (s.strip() for s in spec.split(',')):
    if item:
      folder, _, which = item.partition('@')
      members.append((folder, which))
  return members


def member_config(config: ml_collections.ConfigDict, folder: str, which: str):
  """A member's own training config with the ensemble's evaluation fields."""
  with open(os.path.join(folder, 'config.json')) as f:
    member = ml_collections.ConfigDict(json.load(f))
  for field in SHARED_FIELDS:
    member[field] = config[field].copy_and_resolve_references() if isinstance(
        config[field], ml_collections.ConfigDict) else config[field]
  member.eval_checkpoint = which or member.eval_checkpoint
  member.mode = 'eval'
  return member


class MemberPass:
  """One member's per-row probabilities and labels over its frame index (`on_batch` of
  `evaluation.infer`)."""

  def __init__(self, index, tasks: tuple):
    self.index, self.tasks = index, tasks
    self.got = np.zeros(len(index), bool)
    self.probs, self.labels = {}, labels.missing_labels(len(index), 'batch')

  def on_batch(self, outputs, batch) -> None:
    keep = np.asarray(batch['valid'], bool)
    rows = np.asarray(batch['index'])[keep]
    for task in self.tasks:
      value = np.asarray(outputs[task], np.float64)[keep]
      value = TO_PROBABILITY.get(task, lambda v: v)(value)
      if task not in self.probs:
        self.probs[task] = np.zeros((len(self.index), value.shape[-1]))
      self.probs[task][rows] = value
      self.labels[task][rows] = np.asarray(batch[task])[keep]
    self.got[rows] = True

  def keys(self) -> np.ndarray:
    """'video/frame' of each index row."""
    names = np.asarray(self.index.video_names, object)[self.index.video_id]
    return np.char.add(np.char.add(names.astype(str), '/'), self.index.frame.astype(str))


def run_member(config, folder: str, test: bool) -> tuple:
  """(MemberPass, checkpoint step, num_expr_classes) of one member over the evaluation split,
  or over the test list when `test`."""
  kind = kinds.get_kind(config)
  data = kind.load_test(config) if test else kind.load_split(config, config.eval_split)
  run, state = inference.restore(config, folder, data)
  member = MemberPass(kind.frame_index(data), run.tasks)
  iterator = (kind.test_iterator if test else kind.eval_iterator)(run.config, data)
  evaluation.infer(run, run.eval_step(), state, iterator, member.on_batch)
  return member, int(state.step), run.config.num_expr_classes


def combine(passes: list) -> tuple:
  """(tasks, rows [(outputs, batch)] over the first member's index, frames each member had
  beyond the shared ones). Outputs are in the models' form (EXPR log-probabilities, AU logits,
  VA values), so that metrics, tuning and decisions treat the ensemble as one model."""
  tasks = tuple(t for t in labels.TASKS if any(t in p.tasks for p in passes))
  keys = [p.keys() for p in passes]
  shared = set(keys[0][passes[0].got])
  for p, k in zip(passes[1:], keys[1:]):
    shared &= set(k[p.got])
  ref = passes[0]
  rows = np.flatnonzero(ref.got & np.isin(keys[0], list(shared)))
  extra = [int(p.got.sum()) - len(rows) for p in passes]
  outputs, batch = {}, {'valid': np.ones(len(rows), bool), 'index': rows.astype(np.int32)}
  batch.update({k: v[rows] for k, v in labels.missing_labels(len(ref.index), 'batch').items()})
  # Each member's rows of the shared frames, in the first member's order (looked up once).
  at = [np.asarray([where[key] for key in keys[0][rows]], np.int64) for where in (
      dict(zip(k[p.got], np.flatnonzero(p.got))) for p, k in zip(passes, keys))]
  for task in tasks:
    having = [(p, r) for p, r in zip(passes, at) if task in p.tasks]
    mean = np.mean([p.probs[task][r] for p, r in having], axis=0)
    first, r = having[0]
    batch[task] = first.labels[task][r]
    outputs[task] = FROM_PROBABILITY.get(task, lambda m: m)(mean)
  return tasks, [(outputs, batch)], extra


def expr_classes(configs: list) -> int:
  """The EXPR class count of the members that predict EXPR (they must agree); the first
  member's config value where none does."""
  counts = {c.num_expr_classes for c in configs if 'expr' in c.tasks.split(',')}
  if len(counts) > 1:
    raise ValueError(f'config.ensemble.members: the members predict different EXPR classes '
                     f'({sorted(counts)}); an average needs the same classes')
  return next(iter(counts)) if counts else configs[0].num_expr_classes


def run_ensemble(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """mode=ensemble (see the module docstring)."""
  workdir = os.path.abspath(workdir)
  members = parse_members(config.ensemble.members)
  configs = [member_config(config, folder, which) for folder, which in members]
  classes = expr_classes(configs)
  summary = {'members': []}
  out = {}
  for test in (False, True) if (config.predict.videos or config.predict.images) else (False,):
    passes = []
    for (folder, which), member in zip(members, configs):
      if parallel.is_main_process():
        print(f'[ensemble] {folder}@{which or member.eval_checkpoint}: '
              f'{"test list" if test else member.eval_split} ...', flush=True)
      passes.append(run_member(member, folder, test))
    tasks, rows, extra = combine([p for p, _, _ in passes])
    index = passes[0][0].index
    if not test:
      summary['members'] = [{'run': f'{folder}@{which}' if which else folder,
                             'checkpoint_step': step, 'tasks': list(p.tasks),
                             'frames_beyond_shared': e}
                            for (folder, which), (p, step, _), e in zip(members, passes, extra)]
      summary['shared_frames'] = len(rows[0][1]['index'])
      accumulator = metrics_lib.MetricsAccumulator(tasks, classes, keep_predictions=True)
      accumulator.update(*rows[0])
      out['eval'] = evaluation.metrics_of(accumulator, tasks, index, tune=True)
      os.makedirs(workdir, exist_ok=True)
      inference.report_evaluation(config, workdir, out['eval'], rows, index, tasks, 'ensemble',
                                  f'the ensemble of {len(members)} members')
    else:
      list_path = kinds.test_list(config)
      fmt = predictions.submission_format(config.predict.format,
                                          image_list=bool(config.predict.images))
      target = config.predict.out or os.path.join(
          workdir, f'predictions_{kinds.list_name(list_path)}_ensemble')
      out['files'], _ = inference.write_test_predictions(
          config, fmt, target, rows, index, tasks, classes,
          f'{list_path}) with the ensemble of {len(members)} members')
  summary.update(out)
  if parallel.is_main_process():
    with files.atomic_write(os.path.join(workdir, 'ensemble.json')) as f:
      json.dump(summary, f, indent=2)
    beyond = ', '.join(f"{m['run']} {m['frames_beyond_shared']}" for m in summary['members'])
    print(f"[ensemble] {len(members)} members, {summary['shared_frames']} shared frames "
          f'scored (frames a member had beyond them: {beyond}); wrote '
          f'{os.path.join(workdir, "ensemble.json")}', flush=True)
  return summary
