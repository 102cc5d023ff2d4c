"""Run records: `metrics.jsonl`, TensorBoard event files (tensorboardX, no TensorFlow), a progress bar.

Only process 0 writes; other processes get a writer that does nothing.
"""
import json
import os
import socket
import time
from typing import Iterator, Mapping

import numpy as np
from absl import logging


def _scalar_items(metrics: Mapping) -> dict:
  """The scalar entries of `metrics` as Python floats (lists such as confusion matrices skipped)."""
  out = {}
  for k, v in metrics.items():
    if np.ndim(v) == 0:
      out[k] = float(v)
  return out


RESUME_SPLIT = 'resume'  # metrics.jsonl: the marker row of a resumed run


def read_records(path: str) -> list:
  """The rows of a metrics.jsonl; a last line cut short by a killed process is left out."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = f.read().splitlines()
  records = []
  for number, line in enumerate(lines, 1):
    try:
      records.append(json.loads(line))
    except ValueError:
      if number < len(lines):  # e.g. a row cut short by a full disk, then appended to
        logging.warning('%s, line %d: not a JSON record; left out', path, number)
  return records


class RunWriter:
  """Writes `WORKDIR/metrics.jsonl` (every record, lists included) and TensorBoard scalars.

  A run resumed from the checkpoint of `resume_step` first drops the rows of the steps after
  it (written by the interrupted run, then trained again) and writes a marker row
  `{'step': resume_step, 'split': 'resume', 'superseded_rows': n}`; TensorBoard drops those
  steps' events too (`purge_step`). So each step has one row per split, that of the run whose
  weights continue.
  """

  def __init__(self, workdir: str, enabled: bool = True, resume_step: int | None = None):
    self.enabled = enabled
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      purge_step = None
      if resume_step is not None or os.path.exists(self.path):  # (killed before a checkpoint)
        self._truncate_after(int(resume_step or 0))
        purge_step = int(resume_step or 0) + 1
      from tensorboardX import SummaryWriter  # deferred: heavy import
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'), purge_step=purge_step)

  def _truncate_after(self, step: int) -> None:
    records = read_records(self.path)
    kept = [r for r in records if r['step'] <= step]
    kept.append({'step': step, 'split': RESUME_SPLIT, 'time': time.time(),
                 'superseded_rows': len(records) - len(kept)})
    tmp = f'{self.path}.tmp-{socket.gethostname()}-{os.getpid()}'  # as affectjax.files names
    try:
      with open(tmp, 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in kept)
      os.replace(tmp, self.path)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)

  def write(self, step: int, split: str, metrics: Mapping):
    """Appends one record `{'step', 'split', 'time', **metrics}` and the scalars to TensorBoard."""
    if not self.enabled:
      return
    record = {'step': int(step), 'split': split, 'time': time.time()}
    record.update({k: (v.tolist() if isinstance(v, np.ndarray) else v)
                   for k, v in metrics.items()})
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    for k, v in _scalar_items(metrics).items():
      self._tb.add_scalar(f'{split}/{k}', v, int(step))
    self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()


class Progress:
  """A tqdm bar over training steps showing loss, img/s and ETA; plain log lines when disabled."""

  def __init__(self, total_steps: int, initial_step: int, batch_size: int, enabled: bool):
    self.batch_size = batch_size
    self._bar = None
    self._last = (initial_step, time.perf_counter())
    self.images_per_second = float('nan')
    self.input_wait_fraction = float('nan')  # of the interval spent waiting for batches
    self._waited = 0.0
    if enabled:
      from tqdm import tqdm
      self._bar = tqdm(total=total_steps, initial=initial_step, unit='step', dynamic_ncols=True,
                       desc='train')

  def update(self, step: int, summary: Mapping):
    """Called at logging steps with the averaged metrics of the interval."""
    last_step, last_time = self._last
    now = time.perf_counter()
    if step > last_step:
      self.images_per_second = (step - last_step) * self.batch_size / (now - last_time)
      self.input_wait_fraction = min(self._waited / (now - last_time), 1.0)
    self._last, self._waited = (step, now), 0.0
    text = {'loss': f"{summary.get('loss', float('nan')):.4f}",
            'img/s': f'{self.images_per_second:.0f}',
            'input wait': f'{self.input_wait_fraction:.0%}'}
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
      self._bar.set_postfix(text, refresh=False)
    else:
      logging.info('step %d: %s', step, ', '.join(f'{k} {v}' for k, v in text.items()))

  def timed(self, batches: Iterator) -> Iterator:
    """`batches`, adding the time spent waiting for each to the interval's input wait (a
    training loop that waits for its input leaves the devices idle)."""
    batches = iter(batches)
    while True:
      start = time.perf_counter()
      try:
        item = next(batches)
      except StopIteration:
        return
      self._waited += time.perf_counter() - start
      yield item

  def exclude(self, seconds: float):
    """Leaves `seconds` (an evaluation) out of the current interval's images/s."""
    last_step, last_time = self._last
    self._last = (last_step, last_time + seconds)

  def write(self, line: str):
    if self._bar is not None:
      self._bar.write(line)
    else:
      print(line, flush=True)

  def close(self):
    if self._bar is not None:
      self._bar.close()


def format_bytes(n: float) -> str:
  """A size in readable units: 512 B, 3.4 KB, 56.1 MB, 7.20 GB (powers of 1000, as `df -H`)."""
  n = float(n)
  for unit, scale in (('TB', 1e12), ('GB', 1e9), ('MB', 1e6), ('KB', 1e3)):
    if abs(n) >= scale:
      value = n / scale
      return f'{value:.2f} {unit}' if unit in ('TB', 'GB') else f'{value:.1f} {unit}'
  return f'{int(n)} B'


def format_metrics(metrics: Mapping, keys=None) -> str:
  """'expr_f1 0.712  au_f1 0.603 ...' for the scalar metrics (all or `keys`)."""
  scalars = _scalar_items(metrics)
  keys = [k for k in (keys or scalars) if k in scalars]
  return '  '.join(f'{k} {scalars[k]:.4f}' for k in keys)
