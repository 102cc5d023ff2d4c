"""Segments of per-frame features for the temporal models (affectjax.models.temporal).

Per-frame features are written by `--config.mode=features` of an image run
(`inference.extract_features`): per split a folder with `features.npy` (float16 [N, D], memory-
mapped when read), `ok.npy` (bool [N], False where the crop could not be read), `index.npz` (the
`AffWild2Index` of the N frames, labels included), `meta.json`, and where the run predicts them
`probs.npy` (EXPR probabilities) and `predictions.npy` (`inference.frame_predictions`, what
temporal.inputs='predictions' reads in place of `features.npy`).

A segment is `temporal.length` consecutive rows of one video (rows sorted by video and frame, so
frames without a crop or label are skipped, as in the paper's segments of annotated frames); a
video's last segment is padded with -1. Training shuffles the segments per epoch (drops the
remainder to whole batches); evaluation visits every segment once, padded with empty segments.
Batches: `features` float32 [B, L, D], `mask` bool [B, L] (frame present), `valid` bool [B, L]
(present and readable), `expr` [B, L], `au` [B, L, 12], `va` [B, L, 2] (labels of untrained
tasks are sentinels), `index` int32 [B, L] (-1 on padding), `phase` int32 [B] (0).

With `carry_state` (models that carry their state from a segment to the next) the B rows of a
batch are lanes (`lane_plan`): each video is assigned to one lane, where its segments come in
order on consecutive batches, and `reset` bool [B] marks a lane's segment that starts a video
(or is padding). Lanes are filled longest videos first, once; training shuffles the order of the
videos within each lane per epoch, so every epoch has the same number of batches. Batches are
pure functions of (seed, batch number), so the iterator state and resume are exactly those of
`iterator_lib.AffectIterator`.
"""
import json
import os

import numpy as np

from affectjax import files
from affectjax import labels
from affectjax.data import index as index_lib
from affectjax.data import iterator as iterator_lib
from affectjax.data import sampling

META = 'meta.json'


class _Concatenated:
  """Several [N, D_i] feature arrays read as one [N, sum D_i] (rows gathered from each)."""

  def __init__(self, parts):
    self.parts = parts
    self.shape = (parts[0].shape[0], sum(p.shape[1] for p in parts))
    self.dtype = parts[0].dtype

  def __getitem__(self, rows):
    return np.concatenate([np.asarray(p[rows]) for p in self.parts], axis=-1)

  def __len__(self):
    return self.shape[0]


class FeatureSet:
  """The extracted features of one split. `directory` may name several feature folders,
  comma-separated (e.g. several extractors, as the ABAW4 winners concatenate): their features
  are concatenated per frame, after checking that they list the same frames in the same order;
  a frame is readable where it is in all of them, EXPR probabilities come from the first that
  has them. `inputs` (temporal.inputs) picks what `features` holds: 'embedding' (features.npy)
  or 'predictions' (predictions.npy)."""

  def __init__(self, directory: str, split: str, inputs: str = 'embedding'):
    self.directory, self.split, self.inputs = directory, split, inputs
    folders = [d.strip() for d in directory.split(',') if d.strip()]
    parts = [self._load(os.path.join(d, split), inputs) for d in folders]
    self.path, self.meta, self.features, self.ok, self.probs, self.index = parts[0]
    for path, _, _, ok, probs, index in parts[1:]:
      if (index.video_names != self.index.video_names or len(index) != len(self.index)
          or not np.array_equal(index.video_id, self.index.video_id)
          or not np.array_equal(index.frame, self.index.frame)):
        raise ValueError(f'{path} and {self.path} list other frames or another order: '
                         'concatenated features need the same frames (extract them from the '
                         'same data and split)')
      self.ok = self.ok & ok
      self.probs = self.probs if self.probs is not None else probs
    if len(parts) > 1:
      self.features = _Concatenated([part[2] for part in parts])

  @staticmethod
  def _load(path: str, inputs: str) -> tuple:
    meta_path = os.path.join(path, META)
    if not os.path.exists(meta_path):
      raise FileNotFoundError(
          f'{meta_path} not found: extract the features of an image run first with\n  python -m '
          'affectjax.main --config=<its config> --workdir=<its workdir> --config.mode=features')
    with open(meta_path) as f:
      meta = json.load(f)
    name = {'embedding': 'features.npy', 'predictions': 'predictions.npy'}[inputs]
    if not os.path.exists(os.path.join(path, name)):
      raise FileNotFoundError(f'{os.path.join(path, name)} not found: temporal.inputs={inputs} '
                              'reads it; extract these features again (mode=features or '
                              'mode=oof) to write it')
    features = np.load(os.path.join(path, name), mmap_mode='r')
    ok = np.load(os.path.join(path, 'ok.npy'))
    probs_path = os.path.join(path, 'probs.npy')  # EXPR probabilities, when extracted
    probs = np.load(probs_path, mmap_mode='r') if os.path.exists(probs_path) else None
    index = index_lib.AffWild2Index.load(os.path.join(path, 'index.npz'))
    if features.shape[0] != len(index) or ok.shape != (len(index),):
      raise ValueError(f'{path}: {features.shape[0]} feature rows, {ok.shape[0]} '
                       f'flags and {len(index)} index rows do not match: extract again')
    return path, meta, features, ok, probs, index

  @property
  def dim(self) -> int:
    return int(self.features.shape[1])

  def __getstate__(self):  # worker processes reopen the memory maps
    return {'directory': self.directory, 'split': self.split, 'inputs': self.inputs}

  def __setstate__(self, state):
    self.__init__(state['directory'], state['split'], state['inputs'])


