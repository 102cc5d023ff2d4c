"""A published ablation table in one command: every row (a named config with overrides), over
several seeds, resumable, with the paper's figures beside ours.

  python -m affectjax.ablate --table=configs/ablations/method3.py:demo --workdir=runs/method3

A table file (configs/ablations/*.py) has `get_table(variant)` returning a dict: `title`,
`metrics` (the columns, metric names of the eval JSON), `seeds`, and `rows`, each a dict with
`name`, `config` (a config file and variant words, `configs/unitask.py:va`; the table's variant,
`demo` or `test`, is appended), optional `overrides` ({'loss.expr': 'ce'}), `paper` ({metric:
the paper's figure}), `features_of` (a row whose run's per-frame features this temporal row
trains on, same seed: extracted once into that run's folder) and `init_from` (a row whose run
this one starts from, same seed). A row whose overrides set `mode: 'oof'` trains out-of-fold
feature runs (affectjax.oof) and reports its full run; a row naming it in `features_of` trains
on those features. A row that another needs runs first even when --rows leaves it out. Every row runs on the real Aff-Wild2 with
`--root=/data/affwild2` (data.root of every row).

Each (row, seed) trains in WORKDIR/<row>/seed<seed> like any run (an interrupted one resumes);
a finished one is evaluated once more for its report (`mode=eval`: figures and predictions in
its folder; an oof row's in FOLDER/full), leaves `result.json` and is not run again. At the end (also after every run)
WORKDIR/table.md has the mean and the standard deviation of each metric (the final
evaluation's, and the best score) over every seed that has finished (also those of earlier
calls with other --seeds), the paper's figure beside it, and each seed's value; and
WORKDIR/results.json every number.
"""
import ast
import json
import os
import re

import numpy as np
from absl import app
from absl import flags

from affectjax import config as config_lib
from affectjax import files, inference, logs, oof, trainer

FLAGS = flags.FLAGS
flags.DEFINE_string('table', None, 'Ablation table file (configs/ablations/<table>.py[:variant]).')
flags.DEFINE_string('workdir', None, 'Folder of the table: one run per row and seed.')
flags.DEFINE_string('root', '', 'Aff-Wild2 root for every row (default: the synthetic set).')
flags.DEFINE_string('rows', '', 'Comma-separated row names to run (default: every row).')
flags.DEFINE_string('seeds', '', 'Comma-separated seeds (default: the table\'s).')
flags.DEFINE_multi_string('set', [], 'field=value set in every row\'s config (after the row\'s '
                          'overrides), e.g. --set=num_epochs=5.')


def load_table(spec: str) -> dict:
  """The table of `path.py[:variant]` (get_table(variant)), checked: unique row names, and
  `features_of` / `init_from` naming an earlier row."""
  path, _, variant = spec.partition(':')
  table = config_lib.load_config_file(spec, 'get_table')
  seen = set()
  for row in table['rows']:
    for key in ('features_of', 'init_from'):
      if row.get(key) and row[key] not in seen:
        raise config_lib.ConfigError(f'{path}: row {row["name"]}: {key}={row[key]!r} names no '
                                     f'earlier row ({", ".join(sorted(seen)) or "none"})')
    if row['name'] in seen:
      raise config_lib.ConfigError(f'{path}: two rows named {row["name"]!r}')
    seen.add(row['name'])
  table['variant'] = variant
  # Row configs are paths from the repository root (the table file's folder's parent's parent).
  table['base'] = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(path))))
  return table


def parse_settings(settings) -> dict:
  """{field: value} of `field=value` strings (values read as Python literals, else text)."""
  out = {}
  for setting in settings:
    field, sep, text = setting.partition('=')
    if not sep:
      raise config_lib.ConfigError(f'--set={setting}: expected field=value')
    try:
      out[field] = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      out[field] = text
  return out


def row_config(table: dict, row: dict, seed: int, workdir: str, root: str = '',
               settings: dict | None = None):
  """The config of one (row, seed) of `table` in the table folder `workdir`."""
  spec = os.path.join(table.get('base', ''), row['config'])
  if table['variant']:
    spec += (',' if ':' in row['config'] else ':') + table['variant']
  c = config_lib.load_config_file(spec)
  c.update_from_flattened_dict({**row.get('overrides', {}), **(settings or {})})
  c.seed = seed
  if root:
    c.data.root = root
  if row.get('init_from'):
    c.init_from = run_dir(workdir, row['init_from'], seed)
  if row.get('features_of'):
    c.temporal.features_dir = os.path.join(run_dir(workdir, row['features_of'], seed),
                                           'features')
  return c


