"""parallel.prefetch_to_mesh: read ahead in the caller's thread or on a thread of its own, the
same batches and input states in the same order either way."""
import threading

import numpy as np
import pytest

from affectjax import parallel


class Source:
  """A batch iterator with a state, as the grain iterator has: the count of batches read."""

  def __init__(self, n, fail_at=None):
    self.n, self.fail_at, self.read = n, fail_at, 0

  def __iter__(self):
    return self

  def __next__(self):
    if self.read == self.fail_at:
      raise ValueError(f'frame {self.read}.jpg: unreadable')
    if self.read >= self.n:
      raise StopIteration
    self.read += 1
    return {'image': np.full((8, 2), self.read, np.float32), 'id': np.arange(8) + 8 * self.read}

  def get_state(self):
    return {'read': self.read}


def _reader_threads():
  return [t for t in threading.enumerate() if t.name == 'prefetch_to_mesh']


@pytest.mark.parametrize('size', [1, 3])
def test_a_thread_gives_the_same_batches_and_states_in_order(size):
  mesh = parallel.make_mesh()
  out = {}
  for threaded in (False, True):
    source = Source(7)
    out[threaded] = [(np.asarray(b['image']), np.asarray(b['id']), s) for b, s in
                     parallel.prefetch_to_mesh(source, mesh, size, source.get_state, threaded)]
  assert len(out[True]) == len(out[False]) == 7
  for (image, ids, state), (image_t, ids_t, state_t) in zip(out[False], out[True]):
    np.testing.assert_array_equal(image_t, image)
    np.testing.assert_array_equal(ids_t, ids)
    assert state_t == state
  # Each state is the source's right after its own batch, not after the batches read ahead.
  assert [s['read'] for _, _, s in out[True]] == list(range(1, 8))
  assert [float(i[0, 0]) for i, _, _ in out[True]] == list(range(1, 8))
  assert not _reader_threads()


@pytest.mark.parametrize('threaded', [False, True])
def test_the_readers_error_is_raised_in_the_consumer(threaded):
  source = Source(10, fail_at=4)
  got = []
  with pytest.raises(ValueError, match=r'frame 4\.jpg: unreadable'):
    for _, state in parallel.prefetch_to_mesh(source, parallel.make_mesh(), 2,
                                              source.get_state, threaded):
      got.append(state['read'])
  # The thread hands over every batch read before the error; without it, the read that fails
  # comes while size - 1 read batches still wait (BUILD.md says so).
  assert got == ([1, 2, 3, 4] if threaded else [1, 2, 3])
  assert not _reader_threads()


def test_a_size_below_one_is_refused():
  with pytest.raises(ValueError, match='size=0, must be >= 1'):
    parallel.prefetch_to_mesh(Source(3), parallel.make_mesh(), 0, threaded=True)


def test_closing_early_stops_the_thread_and_reads_at_most_size_plus_two():
  source = Source(1000)
  batches = parallel.prefetch_to_mesh(source, parallel.make_mesh(), 2, source.get_state,
                                      threaded=True)
  _, state = next(batches)
  assert state == {'read': 1}
  batches.close()
  assert not _reader_threads()
  # 1 consumed, 2 in the queue, 1 in the thread's hands when it saw the stop.
  assert source.read <= 4


def test_closing_while_a_read_hangs_returns_after_the_wait_and_warns(monkeypatch):
  """A read stuck in storage does not hold up the end of a run: closing waits `join_seconds`,
  warns, and leaves the (daemon) thread to finish its read."""
  stalled, release = threading.Event(), threading.Event()

  class Stalling(Source):
    def __next__(self):
      if self.read == 2:
        stalled.set()
        release.wait(30)
      return super().__next__()

  source = Stalling(10)
  batches = parallel.prefetch_to_mesh(source, parallel.make_mesh(), 1, source.get_state,
                                      threaded=True, join_seconds=0.2)
  warned = []
  monkeypatch.setattr(parallel.logging, 'warning', lambda *args: warned.append(args[0] % args[1:]))
  try:
    assert next(batches)[1] == {'read': 1}
    assert stalled.wait(10)  # the thread is in its third read
    batches.close()
    assert warned == ['prefetch_to_mesh: the reading thread is still in a read after 0.2 s; '
                      'left to finish on its own'] and _reader_threads()
  finally:
    release.set()  # the read ends; the thread sees the stop and ends
    batches.close()
  for thread in _reader_threads():
    thread.join(5)
  assert not _reader_threads() and source.read == 3
