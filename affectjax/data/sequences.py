"""Segments of per-frame features for the temporal models (affectjax.models.temporal).

Per-frame features are written by `--config.mode=features` of an image run
(`inference.extract_features`): per split a folder with `features.npy` (float16 [N, D], memory-
mapped when read), `ok.npy` (bool [N], False where the crop could not be read), `index.npz` (the
`AffWild2Index` of the N frames, labels included) and `meta.json`.

A segment is `temporal.length` consecutive rows of one video (rows sorted by video and frame, so
frames without a crop or label are skipped, as in the paper's segments of annotated frames); a
video's last segment is padded with -1. Training shuffles the segments per epoch (drops the
remainder to whole batches); evaluation visits every segment once, padded with empty segments.
Batches: `features` float32 [B, L, D], `mask` bool [B, L] (frame present), `valid` bool [B, L]
(present and readable), `expr` [B, L], `au` [B, L, 12], `va` [B, L, 2] (labels of untrained
tasks are sentinels), `index` int32 [B, L] (-1 on padding), `phase` int32 [B] (0). Batches are
pure functions of (seed, batch number), so the iterator state and resume are exactly those of
`pipeline.AffectIterator`.
"""
import json
import os

import numpy as np

from affectjax import files
from affectjax import labels
from affectjax.data import index as index_lib
from affectjax.data import pipeline
from affectjax.data import sampling

META = 'meta.json'


class FeatureSet:
  """The extracted features of one split."""

  def __init__(self, directory: str, split: str):
    self.path = os.path.join(directory, split)
    meta_path = os.path.join(self.path, META)
    if not os.path.exists(meta_path):
      raise FileNotFoundError(
          f'{meta_path} not found: extract the features of an image run first with\n  python -m '
          'affectjax.main --config=<its config> --workdir=<its workdir> --config.mode=features')
    with open(meta_path) as f:
      self.meta = json.load(f)
    self.features = np.load(os.path.join(self.path, 'features.npy'), mmap_mode='r')
    self.ok = np.load(os.path.join(self.path, 'ok.npy'))
    probs_path = os.path.join(self.path, 'probs.npy')  # EXPR probabilities, when extracted
    self.probs = np.load(probs_path, mmap_mode='r') if os.path.exists(probs_path) else None
    self.index = index_lib.AffWild2Index.load(os.path.join(self.path, 'index.npz'))
    if self.features.shape[0] != len(self.index) or self.ok.shape != (len(self.index),):
      raise ValueError(f'{self.path}: {self.features.shape[0]} feature rows, {self.ok.shape[0]} '
                       f'flags and {len(self.index)} index rows do not match: extract again')

  @property
  def dim(self) -> int:
    return int(self.features.shape[1])

  def __getstate__(self):  # worker processes reopen the memory map
    return {'path': self.path}

  def __setstate__(self, state):
    directory, split = os.path.split(state['path'])
    self.__init__(directory, split)


def write_feature_set(directory: str, split: str, index, features: np.ndarray, ok: np.ndarray,
                      meta: dict, probs: np.ndarray | None = None) -> str:
  """Writes what `FeatureSet` reads into `<directory>/<split>`, which it replaces whole when
  complete (a failure leaves the previous folder, or none, and no partial one)."""
  path = os.path.join(directory, split)
  os.makedirs(directory, exist_ok=True)
  with files.atomic_dir(path) as tmp:
    np.save(os.path.join(tmp, 'features.npy'), np.asarray(features, np.float16))
    if probs is not None:
      np.save(os.path.join(tmp, 'probs.npy'), np.asarray(probs, np.float16))
    np.save(os.path.join(tmp, 'ok.npy'), np.asarray(ok, bool))
    index.save(os.path.join(tmp, 'index.npz'))
    with open(os.path.join(tmp, META), 'w') as f:
      json.dump(dict(meta, num_frames=len(index), dim=int(features.shape[1]), split=split), f,
                indent=1)
  return path


def segment_rows(index, length: int) -> np.ndarray:
  """int64 [S, length]: consecutive rows of each video (index rows sorted by video and frame),
  the last segment of a video padded with -1."""
  if length < 1:
    raise ValueError(f'segment length must be positive, got {length}')
  first, last = index_lib.run_bounds(index.video_id)
  starts = np.flatnonzero(first == np.arange(len(first)))
  segments = []
  for start, end in zip(starts.tolist(), last[starts].tolist()):
    for lo in range(start, end, length):
      row = np.full(length, -1, np.int64)
      row[:min(length, end - lo)] = np.arange(lo, min(lo + length, end))
      segments.append(row)
  return np.array(segments, np.int64).reshape(-1, length)


def block_rows(index, size: int) -> np.ndarray:
  """int64 [N, size]: for each row i at frame f, its video's frames f - size + 1 .. f by frame
  number (not by row: frames without a crop or a feature have no row). A frame without a row
  repeats the nearest earlier frame that has one, as the frame model's output would hold still
  over a missing face; frames before the video's first row are left out. Left-aligned and padded
  with -1, so the current frame is the last present entry."""
  if size < 1:
    raise ValueError(f'block size must be positive, got {size}')
  first, end = index_lib.run_bounds(index.video_id)
  frame = np.asarray(index.frame, np.int64)
  wanted = frame[:, None] - (size - 1) + np.arange(size)[None, :]  # frame numbers [N, size]
  # Per row and slot: the last row of the same video whose frame is <= the wanted frame.
  found = np.empty_like(wanted)
  for start, stop in zip(*np.unique(np.stack([first, end]), axis=1)):
    rows = slice(start, stop)
    found[rows] = start + np.searchsorted(frame[rows], wanted[rows], side='right') - 1
  present = found >= first[:, None]
  lead = size - present.sum(axis=1)  # slots before the video's first row, all at the start
  slot = np.arange(size)[None, :] + lead[:, None]
  return np.where(slot < size, np.take_along_axis(found, np.minimum(slot, size - 1), axis=1),
                  -1).astype(np.int64)