def run_dir(workdir: str, name: str, seed: int) -> str:
  return os.path.join(workdir, name, f'seed{seed}')


def _result_path(workdir: str, name: str, seed: int) -> str:
  return os.path.join(run_dir(workdir, name, seed), 'result.json')


def run_table(table: dict, workdir: str, *, root: str = '', rows=None, seeds=None,
              settings: dict | None = None) -> dict:
  """Runs every missing (row, seed) of `table` in order; returns the results (`summarise`)."""
  seeds = list(seeds or table['seeds'])
  chosen = [r for r in table['rows'] if not rows or r['name'] in rows]
  todo = [(r, s) for r in chosen for s in seeds]
  for n, (row, seed) in enumerate(todo, 1):
    _run_row(table, row, seed, workdir, root, settings,
             f'[ablate] {n}/{len(todo)} {row["name"]} seed {seed}')
    write_outputs(table, workdir)
  return write_outputs(table, workdir)


def _run_row(table, row, seed, workdir, root, settings, where) -> None:
  """Trains (row, seed) unless its result.json exists, evaluates it once for its report and
  writes the result. The rows it needs (`features_of`, `init_from`) run first. A row with
  mode=oof gives its folder's `features` from fold runs (affectjax.oof); its metrics and report
  are those of its full run (FOLDER/full)."""
  folder = run_dir(workdir, row['name'], seed)
  if os.path.exists(_result_path(workdir, row['name'], seed)):
    print(f'{where}: finished before, not run again', flush=True)
    return
  for key in ('features_of', 'init_from'):
    if row.get(key) and not os.path.exists(_result_path(workdir, row[key], seed)):
      _run_row(table, _row_named(table, row[key]), seed, workdir, root, settings,
               f'{where}: first {row[key]}')
  config = row_config(table, row, seed, workdir, root, settings)
  if row.get('features_of'):
    _ensure_features(table, _row_named(table, row['features_of']), seed, workdir, root,
                     settings, config)
  config_lib.check_config(config)
  print(f'{where}: training in {folder}', flush=True)
  if config.mode == 'oof':
    summary, evaluated = oof.run_oof(config, folder)['summary'], os.path.join(folder, 'full')
  else:
    summary, evaluated = trainer.train_and_evaluate(config, folder), folder
  if summary['stop_reason'] != 'finished':
    raise RuntimeError(f'{where}: {summary["stop_reason"]}; run the table again to resume')
  config.mode, config.eval_checkpoint = 'eval', 'latest'  # its report: figures of the row
  final = inference.evaluate_checkpoint(config, evaluated)
  # A run resumed after it had finished trains and evaluates nothing: the evaluation above
  # (the same checkpoint) and metrics.jsonl give its figures.
  metrics = summary['final_metrics'] or final or {}
  result = {k: v for k, v in metrics.items() if np.ndim(v) == 0}
  result['best_score'] = summary['best_score']
  if not np.isfinite(result['best_score']):
    scores = [r['score'] for r in logs.read_records(os.path.join(evaluated, 'metrics.jsonl'))
              if r.get('split') == config.eval_split and 'score' in r]
    result['best_score'] = max(scores, default=float('nan'))
  os.makedirs(folder, exist_ok=True)
  with files.atomic_write(_result_path(workdir, row['name'], seed)) as f:
    json.dump(result, f, indent=1)


def _row_named(table: dict, name: str) -> dict:
  return next(r for r in table['rows'] if r['name'] == name)


def _ensure_features(table, row, seed, workdir, root, settings, reader) -> None:
  """The per-frame features of `row`'s finished run of `seed` that the config `reader` reads:
  extracted into its folder (mode=features; an oof row's fold runs and full run again) unless
  every split it reads is there, with the predictions where it reads those."""
  folder = run_dir(workdir, row['name'], seed)
  needed = ['meta.json'] + ['predictions.npy'] * (reader.temporal.get('inputs') == 'predictions')
  if all(os.path.exists(os.path.join(folder, 'features', split, name))
         for split in ('train', reader.eval_split) for name in needed):
    return
  config = row_config(table, row, seed, workdir, root, settings)
  print(f'[ablate] extracting the features of {row["name"]} seed {seed} into '
        f'{os.path.join(folder, "features")}', flush=True)
  if config.mode == 'oof':  # its runs have finished: they extract again
    oof.run_oof(config, folder)
  else:
    config.mode = 'features'
    inference.extract_features(config, folder)


