"""Training progress accounting (affectjax.logs)."""
import pytest

from affectjax import logs


def test_progress_counts_the_time_spent_waiting_for_batches(monkeypatch):
  clock = [0.0]
  monkeypatch.setattr(logs.time, 'perf_counter', lambda: clock[0])

  def batches():  # each batch takes 1 s to arrive
    for i in range(4):
      clock[0] += 1.0
      yield i

  progress = logs.Progress(total_steps=4, initial_step=0, batch_size=8, enabled=False)
  for _ in progress.timed(batches()):
    clock[0] += 3.0  # the step
  progress.update(4, {'loss': 0.5})
  assert progress.input_wait_fraction == pytest.approx(0.25)  # 4 s of 16
  assert progress.images_per_second == pytest.approx(4 * 8 / 16)