def write_feature_set(directory: str, split: str, index, features: np.ndarray, ok: np.ndarray,
                      meta: dict, probs: np.ndarray | None = None,
                      predictions: np.ndarray | None = None) -> str:
  """Writes what `FeatureSet` reads into `<directory>/<split>`, which it replaces whole when
  complete (a failure leaves the previous folder, or none, and no partial one): `features`
  (the embedding), `probs` (EXPR probabilities) and `predictions` (inference.frame_predictions),
  [N, D] each."""
  path = os.path.join(directory, split)
  os.makedirs(directory, exist_ok=True)
  with files.atomic_dir(path) as tmp:
    np.save(os.path.join(tmp, 'features.npy'), np.asarray(features, np.float16))
    for name, array in (('probs', probs), ('predictions', predictions)):
      if array is not None:
        np.save(os.path.join(tmp, f'{name}.npy'), np.asarray(array, np.float16))
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


def lane_plan(video_of_segment: np.ndarray, lanes: int, rng=None) -> np.ndarray:
  """int64 [steps, lanes]: the segment of each lane at each step (-1: nothing left). Each video's
  segments (consecutive numbers, as `segment_rows` gives them) in order on one lane; videos go,
  longest first, to the lane with the fewest segments so far. With `rng`, each lane's videos
  are visited in a random order (the lanes and their lengths stay the same)."""
  starts = np.flatnonzero(np.r_[True, video_of_segment[1:] != video_of_segment[:-1]])
  videos = np.split(np.arange(len(video_of_segment)), starts[1:]) if len(starts) else []
  load, members = np.zeros(lanes, np.int64), [[] for _ in range(lanes)]
  for v in sorted(range(len(videos)), key=lambda v: (-len(videos[v]), v)):
    lane = int(np.argmin(load))
    members[lane].append(v)
    load[lane] += len(videos[v])
  plan = np.full((int(load.max(initial=0)), lanes), -1, np.int64)
  for lane, vs in enumerate(members):
    order = rng.permutation(vs) if rng is not None and vs else vs
    sequence = np.concatenate([videos[v] for v in order]) if vs else np.zeros(0, np.int64)
    plan[:len(sequence), lane] = sequence
  return plan


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
               training: bool = True, labelled_only: bool = True, carry_state: bool = False):
    self.features = feature_set
    index = feature_set.index
    self.tasks = labels.parse_tasks(data_config.tasks)
    self.window = window
    self.global_batch = int(global_batch_size)
    self.batch = self.global_batch // process_count
    self.offset = process_index * self.batch
    self.seed, self.training = int(seed), training
    self.groups = None
    self.segment_video = None  # with carry_state: each segment's video, for lane_plan
    if window == 'segment':
      self.units = segment_rows(index, length)
      count = len(self.units)
      self.steps_per_epoch = (count // self.global_batch if training
                              else -(-count // self.global_batch))
      if carry_state:  # a video's segments in order on one lane (lane_plan)
        video = index.video_id[self.units[:, 0]] if count else np.zeros(0, np.int64)
        self.starts_video = np.r_[True, video[1:] != video[:-1]][:count]
        self.segment_video = video
        self.steps_per_epoch = len(lane_plan(video, self.global_batch))
    elif window == 'block':
      self.units = sampling.block_rows(index, length)
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
    if self.segment_video is not None:  # [steps, lanes], flattened in batch order
      if self._plan is None or self._plan[0] != epoch:
        rng = np.random.default_rng([self.seed, int(epoch)]) if self.training else None
        self._plan = (epoch, lane_plan(self.segment_video, self.global_batch, rng).reshape(-1))
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
    if self.segment_video is not None:  # a lane's segment that starts a video, or padding
      batch['reset'] = (picks < 0) | self.starts_video[np.maximum(picks, 0)]
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
                  num_epochs: int | None = None, labelled_only: bool = True,
                  carry_state: bool = False) -> iterator_lib.AffectIterator:
  """Training (endless, or `num_epochs`) or evaluation (one pass) batches of windows of
  `length` frames (see `SequenceBatchMaker`)."""
  iterator_lib.check_batch(global_batch_size, process_index, process_count)
  maker = SequenceBatchMaker(feature_set, data_config, window=window, length=length,
                             global_batch_size=global_batch_size, process_index=process_index,
                             process_count=process_count, seed=seed, training=training,
                             labelled_only=labelled_only, carry_state=carry_state)
  counts = {'frames': len(feature_set.index), f'{window}s': len(maker.units),
            'steps' if not training else 'steps_per_epoch': maker.steps_per_epoch}
  print(f'{"train" if training else "eval"} {window}s of {length} frames: ' +
        ', '.join(f'{k} {v}' for k, v in counts.items()), flush=True)
  return iterator_lib.AffectIterator(maker, data_config, num_epochs if training else 1, counts)