class SequenceBatchMaker:
  """Batch k of windows (a grain `map_with_index` function; see `pipeline.BatchMaker`).

  window 'segment': segments of `length` frames, labels on every frame ([B, L]); training
  shuffles the segments per epoch. window 'block' (the temporal statistical model): for a target
  frame, it and its `length - 1` previous frames; labels of the target only ([B, 1]); training
  follows the sampling scheme of `data.sampling` over the labelled target frames (e.g.
  'balanced'), evaluation visits every labelled frame once (every frame without
  `labelled_only`: prediction).
  """

  def __init__(self, feature_set: FeatureSet, data_config, *, window: str, length: int,
               global_batch_size: int, process_index: int, process_count: int, seed: int = 0,
               training: bool = True, labelled_only: bool = True):
    self.features = feature_set
    index = feature_set.index
    self.tasks = labels.parse_tasks(data_config.tasks)
    self.window = window
    self.global_batch = int(global_batch_size)
    self.batch = self.global_batch // process_count
    self.offset = process_index * self.batch
    self.seed, self.training = int(seed), training
    self.groups = None
    if window == 'segment':
      self.units = segment_rows(index, length)
      count = len(self.units)
      self.steps_per_epoch = (count // self.global_batch if training
                              else -(-count // self.global_batch))
    elif window == 'block':
      self.units = block_rows(index, length)
      if training:
        self.groups = sampling.make_groups(index, self.tasks, data_config.sampling,
                                             data_config.phase_sets)
        self.steps_per_epoch = sampling.steps_per_epoch(self.groups, self.global_batch)
      else:
        self.eval_targets = sampling.eval_plan(index, self.tasks, self.global_batch,
                                               labelled_only)
        self.steps_per_epoch = self.eval_targets.size // self.global_batch
    else:
      raise ValueError(f"temporal.window must be 'segment' or 'block', got {window!r}")
    if training and self.steps_per_epoch == 0:
      raise ValueError(f'fewer than one batch of {self.global_batch} {window}s per epoch')
    self._plan = None

  def __getstate__(self):
    state = dict(self.__dict__)
    state['_plan'] = None
    return state

  def order(self, epoch: int) -> np.ndarray:
    """Segment numbers, or target rows (blocks), of an epoch in batch order (-1 = padding)."""
    if self.window == 'block':
      if not self.training:
        return self.eval_targets
      if self._plan is None or self._plan[0] != epoch:
        self._plan = (epoch, sampling.epoch_plan(self.groups, self.seed, epoch,
                                                 self.global_batch)[0])
      return self._plan[1]
    if not self.training:
      return np.arange(len(self.units))
    return np.random.default_rng([self.seed, int(epoch)]).permutation(len(self.units))

  def __call__(self, k: int, _=None) -> dict:
    epoch, step = divmod(int(k), self.steps_per_epoch)
    picks = np.full(self.batch, -1, np.int64)
    chosen = self.order(epoch)[step * self.global_batch + self.offset:][:self.batch]
    picks[:len(chosen)] = chosen
    rows = np.where(picks[:, None] >= 0, self.units[np.maximum(picks, 0)], -1)
    present = rows >= 0
    safe = np.where(present, rows, 0)
    fs, ix = self.features, self.features.index
    gather = lambda a: np.where(present[..., None], np.asarray(
        a[safe.reshape(-1)], np.float32).reshape(rows.shape + (-1,)), 0.0)
    batch = {'features': gather(fs.features), 'mask': present,
             'phase': np.zeros(self.batch, np.int32)}
    if fs.probs is not None:
      batch['probs'] = gather(fs.probs)
    if self.window == 'block':  # labels of the current (last present) frame only
      target = rows[np.arange(self.batch), np.maximum(present.sum(axis=1) - 1, 0)][:, None]
      labelled = target >= 0
    else:
      target, labelled = rows, present
    safe_target = np.where(labelled, target, 0)
    batch['valid'] = labelled & fs.ok[safe_target]
    for task in labels.TASK_TABLE.values():
      present = labelled.reshape(labelled.shape + (1,) * len(task.shape))
      batch[task.name] = np.where(present, getattr(ix, task.name)[safe_target],
                                  task.missing).astype(task.batch_dtype)
    batch['index'] = target.astype(np.int32)
    labels.mask_untrained(batch, self.tasks)
    return batch


def make_iterator(feature_set: FeatureSet, data_config, *, length: int,
                  global_batch_size: int, window: str = 'segment', seed: int = 0,
                  training: bool = True, process_index: int = 0, process_count: int = 1,
                  num_epochs: int | None = None,
                  labelled_only: bool = True) -> pipeline.AffectIterator:
  """Training (endless, or `num_epochs`) or evaluation (one pass) batches of windows of
  `length` frames (see `SequenceBatchMaker`)."""
  pipeline.check_batch(global_batch_size, process_index, process_count)
  maker = SequenceBatchMaker(feature_set, data_config, window=window, length=length,
                             global_batch_size=global_batch_size, process_index=process_index,
                             process_count=process_count, seed=seed, training=training,
                             labelled_only=labelled_only)
  counts = {'frames': len(feature_set.index), f'{window}s': len(maker.units),
            'steps' if not training else 'steps_per_epoch': maker.steps_per_epoch}
  print(f'{"train" if training else "eval"} {window}s of {length} frames: ' +
        ', '.join(f'{k} {v}' for k, v in counts.items()), flush=True)
  return pipeline.AffectIterator(maker, data_config, num_epochs if training else 1, counts)
