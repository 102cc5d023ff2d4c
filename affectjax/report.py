"""Evaluation reports people can look at: the numbers of an evaluation's figures, and the figures.

`mode=eval` writes, next to `eval_<split>_<name>.json`, a folder `report_<split>_<name>/` with
`figures.json` (every number drawn) and PNG figures: the EXPR confusion matrix normalised per
true class, per-class EXPR F1 and per-AU F1 bars with their support, the valence-arousal density
of the labels beside that of the predictions, valence and arousal over time for the videos with
the most VA labels, and the training curves of WORKDIR/metrics.jsonl. The figures need
matplotlib (`pip install -e '.[report]'`); without it only `figures.json` is written. They are
also logged as images to TensorBoard (`<out>/tensorboard/eval`).
"""
import json
import os

import numpy as np

from affectjax import labels, predictions

VA_BINS = 40
TRACE_VIDEOS = 4
HEADLINE = ('score', 'expr_f1', 'au_f1', 'va_ccc')


def figure_numbers(eval_metrics: dict, rows, index, tasks: tuple, num_expr_classes: int,
                   records: list) -> dict:
  """The numbers behind every figure, from the eval metrics, the evaluation's (outputs, batch)
  rows (None: no VA figures), the frame index and metrics.jsonl's records."""
  out = {}
  if 'expr' in tasks:
    counts = np.asarray(eval_metrics['expr_confusion'], np.int64)
    support = counts.sum(axis=1)
    out['expr'] = {'classes': list(labels.expr_classes(num_expr_classes)),
                   'confusion': counts.tolist(),
                   'confusion_normalised': (counts / np.maximum(support, 1)[:, None]).tolist(),
                   'f1': list(eval_metrics['expr_f1_per_class']), 'support': support.tolist()}
  if 'au' in tasks:
    out['au'] = {'names': list(labels.AU_NAMES), 'f1': list(eval_metrics['au_f1_per_au']),
                 'support': list(eval_metrics['au_support'])}
  if 'va' in tasks and rows is not None:
    out['va'] = _va_numbers(rows, index)
  train = [r for r in records if r.get('split') == 'train' and 'loss' in r]
  val = [r for r in records if r.get('split') == 'validation']
  out['curves'] = {'train_step': [r['step'] for r in train],
                   'train_loss': [r['loss'] for r in train], 'val_step': [r['step'] for r in val],
                   **{f'val_{k}': [r.get(k) for r in val] for k in HEADLINE}}
  return out


def _va_numbers(rows, index) -> dict:
  """Densities of the VA labels and predictions, and traces of the best-labelled videos."""
  at, pred, label = [], [], []
  for outputs, batch in rows:
    keep = np.asarray(batch['valid'], bool) & labels.va_mask(np.asarray(batch['va'])).all(-1)
    at.append(np.asarray(batch['index'])[keep])
    pred.append(np.asarray(outputs['va'], np.float64)[keep])
    label.append(np.asarray(batch['va'], np.float64)[keep])
  at, pred, label = (np.concatenate(x) if x else np.zeros((0, 2)) for x in (at, pred, label))
  edges = np.linspace(-1, 1, VA_BINS + 1)
  density = {name: np.histogram2d(v[:, 0], v[:, 1], [edges, edges])[0].astype(int).tolist()
             for name, v in (('labels', label), ('predictions', predictions.clip_va(pred)))}
  video = np.asarray(index.video_id)[at.astype(np.int64)] if len(at) else np.zeros(0, int)
  traces = {}
  for v in np.argsort(-np.bincount(video, minlength=1), kind='stable')[:TRACE_VIDEOS]:
    mine = np.flatnonzero(video == v)
    if not mine.size:
      continue
    mine = mine[np.argsort(np.asarray(index.frame)[at[mine].astype(np.int64)])]
    traces[index.video_names[v]] = {
        'frame': np.asarray(index.frame)[at[mine].astype(np.int64)].tolist(),
        'valence': pred[mine, 0].tolist(), 'arousal': pred[mine, 1].tolist(),
        'valence_label': label[mine, 0].tolist(), 'arousal_label': label[mine, 1].tolist()}
  return {'edges': edges.tolist(), 'density': density, 'traces': traces, 'frames': len(at)}


