"""The iterator over a pipeline's batches (`AffectIterator`) and the grain dataset behind it.

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
from absl import flags

from affectjax.data import sources

# Auto worker processes per accelerator. On an H200 (ResNet50, 112 px, batch 256, ~17,900 img/s)
# 4 JPEG workers kept 0.945 of the bare step; 14 kept 0.72-0.83, their bursts delaying the
# process that dispatches the steps (docs/benchmarks.md, "Accelerator check").
WORKERS_PER_DEVICE = 4
READ_KEY, BAD_KEY = 'frames_read', 'bad_rows'  # host-only batch entries, removed by the iterator


class AffectIterator(grain.DatasetIterator):
  """Wraps grain's iterator: counts steps (`epoch` of the latest batch), and for evaluation the
  frames skipped as undecodable.

  The state is the number of batches delivered (`{'step', ...}`, JSON-compatible, so grain's
  Orbax handler `grain.checkpoint.CheckpointSave/CheckpointRestore` saves it too): every batch
  is a function of its number, so `set_state` restarts grain at that batch. The state thus
  does not depend on `worker_count`, `read_threads` or `process_count`.
  """

  def __init__(self, maker, data_config, num_epochs: int | None,
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
    self.counter = sources.BadFrameCounter(self.counter.max_fraction, *(
        _share(state.get(key, 0), getattr(self.maker, 'process_index', 0),
               getattr(self.maker, 'process_count', 1)) for key in ('frames_read', 'bad_frames')))


def _share(saved, process: int, processes: int) -> int:
  """This process's part of a saved reading count: its own entry where the state was saved by
  as many processes (one entry each); else the total, all of it on process 0 (a resume on
  another number of processes keeps the run's total, not a share or a multiple of it)."""
  if isinstance(saved, list):
    if len(saved) == processes:
      return int(saved[process])
    saved = sum(saved)
  return int(saved) if process == 0 else 0


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


def _build(maker, data_config, num_epochs: int | None, start: int):
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
