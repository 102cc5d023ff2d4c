"""Shared benchmark helpers: interleaved A/B timing after warm-up, medians, paired ratios, tables.

The development machines are shared, so absolute times drift; candidates are timed in turn within
each repetition (rotating which goes first) and compared through ratios taken inside the same
repetition, which cancels most of the drift.
"""
import shlex
import statistics
import sys
import time
from typing import Callable, Mapping, Sequence


def named_settings(specs: Sequence[str]) -> dict:
  """{name: {field: value}} of 'NAME:field=value,...' command-line variants (values read as
  Python literals, as `--set` of affectjax.ablate reads them)."""
  from affectjax import ablate  # pylint: disable=import-outside-toplevel
  return {name: ablate.parse_settings(s for s in settings.split(',') if s)
          for name, _, settings in (spec.partition(':') for spec in specs)}


def command_line() -> str:
  """The command that is running, for pasting next to its results."""
  return 'python ' + ' '.join(shlex.quote(a) for a in sys.argv)


def interleaved_times(runs: Mapping[str, Callable[[], None]], reps: int,
                      warmup: int = 1) -> tuple:
  """Wall and process-CPU seconds per call of each blocking callable, interleaved.

  Each candidate gets `warmup` untimed calls, then round r calls the candidates in order rotated
  by r (A B C, B C A, ...), so none always runs first. Each callable must block until its work is
  done (for JAX, `jax.block_until_ready` on its outputs). CPU time (all threads of this process)
  drifts less than wall time when other processes share the cores, but it also counts the
  spinning of idle worker threads. Returns ({name: [wall s] * reps}, {name: [cpu s] * reps}).
  """
  names = list(runs)
  for name in names:
    for _ in range(warmup):
      runs[name]()
  wall, cpu = {name: [] for name in names}, {name: [] for name in names}
  for r in range(reps):
    shift = r % len(names)
    for name in names[shift:] + names[:shift]:
      start, start_cpu = time.perf_counter(), time.process_time()
      runs[name]()
      wall[name].append(time.perf_counter() - start)
      cpu[name].append(time.process_time() - start_cpu)
  return wall, cpu


def paired_ratio(times: Mapping[str, Sequence[float]], name: str, reference: str) -> float:
  """Median over rounds of throughput(name) / throughput(reference) within the same round."""
  return statistics.median(t_ref / t for t, t_ref in zip(times[name], times[reference]))


def format_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
  """A Markdown table (pastes into docs/benchmarks.md and reads well in a terminal)."""
  cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
  widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
  line = lambda row: '| ' + ' | '.join(c.ljust(w) for c, w in zip(row, widths)) + ' |'
  rule = '|' + '|'.join('-' * (w + 2) for w in widths) + '|'
  return '\n'.join([line(cells[0]), rule] + [line(row) for row in cells[1:]])
