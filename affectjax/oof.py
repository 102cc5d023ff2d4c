"""mode=oof: out-of-fold per-frame features for the temporal models.

`mode=features` of an image run gives the training frames' features from a model that trained
on those very frames: more confident than the validation frames' ones, which the temporal model
then meets only at evaluation. mode=oof (`--config.data.folds=K`, K >= 2) instead:
1. splits the training split's source videos into K folds (`kinds.fold_of_rows`: whole videos,
   both crops of a two-subject video together, balanced by frames; every task's videos);
2. trains K image runs, WORKDIR/fold_<j>, each on the training videos outside fold j
   (`data.fold=j`), and with each extracts the features of fold j's frames: no frame's features
   come from a model that trained on its video;
3. trains the full run, WORKDIR/full, on every training video and extracts the validation
   frames' features (and the test list's, given `config.predict`) with it: the model a
   temporal run is evaluated with sees each of those frames unseen, as the folds' models do.
   With `--config.data.oof_eval=folds` the evaluation features are instead the mean over the
   K fold runs of their own (each fold run extracts them into WORKDIR/fold_<j>/features), as
   in stacking: a temporal model then meets at evaluation the same kind of model's inputs as
   in training. Each fold run trains on (K - 1) / K of the videos, so on this small synthetic
   set the full run is the stronger model (docs/ablations.md) and its features are stronger
   than the ones the temporal model trained on. The full run still trains: it is the frame
   model the temporal rows are compared with.
Each run resumes like any run, so an interrupted mode=oof picks up where it stopped. The result
is one features folder, WORKDIR/features (`train`: the K folds' features in the training
index's order; `validation`, `test_<list>`), for `--config.temporal.features_dir`.

The fold models and the full model are separately trained networks: their embeddings are not
the same coordinates, so a temporal model trains on K feature spaces and is evaluated on
another. The predictions (`predictions.npy`: EXPR and AU probabilities, VA; and `probs`, the
EXPR probabilities) mean the same thing whatever model gives them: train the temporal model on
them with `--config.temporal.inputs=predictions`.
"""
import json
import os

import ml_collections
import numpy as np

from affectjax import evaluation, inference, kinds, parallel, trainer
from affectjax.data import index as index_lib
from affectjax.data import sequences