def _plots(numbers: dict) -> dict:
  """{name: matplotlib Figure} of the numbers (matplotlib imported here: an optional extra)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel
  figures = {}
  if 'expr' in numbers:
    e = numbers['expr']
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    image = ax.imshow(np.asarray(e['confusion_normalised']), vmin=0, vmax=1, cmap='Blues')
    for (i, j), value in np.ndenumerate(np.asarray(e['confusion_normalised'])):
      ax.text(j, i, f'{value:.2f}', ha='center', va='center', fontsize=7,
              color='white' if value > 0.5 else 'black')
    ax.set(xticks=range(len(e['classes'])), yticks=range(len(e['classes'])),
           xlabel='predicted', ylabel='true', title='EXPR confusion (rows: true class, sum 1)')
    ax.set_xticklabels(e['classes'], rotation=45, ha='right')
    ax.set_yticklabels([f'{c} ({n})' for c, n in zip(e['classes'], e['support'])])
    fig.colorbar(image)
    figures['expr_confusion'] = fig
    figures['expr_f1'] = _bars(plt, e['classes'], e['f1'], e['support'], 'EXPR F1 per class')
  if 'au' in numbers:
    a = numbers['au']
    figures['au_f1'] = _bars(plt, a['names'], a['f1'], a['support'],
                             'AU F1 per AU (support: frames with the AU present)')
  if 'va' in numbers:
    v = numbers['va']
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5), sharey=True)
    for ax, name in zip(axes, ('labels', 'predictions')):
      ax.imshow(np.asarray(v['density'][name]).T, origin='lower', extent=(-1, 1, -1, 1),
                cmap='magma')
      ax.set(title=f'VA {name} ({v["frames"]} frames)', xlabel='valence', ylabel='arousal')
    figures['va_density'] = fig
    if v['traces']:
      fig, axes = plt.subplots(len(v['traces']), 1, figsize=(10, 2.4 * len(v['traces'])),
                               squeeze=False)
      for ax, (video, t) in zip(axes[:, 0], v['traces'].items()):
        for key, color in (('valence', 'tab:blue'), ('arousal', 'tab:red')):
          ax.plot(t['frame'], t[f'{key}_label'], color=color, lw=1, label=f'{key} label')
          ax.plot(t['frame'], t[key], color=color, lw=1, ls='--', label=f'{key} predicted')
        ax.set(title=video, ylim=(-1.05, 1.05), xlabel='frame')
      axes[0, 0].legend(ncol=4, fontsize=7)
      fig.tight_layout()
      figures['va_traces'] = fig
  c = numbers['curves']
  if c['train_step'] or c['val_step']:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(c['train_step'], c['train_loss'])
    left.set(title='training loss', xlabel='step')
    for key in HEADLINE:
      values = c[f'val_{key}']
      if any(x is not None for x in values):
        right.plot(c['val_step'], [np.nan if x is None else x for x in values], marker='o',
                   label=key)
    right.set(title='validation', xlabel='step')
    right.legend(fontsize=8)
    figures['training_curves'] = fig
  return figures


def _bars(plt, names, f1, support, title):
  fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(names)), 4))
  ax.bar(range(len(names)), f1)
  ax.set(xticks=range(len(names)), ylim=(0, 1), ylabel='F1', title=title)
  ax.set_xticklabels([f'{n}\n({s})' for n, s in zip(names, support)], fontsize=8)
  return fig


def write_report(folder: str, numbers: dict, tensorboard_dir: str | None = None,
                 step: int = 0) -> list:
  """Writes figures.json and, with matplotlib, one PNG per figure to `folder` (and the PNGs
  as TensorBoard images to `tensorboard_dir`); returns the paths written."""
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, 'figures.json')
  with open(path, 'w') as f:
    json.dump(numbers, f)
  written = [path]
  try:
    figures = _plots(numbers)
  except ImportError:
    print("  matplotlib is not installed: figures.json only (pip install -e '.[report]' for the "
          'PNG figures)', flush=True)
    return written
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel
  for name, fig in figures.items():
    png = os.path.join(folder, f'{name}.png')
    fig.savefig(png, dpi=100, bbox_inches='tight')
    plt.close(fig)
    written.append(png)
  if tensorboard_dir:
    _log_images(tensorboard_dir, written[1:], step)
  return written


def _log_images(tensorboard_dir: str, pngs: list, step: int) -> None:
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
  with SummaryWriter(tensorboard_dir) as writer:
    for png in pngs:
      image = np.asarray(Image.open(png).convert('RGB'))
      writer.add_image(os.path.splitext(os.path.basename(png))[0], image, step,
                       dataformats='HWC')
