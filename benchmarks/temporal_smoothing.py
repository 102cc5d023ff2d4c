"""Does time carry signal that a frame model misses? Its predictions averaged over past frames.

  python benchmarks/temporal_smoothing.py runs/demo/features [more features folders]

Reads the evaluation split of one or more features folders (`mode=features` or `mode=oof`:
`<folder>/validation/predictions.npy`, the frame model's EXPR probabilities, AU probabilities
and valence-arousal per frame, with `index.npz`'s labels) and scores the per-frame predictions
after a moving average within each video (`metrics.smooth_per_video`, counting rows as the
temporal models do) over the last W frames (causal: what a GRU or LSTM can see) and over W
frames centred on the frame (what a Transformer over a segment sees). No
training: if averaging over the past raises a metric, labels there depend on frames before
the one shown, and a temporal model has something to learn. Prints a markdown table per folder.
"""
import argparse
import json
import os

import numpy as np

from affectjax import labels, metrics


def scores(folder: str, windows: tuple) -> list:
  split = os.path.join(folder, 'validation')
  predictions = np.load(os.path.join(split, 'predictions.npy')).astype(np.float64)
  with open(os.path.join(split, 'meta.json')) as f:
    tasks = json.load(f)['tasks']
  tasks = tasks.split(',') if isinstance(tasks, str) else list(tasks)
  index = np.load(os.path.join(split, 'index.npz'))
  classes = predictions.shape[1] - labels.NUM_AUS * ('au' in tasks) - 2 * ('va' in tasks)
  expr, au, va = index['expr'], index['au'], index['va']
  has_expr, has_au, has_va = expr >= 0, (au >= 0).all(1), (va > -5).all(1)
  rows = []
  for causal in (True, False):
    for window in windows:
      p = metrics.smooth_per_video(predictions, index['video_id'], window, causal=causal)
      row = {'window': window, 'causal': causal}
      if 'expr' in tasks:
        row['EXPR F1'] = metrics.expr_metrics(p[has_expr, :classes].argmax(1), expr[has_expr],
                                              classes)['expr_f1']
      if 'au' in tasks:
        row['AU F1'] = metrics.au_metrics(p[has_au, classes:classes + labels.NUM_AUS],
                                          au[has_au])['au_f1']
      if 'va' in tasks:
        row['VA CCC'] = metrics.va_metrics(p[has_va, -2:], va[has_va])['va_ccc']
      rows.append(row)
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('folders', nargs='+', help='features folders (with validation/)')
  parser.add_argument('--windows', default='1,5,9,15,25,41',
                      help='comma-separated window lengths in frames (1: the frame alone)')
  args = parser.parse_args()
  windows = tuple(int(w) for w in args.windows.split(','))
  for folder in args.folders:
    rows = scores(folder, windows)
    names = [k for k in rows[0] if k not in ('window', 'causal')]
    print(f'\n{folder}/validation\n')
    print('| window | ' + ' | '.join(names) + ' |')
    print('|---' * (len(names) + 1) + '|')
    for row in rows:
      if row['window'] == 1 and not row['causal']:
        continue  # the same as the causal row of 1
      where = 'the frame alone' if row['window'] == 1 else (
          f"last {row['window']}" if row['causal'] else f"centred {row['window']}")
      print(f'| {where} | ' + ' | '.join(f'{row[n]:.3f}' for n in names) + ' |')
  print(f'\nScored {len(args.folders)} features folder(s) at {len(windows)} window lengths, '
        'causal and centred.')


if __name__ == '__main__':
  main()