def finished_seeds(workdir: str, name: str) -> list:
  """The seeds of row `name` with a result in `workdir` (whichever --seeds ran them)."""
  folder = os.path.join(workdir, name)
  found = [re.fullmatch(r'seed(-?\d+)', entry) for entry in
           (os.listdir(folder) if os.path.isdir(folder) else ())]
  return sorted(int(m.group(1)) for m in found
                if m and os.path.exists(_result_path(workdir, name, int(m.group(1)))))


def summarise(table: dict, workdir: str) -> dict:
  """{row: {metric: {'mean', 'std', 'n', 'values', 'seeds', 'paper'}}} over every finished
  seed of each row."""
  out = {}
  for row in table['rows']:
    seeds = finished_seeds(workdir, row['name'])
    results = [json.load(open(_result_path(workdir, row['name'], s))) for s in seeds]
    cells = {}
    for metric in list(table['metrics']) + ['best_score']:
      pairs = [(s, r[metric]) for s, r in zip(seeds, results) if metric in r]
      values = [v for _, v in pairs]
      cells[metric] = {'values': values, 'seeds': [s for s, _ in pairs], 'n': len(values),
                       'mean': float(np.mean(values)) if values else None,
                       'std': float(np.std(values, ddof=1)) if len(values) > 1 else None,
                       'paper': row.get('paper', {}).get(metric)}
    out[row['name']] = cells
  return out


def format_table(table: dict, summary: dict) -> str:
  """Markdown: a row per table row, per metric ours (mean ± std, n) and the paper's figure;
  then each seed's value of every metric."""
  metrics = list(table['metrics']) + ['best_score']
  head = ['row'] + [h for m in metrics for h in ((m,) if m == 'best_score' else (m, 'paper'))]
  lines = [f'# {table["title"]}', '', '| ' + ' | '.join(head) + ' |',
           '|' + '---|' * len(head)]
  for name, cells in summary.items():
    parts = [name]
    for m in metrics:
      c = cells[m]
      ours = '-' if c['mean'] is None else (
          f'{c["mean"]:.3f}' + (f' ± {c["std"]:.3f}' if c['std'] is not None else '') +
          f' ({c["n"]})')
      paper = '' if m == 'best_score' else ' | ' + ('-' if c['paper'] is None
                                                     else f'{c["paper"]:.3f}')
      parts.append(ours + paper)
    lines.append('| ' + ' | '.join(parts) + ' |')
  seeds = sorted({s for cells in summary.values() for c in cells.values() for s in c['seeds']})
  lines += ['', f'Per seed ({", ".join(map(str, seeds))}; - where that seed has not run):', '',
            '| row | ' + ' | '.join(metrics) + ' |', '|' + '---|' * (len(metrics) + 1)]
  for name, cells in summary.items():
    per = []
    for m in metrics:
      by_seed = dict(zip(cells[m]['seeds'], cells[m]['values']))
      per.append(', '.join(f'{by_seed[s]:.3f}' if s in by_seed else '-' for s in seeds))
    lines.append(f'| {name} | ' + ' | '.join(per) + ' |')
  return '\n'.join(lines) + '\n'


def write_outputs(table: dict, workdir: str) -> dict:
  """WORKDIR/results.json and table.md of every finished (row, seed); returns the summary."""
  summary = summarise(table, workdir)
  os.makedirs(workdir, exist_ok=True)
  with files.atomic_write(os.path.join(workdir, 'results.json')) as f:
    json.dump({'title': table['title'], 'rows': summary}, f, indent=1)
  with files.atomic_write(os.path.join(workdir, 'table.md')) as f:
    f.write(format_table(table, summary))
  return summary


def main(argv):
  del argv
  table = load_table(FLAGS.table)
  seeds = [int(s) for s in FLAGS.seeds.split(',')] if FLAGS.seeds else None
  rows = [r for r in FLAGS.rows.split(',') if r] or None
  summary = run_table(table, FLAGS.workdir, root=FLAGS.root, rows=rows, seeds=seeds,
                      settings=parse_settings(FLAGS.set))
  done = sum(c['best_score']['n'] for c in summary.values())
  print(f'{table["title"]}: {done} runs finished; wrote {FLAGS.workdir}/table.md and '
        f'results.json\n' + format_table(table, summary), flush=True)


if __name__ == '__main__':
  flags.mark_flags_as_required(['table', 'workdir'])
  app.run(main)
