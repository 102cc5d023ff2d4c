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

Bad frames (unreadable or undecodable JPEG). Training substitutes the next frame of the same
phase segment in the epoch plan (same augmentation draw), so batch shapes, phases and
determinism are unaffected. Evaluation turns the row into a `valid=False` row (zero image,
sentinel labels, index -1) and the iterator's `num_skipped` counts them. Each batch carries
how many frames were read to build it and which were bad (`READ_KEY`, `BAD_KEY`); the iterator
removes these before returning the batch and keeps the counts, from the first frame, in the
process that iterates (worker processes or not), in its resumable state. It logs each bad path
once (the first ten) and raises `sources.DataError` as soon as the bad frames exceed
`sources.allowed_bad_frames(read so far)`: `max_bad_frame_fraction` of the frames read so far,
but at least `sources.BAD_FRAME_FLOOR` frames (so one unlucky bad frame in the first batch does
not stop a run; 0 tolerates none). Evaluation counts each pass on its own.

Worker processes and absl: grain defines absl flags; in an absl `main`, start iterators with
`worker_count > 0` only after flags are parsed (i.e. inside `main`), as workers re-read them.
"""
import functools
import os

import grain
import ml_collections
import numpy as np
from absl import flags
from absl import logging

from affectjax import labels
from affectjax.data import host_augment
from affectjax.data import sampling
from affectjax.data import sources

_AUGMENT_STREAM = 0xA5A5
_MAX_SUBSTITUTES = 64
# Auto worker processes per accelerator. On an H200 (ResNet50, 112 px, batch 256, ~17,900 img/s)
# 4 JPEG workers kept 0.945 of the bare step; 14 kept 0.72-0.83, their bursts delaying the
# process that dispatches the steps (docs/benchmarks.md, "Accelerator check").
WORKERS_PER_DEVICE = 4


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


READ_KEY, BAD_KEY = 'frames_read', 'bad_rows'  # host-only batch entries, removed by the iterator


def _empty_batch(batch_size: int, image_size: int, zero_images: bool = True) -> dict:
  """A batch of padding rows: zero images, sentinel labels, valid False, index -1.

  Without `zero_images` the images are uninitialised (for batches whose rows all get written).
  """
  allocate = np.zeros if zero_images else np.empty
  return {
      'image': allocate((batch_size, image_size, image_size, 3), np.uint8),
      **labels.missing_labels(batch_size, 'batch'),
      'valid': np.zeros(batch_size, bool),
      'phase': np.zeros(batch_size, np.int32),
      'index': np.full(batch_size, -1, np.int32),
  }


class BatchMaker:
  """Builds this process's share of global batch k (a grain `map_with_index` function).

  Training: `groups` (the sampling scheme's phases; epoch plans from `sampling.epoch_plan`);
  evaluation: `eval_rows` (every labelled row once, padded with -1).
  """

  def __init__(self, source, index, data_config, *, global_batch_size, process_index,
               process_count, seed=0, groups=None, eval_rows=None):
    self.source, self.index = source, index
    self.tasks = labels.parse_tasks(data_config.tasks)
    self.image_size = int(data_config.image_size)
    self.global_batch = int(global_batch_size)
    self.batch = self.global_batch // process_count
    self.offset = process_index * self.batch
    self.process_index, self.seed = process_index, int(seed)
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
    batch = _empty_batch(self.batch, self.image_size, zero_images=bounds is None)
    rows = plan_rows[positions]
    params = None
    if self.augment is not None:  # drawn for the global batch: independent of process_count
      rng = np.random.default_rng([self.seed, int(k), _AUGMENT_STREAM])
      params = host_augment.sample_augment(rng, self.global_batch, self.augment).rows(
          self.offset, self.offset + self.batch)
    writer = host_augment.RowWriter(self.image_size, self.augment)
    wanted = np.flatnonzero(rows >= 0)
    records = self.source.__getitems__(rows[wanted].tolist())
    bad_rows, num_read, filled = [], len(records), []
    for i, record in zip(wanted.tolist(), records):
      ok = writer.write_record(batch['image'][i], record, params, i)
      if not ok:
        bad_rows.append(int(record['index']))
        if bounds is not None:  # training: substitute; evaluation: leave the row invalid
          record, attempts = self._substitute(plan_rows, positions[i], bounds, writer,
                                              batch['image'][i], params, i, bad_rows)
          num_read, ok = num_read + attempts, True
      if ok:
        filled.append((i, int(record['index'])))
    self._set_labels(batch, filled)
    batch[READ_KEY] = np.int64(num_read)
    batch[BAD_KEY] = np.asarray(bad_rows, np.int32)
    return batch

  def _substitute(self, plan_rows, position, bounds, writer, out, params, i, bad_rows):
    """(record, frames read): the next decodable frame after `position` in its phase segment
    of the plan (wrapping), written to `out` with sample i's augmentation."""
    segment = np.searchsorted(bounds, position, side='right') - 1
    lo, hi = int(bounds[segment]), int(bounds[segment + 1])
    for attempt in range(1, min(_MAX_SUBSTITUTES, hi - lo)):
      record = self.source[int(plan_rows[lo + (int(position) - lo + attempt) % (hi - lo)])]
      if writer.write_record(out, record, params, i):
        return record, attempt
      bad_rows.append(int(record['index']))
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


class AffectIterator(grain.DatasetIterator):
  """Wraps grain's iterator: counts steps (`epoch` of the latest batch), and for evaluation the
  frames skipped as undecodable.

  The state is the number of batches delivered (`{'step', ...}`, JSON-compatible, so grain's
  Orbax handler `grain.checkpoint.CheckpointSave/CheckpointRestore` saves it too): every batch
  is a function of its number, so `set_state` restarts grain at that batch. The state thus
  does not depend on `worker_count`, `read_threads` or `process_count`.
  """

  def __init__(self, maker: BatchMaker, data_config, num_epochs: int | None,
               frame_counts: dict):
    self._start = functools.partial(_build, maker, data_config, num_epochs)
    super().__init__(self._start(0))
    self.steps_per_epoch = maker.steps_per_epoch
    self.num_steps = None if num_epochs is None else num_epochs * maker.steps_per_epoch
    self.frame_counts = frame_counts
    self.maker = maker
    self.step = 0  # batches delivered, including before a restore
    self.counter = sources.BadFrameCounter(data_config.max_bad_frame_fraction)

  @property
  def epoch(self) -> int:
    """Epoch of the latest batch returned (0-based)."""
    return max(self.step - 1, 0) // self.steps_per_epoch

  @property
  def num_skipped(self) -> int:
    """Evaluation: frames left out as unreadable (their rows come as valid=False); training
    substitutes them instead (0)."""
    return 0 if self.maker.training else self.counter.bad

  @property
  def bad_frames(self) -> dict:
    """This process's reading counts since the first batch (resumes included)."""
    c = self.counter
    return {'read': c.read, 'bad': c.bad, 'last_path': c.last_path}

  def __next__(self) -> dict:
    batch = next(self._parent)
    if READ_KEY in batch:
      bad_rows = batch.pop(BAD_KEY)
      self.counter.add(batch.pop(READ_KEY),
                       [self.maker.index.image_path(int(r)) for r in bad_rows])
    self.step += 1
    return batch

  def get_state(self) -> dict:
    return {'step': self.step,
            'frames_read': self.counter.read, 'bad_frames': self.counter.bad,
            'steps_per_epoch': self.steps_per_epoch, 'global_batch_size': self.maker.global_batch}

  def set_state(self, state: dict) -> None:
    for key in ('steps_per_epoch', 'global_batch_size'):
      now = self.get_state()[key]
      if key in state and int(state[key]) != now:
        raise ValueError(f'cannot resume the input pipeline exactly: the saved state has '
                         f'{key}={state[key]}, this pipeline {now} (data, batch size or sampling '
                         'changed)')
    previous = self._parent
    self._parents = (self._start(int(state['step'])),)
    self._ctx = self._parent._ctx
    previous.close()
    self.step = int(state['step'])
    counts = [state.get(key, 0) for key in ('frames_read', 'bad_frames')]
    process = getattr(self.maker, 'process_index', 0)  # several processes: one entry each
    counts = [c[process] if isinstance(c, list) else c for c in counts]
    self.counter = sources.BadFrameCounter(self.counter.max_fraction, *counts)


def worker_count(data_config, platform: str | None = None, cores: int | None = None,
                 devices: int | None = None) -> int:
  """Grain worker processes of `data_config.worker_count`, resolving -1 (auto): none when the
  step runs on the CPU (workers would take its cores), else WORKERS_PER_DEVICE per local
  accelerator, within the host's cores less two (the main process and the device feed), at most
  32. Per process: with several processes on one host (one per GPU), each gets its own."""
  if data_config.worker_count >= 0:
    return int(data_config.worker_count)
  if platform is None or devices is None:
    import jax  # deferred: the pipeline itself never needs jax
    platform, devices = platform or jax.default_backend(), devices or jax.local_device_count()
  cores = cores or os.cpu_count() or 1
  return 0 if platform == 'cpu' else max(1, min(32, cores - 2, WORKERS_PER_DEVICE * devices))


def _lower_priority(nice: int, worker_index: int, worker_count: int) -> None:
  del worker_index, worker_count
  if nice > 0:
    os.nice(nice)


def _build(maker: BatchMaker, data_config, num_epochs: int | None, start: int):
  """grain: range(steps) -> repeat -> BatchMaker -> from batch `start` -> threads -> optional
  worker processes."""
  ds = grain.MapDataset.range(maker.steps_per_epoch).repeat(num_epochs)
  ds = ds.map_with_index(maker)[start:]
  ds = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=int(data_config.read_threads),
      prefetch_buffer_size=int(data_config.prefetch_buffer_size)))
  workers = worker_count(data_config)
  if workers > 0:
    if not flags.FLAGS.is_parsed():
      # grain reads its absl flags when starting workers; outside an absl app use defaults.
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=workers,
        per_worker_buffer_size=max(1, int(data_config.prefetch_buffer_size))),
        worker_init_fn=functools.partial(_lower_priority, int(data_config.worker_nice)))
  return iter(ds)


