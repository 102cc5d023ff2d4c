"""The grain input pipeline: training and evaluation iterators of uint8 batches.

Design. A grain `MapDataset` over batch numbers k (`range(steps_per_epoch).repeat(epochs)`),
mapped by `BatchMaker`, which builds this process's share of global batch k whole: it looks up
the epoch plan (`sampling.py`), reads the records, decodes and augments each into a preallocated
uint8 array. Everything is a pure function of (seed, k, process_index), so:
- resume is exact: the iterator state is the number of the next batch, independent of
  `worker_count`, `read_threads` and `process_count`;
- `worker_count` processes (grain `mp_prefetch`, worker w builds batches w, w + W, ...) give the
  same batches as in-process reading;
- augmentation draws come from `default_rng([seed, k, stream])`: row i of global batch k
  gets draw i, deterministic per (seed, epoch, position) whatever the process layout.

Bad frames and the iterator: see `affectjax.data.iterator`.
"""
import ml_collections
import numpy as np
from absl import logging

from affectjax import labels
from affectjax.data import host_augment
from affectjax.data import iterator as iterator_lib
from affectjax.data import sampling
from affectjax.data import sources

_AUGMENT_STREAM = 0xA5A5
_MAX_SUBSTITUTES = 64


def default_data_config() -> ml_collections.ConfigDict:
  """Every data knob, with defaults; the trainer's configs start from it."""
  return ml_collections.ConfigDict({
      'root': '',  # Aff-Wild2 root: cropped_aligned/ and the annotations
      'layout': 'auto',  # 'auto' | 'per_task' | 'mtl' (see affectjax.data.layout)
      'tasks': 'expr,au,va',  # labels delivered; other tasks' labels become sentinels
      'num_expr_classes': 7,
      'image_size': 112,  # output H = W; other sizes are resized on the host
      'source': 'jpeg',  # 'jpeg' (folder tree) | 'arrayrecord' (packed) | 'tfds'
      'packed_dir': '',  # arrayrecord: affectjax.data.pack --out; tfds: the TFDS data_dir
      'cache_dir': '',  # where build_index caches the frame index ('' = next to the data)
      # Decode every frame once into a uint8 memory map and read pixels from it afterwards
      # (affectjax.data.decoded_cache): ~10x less host CPU per frame, 37.6 KB of disk per 112px
      # frame.
      'decoded_cache': False,
      'decoded_cache_dir': '',  # '' = cache_dir, else ~/.cache/affectjax (+ /decoded)
      'sampling': 'joint',  # 'joint' | 'alternating' | 'balanced' (see sampling.py)
      'phase_sets': 'exclusive',  # alternating's E / A sets: 'exclusive' | 'inclusive'
      # Leave out of training every video that is a validation video of a trained task (the
      # per-task sets can put one video in one task's training set and another's validation set).
      'holdout_validation_videos': True,
      # Out-of-fold runs (mode=oof): the training split's source videos in `folds` groups
      # (kinds.fold_of_rows); with 0 <= fold < folds, training leaves out group `fold`.
      'folds': 0,
      'fold': -1,
      # mode=oof's evaluation features: 'full' (the full run's) | 'folds' (the mean of the fold
      # runs' predictions: the same kind of model as the training frames'; affectjax.oof).
      'oof_eval': 'full',
      # -1 = auto (`worker_count`: none on a CPU backend, else 4 per GPU within the cores);
      # 0 = read in this process; n > 0 = n grain worker processes
      'worker_count': -1,
      # Added to the worker processes' CPU niceness (os.nice): decoding yields to the process that
      # dispatches the steps (0 = same priority).
      'worker_nice': 0,
      'read_threads': 1,  # threads per process building batches ahead (0 = on demand)
      'prefetch_buffer_size': 2,  # batches buffered per process (and per worker)
      'max_bad_frame_fraction': 0.001,  # fail above this fraction of undecodable frames
      'augment': host_augment.default_augment_config(),
  })




def _empty_batch(batch_size: int, image_size: int, zero_images: bool = True,
                 block_length: int = 0) -> dict:
  """A batch of padding rows: zero images, sentinel labels, valid False, index -1; with
  `block_length`, images [B, block_length, H, W, 3] and their `mask`.

  Without `zero_images` the images are uninitialised (for batches whose rows all get written).
  """
  allocate = np.zeros if zero_images else np.empty
  frames = (block_length,) if block_length else ()
  batch = {
      'image': allocate((batch_size,) + frames + (image_size, image_size, 3), np.uint8),
      **labels.missing_labels(batch_size, 'batch'),
      'valid': np.zeros(batch_size, bool),
      'phase': np.zeros(batch_size, np.int32),
      'index': np.full(batch_size, -1, np.int32),
  }
  if block_length:
    batch['mask'] = np.zeros((batch_size, block_length), bool)
  return batch