def run_oof(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """mode=oof (see the module docstring); returns {'out', 'folds', 'frames', 'fold', 'summary'}:
  `summary` is the trainer's summary of the full run, or of a run that stopped before finishing
  (SIGTERM, halt_after_steps), after which nothing is extracted or written."""
  workdir = os.path.abspath(workdir)
  folds = int(config.data.folds)
  kind = kinds.get_kind(config)
  index = kinds.load_index(config, 'train')
  fold = kinds.fold_of_rows(index, folds)
  out = config.features_out or os.path.join(workdir, 'features')
  features, probs, predictions, ok, steps = None, None, None, np.zeros(len(index), bool), []
  for j in range(folds):
    c = config.copy_and_resolve_references()
    c.mode, c.data.fold = 'train', j
    folder = os.path.join(workdir, f'fold_{j}')
    rows = np.flatnonzero(fold == j)
    _say(f'[oof] fold {j + 1}/{folds}: training on the other folds in {folder}, then the '
         f'features of its {len(rows)} frames')
    summary = trainer.train_and_evaluate(c, folder)
    if _stopped(summary, f'fold {j + 1}/{folds}'):
      return {'out': out, 'folds': folds, 'frames': len(index), 'fold': fold, 'summary': summary}
    held = index.subset(rows)
    run, state = inference.restore(c, folder, held)
    collected = inference.FrameFeatures(len(held))
    evaluation.infer(run, run.eval_step(), state,
                     kind.eval_iterator(run.config, held, labelled_only=False),
                     collected.on_batch)
    if features is None:
      features = np.zeros((len(index), collected.features.shape[1]), np.float16)
      predictions = np.zeros((len(index), collected.predictions.shape[1]), np.float16)
      if collected.probs is not None:
        probs = np.zeros((len(index), collected.probs.shape[1]), np.float16)
    features[rows], ok[rows] = collected.features, collected.ok
    predictions[rows] = collected.predictions
    if probs is not None:
      probs[rows] = collected.probs
    steps.append(int(state.step))
  c = config.copy_and_resolve_references()
  c.mode, c.data.fold, c.features_out = 'train', -1, out
  full = os.path.join(workdir, 'full')
  _say(f'[oof] the full run on every training video in {full}, then the evaluation features')
  summary = trainer.train_and_evaluate(c, full)
  if _stopped(summary, 'the full run'):
    return {'out': out, 'folds': folds, 'frames': len(index), 'fold': fold, 'summary': summary}
  by_folds = config.data.oof_eval == 'folds'
  extracted = (_fold_means(config, workdir, folds, out) if by_folds
               else inference.extract_features(c, full, train=False))
  if parallel.is_main_process():
    meta = {'workdir': workdir, 'oof_folds': folds, 'fold_steps': steps,
            'fold_frames': np.bincount(fold, minlength=folds).tolist(),
            'full_step': extracted['step'], 'oof_eval': config.data.oof_eval,
            'tasks': config.tasks}
    sequences.write_feature_set(out, 'train', index, features, ok, meta, probs=probs,
                                predictions=predictions)
    print(f'Out-of-fold features of {len(index)} training frames from {folds} fold runs '
          f'({", ".join(map(str, meta["fold_frames"]))} frames), the evaluation features from '
          f'{"the mean of the fold runs" if by_folds else "the full run"}: {out}\n'
          f'  train a temporal model on them with '
          f'--config=configs/temporal.py --config.temporal.features_dir={out}', flush=True)
  return {'out': out, 'folds': folds, 'frames': len(index), 'fold': fold, 'summary': summary}


def _fold_means(config: ml_collections.ConfigDict, workdir: str, folds: int, out: str) -> dict:
  """oof_eval=folds: each fold run extracts the evaluation split's (and the test list's)
  features into WORKDIR/fold_<j>/features; `out` gets, per split, their mean over the folds:
  of the predictions and EXPR probabilities (an ensemble's average), and of the embeddings,
  which are each network's own coordinates (read the predictions: temporal.inputs)."""
  runs = []
  for j in range(folds):
    c = config.copy_and_resolve_references()
    c.mode, c.data.fold = 'features', j
    c.features_out = os.path.join(workdir, f'fold_{j}', 'features')
    runs.append(inference.extract_features(c, os.path.join(workdir, f'fold_{j}'), train=False))
  if parallel.is_main_process():
    for split, first in runs[0]['splits'].items():
      paths = [r['splits'][split] for r in runs]
      mean = {name: np.mean([np.load(os.path.join(p, f'{name}.npy')).astype(np.float32)
                             for p in paths], 0)
              for name in ('features', 'probs', 'predictions')
              if os.path.exists(os.path.join(first, f'{name}.npy'))}
      with open(os.path.join(first, sequences.META)) as f:  # fold 0's, less its run and step
        meta = {k: v for k, v in json.load(f).items() if k not in ('workdir', 'step')}
      meta.update(oof_eval='folds', fold_steps=[r['step'] for r in runs],
                  fold_workdirs=[os.path.join(workdir, f'fold_{j}') for j in range(folds)])
      sequences.write_feature_set(
          out, split, index_lib.AffWild2Index.load(os.path.join(first, 'index.npz')),
          mean['features'], np.all([np.load(os.path.join(p, 'ok.npy')) for p in paths], 0),
          meta, probs=mean.get('probs'), predictions=mean.get('predictions'))
  return {'step': None, 'out': out,
          'splits': {split: os.path.join(out, split) for split in runs[0]['splits']}}


def _stopped(summary: dict, which: str) -> bool:
  """Whether a run stopped before finishing (it resumes there when mode=oof runs again)."""
  if summary['stop_reason'] == 'finished':
    return False
  _say(f'[oof] {which} stopped: {summary["stop_reason"]}; run mode=oof again to resume')
  return True


def _say(text: str) -> None:
  if parallel.is_main_process():
    print(text, flush=True)
