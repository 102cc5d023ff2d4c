"""Data parallelism: a 1-D device mesh, pmap-style steps via jit(shard_map), global batches.

Per-device step code uses named-axis collectives (`lax.psum` over `DATA_AXIS`), as under
`pmap`; `data_parallel` wraps it as `jax.jit(jax.shard_map(...))`. State is replicated
(`P()`), batches are split along their leading axis (`P(DATA_AXIS)`). Arrays are global
`jax.Array`s, so Orbax and multi-host runs need no host-local conversions (see BUILD.md).
"""
import collections
import itertools
import queue as queue_lib
import threading
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'  # the mesh's one axis: the global batch is split along it


def is_main_process() -> bool:
  """Process 0 writes logs, metrics and files for the whole run."""
  return jax.process_index() == 0


def main_process_says(value: bool) -> bool:
  """`value` as process 0 has it, on every process (a decision only process 0 can take, such
  as holding the workdir lock, made the same everywhere so no process waits alone)."""
  if jax.process_count() == 1:
    return bool(value)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(multihost_utils.broadcast_one_to_all(np.int32(bool(value))))


def make_mesh(num_devices: int = 0) -> Mesh:
  """A 1-D mesh over all devices (or the first `num_devices` of a single process; naming every
  device is allowed with several processes)."""
  devices = jax.devices()
  if num_devices and num_devices != len(devices):
    if jax.process_count() > 1:
      raise ValueError(f'num_devices={num_devices} of {len(devices)}: only a single-process run '
                       'can be restricted to some devices')
    if num_devices > len(devices):
      raise ValueError(f'num_devices={num_devices} but only {len(devices)} devices exist')
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def data_parallel(step: Callable, mesh: Mesh, *, batch_out: bool = False,
                  donate_state: bool = False) -> Callable:
  """jit(shard_map(step)) for `step(state, batch) -> out`: state replicated, batch split.

  `batch_out=True` keeps outputs split along the batch (inference); otherwise outputs are
  replicated (device-invariant values: the new state and psum'd metrics).
  """
  out_specs = P(DATA_AXIS) if batch_out else P()
  sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(DATA_AXIS)), out_specs=out_specs)
  return jax.jit(sharded, donate_argnums=(0,) if donate_state else ())


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict:
  """This process's share of the global batch -> global arrays split over the mesh."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def prefetch_to_mesh(batches: Iterator[Mapping[str, np.ndarray]], mesh: Mesh, size: int = 2,
                     state_fn: Callable[[], Any] | None = None, threaded: bool = False,
                     join_seconds: float = 30.0) -> Iterator[tuple[dict, Any]]:
  """Keeps `size` batches in flight to the devices (transfers are asynchronous).

  Yields `(global_batch, input_state)` where `input_state = state_fn()` was taken right after
  that batch was read, so a checkpoint saved after consuming the batch resumes exactly after
  it even though later batches were already read ahead.

  `threaded=True` reads the batches and starts their transfers on a thread of its own (`size`
  batches wait in its queue, one more in its hands), so the thread that dispatches the steps
  only takes them; an error there is raised here, after the batches read before it (without
  the thread, up to `size - 1` of those are never yielded). Close the generator to stop that
  thread: closing waits up to `join_seconds` for a read in progress to end, then leaves it
  to finish on its own (a daemon thread, which may still call `state_fn` and start that one
  batch's transfer), with a warning. (grain's `experimental.device_put` would
  `jax.device_put` each process's share as if it were the whole batch, and it wraps a grain
  dataset, not the training iterator whose state holds the reading counts.)
  """
  if size < 1:
    raise ValueError(f'prefetch_to_mesh: size={size}, must be >= 1')

  def read():
    for batch in batches:
      yield global_batch(batch, mesh), state_fn() if state_fn else None

  return _in_thread(read(), size, join_seconds) if threaded else _ahead(read(), size)


def _ahead(items: Iterator, size: int) -> Iterator:
  """`items`, `size` of them read ahead of the one yielded."""
  queue = collections.deque(itertools.islice(items, size))
  while queue:
    yield queue.popleft()
    queue.extend(itertools.islice(items, 1))


def _in_thread(items: Iterator, size: int, join_seconds: float) -> Iterator:
  """`items`, read on a daemon thread into a queue of `size`."""
  ready, stop, done = queue_lib.Queue(maxsize=size), threading.Event(), object()

  def put(item) -> bool:
    while not stop.is_set():
      try:
        ready.put(item, timeout=0.05)
        return True
      except queue_lib.Full:
        pass
    return False

  def work():
    try:
      for item in items:
        if not put(item):
          return
      put(done)
    except BaseException as e:  # pylint: disable=broad-except  # raised in the consumer
      put(e)

  thread = threading.Thread(target=work, name='prefetch_to_mesh', daemon=True)
  thread.start()
  try:
    while (item := ready.get()) is not done:
      if isinstance(item, BaseException):  # the items are (batch, state) pairs
        raise item
      yield item
  finally:
    stop.set()
    thread.join(join_seconds)
    if thread.is_alive():  # e.g. a read from stalled storage
      logging.warning('prefetch_to_mesh: the reading thread is still in a read after %g s; '
                      'left to finish on its own', join_seconds)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a host or device pytree replicated on every device of the mesh."""
  return jax.device_put(tree, replicated(mesh))