class BatchMaker:
  """Builds this process's share of global batch k (a grain `map_with_index` function).

  Training: `groups` (the sampling scheme's phases; epoch plans from `sampling.epoch_plan`);
  evaluation: `eval_rows` (every labelled row once, padded with -1). With `block_length` S, each
  row brings its frame and the S - 1 previous frames of its video (`sampling.block_rows`:
  by frame number, a gap repeating the frame before it), images [B, S, H, W, 3] left-aligned
  with their `mask` [B, S], the labels those of the row's own frame; one augmentation draw per
  block. An earlier frame of a block that does not decode repeats the nearest frame before it
  that did (after it, at the block's start); the row's own frame is handled as a bad frame.
  """

  def __init__(self, source, index, data_config, *, global_batch_size, process_index,
               process_count, seed=0, groups=None, eval_rows=None, block_length=0):
    self.source, self.index = source, index
    self.block_length = int(block_length)
    self.block = sampling.block_rows(index, self.block_length) if self.block_length else None
    self.tasks = labels.parse_tasks(data_config.tasks)
    self.image_size = int(data_config.image_size)
    self.global_batch = int(global_batch_size)
    self.batch = self.global_batch // process_count
    self.offset = process_index * self.batch
    self.process_index, self.process_count, self.seed = process_index, process_count, int(seed)
    self.groups, self.eval_rows = groups, eval_rows
    self.training = eval_rows is None
    augment = data_config.augment
    self.augment = augment if self.training and _augments(augment) else None
    self.steps_per_epoch = (sampling.steps_per_epoch(groups, self.global_batch) if self.training
                            else eval_rows.size // self.global_batch)
    self._plan = None

  def __getstate__(self):
    state = dict(self.__dict__)
    state['_plan'] = None  # recomputed in each worker
    return state

  def plan(self, epoch: int):
    """(rows, phases, segment bounds) of a training epoch; the latest one is cached."""
    cached = self._plan
    if cached is None or cached[0] != epoch:
      rows, phases = sampling.epoch_plan(self.groups, self.seed, epoch, self.global_batch)
      cached = (epoch, rows, phases, sampling.segment_bounds(phases))
      self._plan = cached
    return cached[1:]

  def __call__(self, k: int, _=None) -> dict:
    epoch, step = divmod(int(k), self.steps_per_epoch)
    start = step * self.global_batch + self.offset
    positions = np.arange(start, start + self.batch)
    if self.training:
      rows, phases, bounds = self.plan(epoch)
      batch = self._fill(rows, positions, bounds, k)
      batch['phase'] = phases[positions]
    else:
      batch = self._fill(self.eval_rows, positions, None, k)
    labels.mask_untrained(batch, self.tasks)  # the index may carry other tasks' labels
    return batch

  def _fill(self, plan_rows, positions, bounds, k) -> dict:
    # Training writes every row (bad frames are substituted), evaluation may leave rows padding.
    batch = _empty_batch(self.batch, self.image_size, zero_images=bounds is None,
                         block_length=self.block_length)
    rows = plan_rows[positions]
    params = None
    if self.augment is not None:  # drawn for the global batch: independent of process_count
      rng = np.random.default_rng([self.seed, int(k), _AUGMENT_STREAM])
      params = host_augment.sample_augment(rng, self.global_batch, self.augment).rows(
          self.offset, self.offset + self.batch)
    writer = host_augment.RowWriter(self.image_size, self.augment)
    wanted = np.flatnonzero(rows >= 0)
    # Single frames are read in one go; blocks row by row (each reads its frames in one go).
    records = (self.source.__getitems__(rows[wanted].tolist()) if self.block is None
               else [None] * len(wanted))
    bad_rows, num_read, filled = [], 0, []
    for i, record in zip(wanted.tolist(), records):
      ok, read = self._write(batch, i, int(rows[i]), record, writer, params, bad_rows)
      num_read += read
      if not ok and bounds is not None:  # training: substitute; evaluation: leave it invalid
        row, read = self._substitute(plan_rows, positions[i], bounds, batch, i, writer, params,
                                     bad_rows)
        num_read, ok = num_read + read, True
      else:
        row = int(rows[i])
      if ok:
        filled.append((i, row))
    self._set_labels(batch, filled)
    batch[iterator_lib.READ_KEY] = np.int64(num_read)
    batch[iterator_lib.BAD_KEY] = np.asarray(bad_rows, np.int32)
    return batch

  def _write(self, batch, i, row, record, writer, params, bad_rows) -> tuple[bool, int]:
    """Writes index row `row` (its `record` when already read) to batch row i: (whether its
    own frame decoded, frames read); frames that did not decode go to `bad_rows`."""
    if self.block is None:
      record = self.source[row] if record is None else record
      ok = writer.write_record(batch['image'][i], record, params, i)
      if not ok:
        bad_rows.append(row)
      return ok, 1
    members = self.block[row]
    present = np.flatnonzero(members >= 0)
    records = self.source.__getitems__(members[present].tolist())
    out, decoded = batch['image'][i], []
    for j, record in zip(present.tolist(), records):
      if writer.write_record(out[j], record, params, i):
        decoded.append(j)
      else:
        bad_rows.append(int(members[j]))
    if not decoded or decoded[-1] != present[-1]:  # the row's own frame is bad
      return False, len(records)
    for j in sorted(set(present.tolist()) - set(decoded)):
      earlier = [d for d in decoded if d < j]
      out[j] = out[earlier[-1] if earlier else decoded[0]]
    batch['mask'][i] = members >= 0
    out[len(present):] = out[present[0]]  # padding slots: real pixels for BatchNorm's statistics
    return True, len(records)

  def _substitute(self, plan_rows, position, bounds, batch, i, writer, params, bad_rows):
    """(index row, frames read): the next decodable row after `position` in its phase segment
    of the plan (wrapping), written to batch row i with sample i's augmentation."""
    segment = np.searchsorted(bounds, position, side='right') - 1
    lo, hi = int(bounds[segment]), int(bounds[segment + 1])
    reads = 0
    for attempt in range(1, min(_MAX_SUBSTITUTES, hi - lo)):
      row = int(plan_rows[lo + (int(position) - lo + attempt) % (hi - lo)])
      ok, read = self._write(batch, i, row, None, writer, params, bad_rows)
      reads += read
      if ok:
        return row, reads
    raise sources.DataError(f'no decodable frame among the substitutes for a bad frame; bad '
                            f'frames here: {[self.index.image_path(r) for r in bad_rows]}')

  def _set_labels(self, batch: dict, filled: list) -> None:
    """Labels of the (batch row, index row) pairs, gathered from the index in one go (sources
    carry the same labels: packed data is checked against the index's fingerprint)."""
    if not filled:
      return
    rows, index_rows = (np.array(column) for column in zip(*filled))
    for task in labels.TASKS:
      batch[task][rows] = getattr(self.index, task)[index_rows]
    batch['index'][rows] = index_rows
    batch['valid'][rows] = True


def _augments(augment) -> bool:
  return bool(augment.flip or host_augment.needs_warp(augment) or augment.color_jitter)


def steps_per_epoch(index, data_config, global_batch_size: int) -> int:
  """Training steps (global batches) per epoch for this index and sampling scheme."""
  groups = sampling.make_groups(index, labels.parse_tasks(data_config.tasks),
                                data_config.sampling, data_config.phase_sets)
  return sampling.steps_per_epoch(groups, global_batch_size)


def _log_counts(what: str, counts: dict) -> None:
  logging.info('%s frames: %s', what, counts)
  print(f'{what} frames: ' + ', '.join(f'{k} {v}' for k, v in counts.items()))


def make_train_iterator(index, data_config, *, global_batch_size: int, seed: int,
                        process_index: int = 0, process_count: int = 1,
                        num_epochs: int | None = None, source=None,
                        block_length: int = 0) -> iterator_lib.AffectIterator:
  """Endless (or `num_epochs`) training batches of this process: dicts of NumPy arrays
  `image uint8 [B,H,W,3], expr int32 [B], au int32 [B,12], va float32 [B,2], valid bool [B],
  phase int32 [B], index int32 [B]` with B = global_batch_size // process_count (blocks of
  frames with `block_length`: see BatchMaker)."""
  iterator_lib.check_batch(global_batch_size, process_index, process_count)
  tasks = labels.parse_tasks(data_config.tasks)
  groups = sampling.make_groups(index, tasks, data_config.sampling, data_config.phase_sets)
  if sampling.steps_per_epoch(groups, global_batch_size) == 0:
    raise ValueError(f'no complete batch of {global_batch_size} frames per epoch: frames per '
                     f'phase {groups.counts()}')
  maker = BatchMaker(source or sources.make_source(index, data_config), index, data_config,
                     global_batch_size=global_batch_size, process_index=process_index,
                     process_count=process_count, seed=seed, groups=groups,
                     block_length=block_length)
  counts = sampling.frame_counts(index, tasks, groups)
  counts['steps_per_epoch'] = maker.steps_per_epoch
  _log_counts(f'train ({data_config.sampling})', counts)
  return iterator_lib.AffectIterator(maker, data_config, num_epochs, counts)


def make_eval_iterator(index, data_config, *, global_batch_size: int, process_index: int = 0,
                       process_count: int = 1, source=None,
                       labelled_only: bool = True, block_length: int = 0) -> iterator_lib.AffectIterator:
  """One pass over every labelled frame (every frame, without `labelled_only`: prediction)
  exactly once, in index order, padded with `valid=False` rows to whole batches;
  `iterator.num_skipped` counts undecodable frames."""
  iterator_lib.check_batch(global_batch_size, process_index, process_count)
  tasks = labels.parse_tasks(data_config.tasks)
  rows = sampling.eval_plan(index, tasks, global_batch_size, labelled_only)
  maker = BatchMaker(source or sources.make_source(index, data_config), index, data_config,
                     global_batch_size=global_batch_size, process_index=process_index,
                     process_count=process_count, eval_rows=rows, block_length=block_length)
  counts = (sampling.frame_counts(index, tasks) if labelled_only
            else {'frames': len(index), 'videos': len(index.video_names)})
  counts['steps'] = maker.steps_per_epoch
  _log_counts('eval' if labelled_only else 'all', counts)
  return iterator_lib.AffectIterator(maker, data_config, 1, counts)