def check_batch(global_batch_size: int, process_index: int, process_count: int) -> None:
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f'global_batch_size={global_batch_size} must be a positive multiple of '
                     f'process_count={process_count}')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} not in [0, {process_count})')


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
                        num_epochs: int | None = None, source=None) -> AffectIterator:
  """Endless (or `num_epochs`) training batches of this process: dicts of NumPy arrays
  `image uint8 [B,H,W,3], expr int32 [B], au int32 [B,12], va float32 [B,2], valid bool [B],
  phase int32 [B], index int32 [B]` with B = global_batch_size // process_count."""
  check_batch(global_batch_size, process_index, process_count)
  tasks = labels.parse_tasks(data_config.tasks)
  groups = sampling.make_groups(index, tasks, data_config.sampling, data_config.phase_sets)
  if sampling.steps_per_epoch(groups, global_batch_size) == 0:
    raise ValueError(f'no complete batch of {global_batch_size} frames per epoch: frames per '
                     f'phase {groups.counts()}')
  maker = BatchMaker(source or sources.make_source(index, data_config), index, data_config,
                     global_batch_size=global_batch_size, process_index=process_index,
                     process_count=process_count, seed=seed, groups=groups)
  counts = sampling.frame_counts(index, tasks, groups)
  counts['steps_per_epoch'] = maker.steps_per_epoch
  _log_counts(f'train ({data_config.sampling})', counts)
  return AffectIterator(maker, data_config, num_epochs, counts)


def make_eval_iterator(index, data_config, *, global_batch_size: int, process_index: int = 0,
                       process_count: int = 1, source=None,
                       labelled_only: bool = True) -> AffectIterator:
  """One pass over every labelled frame (every frame, without `labelled_only`: prediction)
  exactly once, in index order, padded with `valid=False` rows to whole batches;
  `iterator.num_skipped` counts undecodable frames."""
  check_batch(global_batch_size, process_index, process_count)
  tasks = labels.parse_tasks(data_config.tasks)
  rows = sampling.eval_plan(index, tasks, global_batch_size, labelled_only)
  maker = BatchMaker(source or sources.make_source(index, data_config), index, data_config,
                     global_batch_size=global_batch_size, process_index=process_index,
                     process_count=process_count, eval_rows=rows)
  counts = (sampling.frame_counts(index, tasks) if labelled_only
            else {'frames': len(index), 'videos': len(index.video_names)})
  counts['steps'] = maker.steps_per_epoch
  _log_counts('eval' if labelled_only else 'all', counts)
  return AffectIterator(maker, data_config, 1, counts)
