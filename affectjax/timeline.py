"""A video's per-frame affect as a table and as plots (what `affectjax.analyze` writes per face).

`write_csv` writes one row per decoded frame: frame (1-based, as Aff-Wild2 numbers frames),
time (s), face_found, the face box, detection score and five landmarks, then per task the
model's outputs: EXPR class probabilities and the decided class, the 12 AU probabilities and
decisions (at the run's tuned per-AU thresholds if it has them, else 0.5), valence and arousal
(smoothed with the run's tuned window if it has one). Frames without the face, or that the model
could not read, have face_found 0 or empty predictions.

`write_plots` (matplotlib, the `report` extra) draws valence and arousal over time, the EXPR
probabilities over time, an AU activation heatmap over time and a contact sheet of sample
aligned crops with their predictions.
"""
import csv
import os

import numpy as np

from affectjax import labels

LANDMARKS = ('left_eye', 'right_eye', 'nose', 'mouth_left', 'mouth_right')
SHEET = 12  # crops on the contact sheet


def header(classes: tuple, tasks: tuple) -> list:
  cols = ['frame', 'time', 'face_found', 'box_x0', 'box_y0', 'box_x1', 'box_y1', 'face_score']
  cols += [f'{p}_{xy}' for p in LANDMARKS for xy in 'xy']
  if 'expr' in tasks:
    cols += [f'p_{c}' for c in classes] + ['expression']
  if 'au' in tasks:
    cols += [f'p_{a}' for a in labels.AU_NAMES] + list(labels.AU_NAMES)
  if 'va' in tasks:
    cols += ['valence', 'arousal']
  return cols


def _num(x, digits=4) -> str:
  return f'{x:.{digits}f}'


def write_csv(path: str, frame: np.ndarray, time: np.ndarray, face, predicted: np.ndarray,
              values: dict, classes: tuple, tasks: tuple) -> str:
  """frame int [T] (0-based), time [T], face (faces.Face), predicted bool [T] (the model read
  the frame's crop), values {'expr': probs [T, C], 'au': probs [T, 12], 'au_on': bool [T, 12],
  'va': [T, 2]}."""
  columns = header(classes, tasks)
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(columns)
    for t in range(len(frame)):
      row = [int(frame[t]) + 1, _num(time[t], 3), int(face.present[t])]
      if face.present[t]:
        row += [_num(v, 1) for v in face.boxes[t]] + [_num(face.scores[t])]
        row += [_num(v, 1) for v in face.landmarks[t].reshape(-1)]
      else:
        row += [''] * 15
      if predicted[t]:
        if 'expr' in tasks:
          row += [_num(p) for p in values['expr'][t]] + [classes[int(values['expr'][t].argmax())]]
        if 'au' in tasks:
          row += [_num(p) for p in values['au'][t]] + [int(v) for v in values['au_on'][t]]
        if 'va' in tasks:
          row += [_num(v) for v in values['va'][t]]
      else:
        row += [''] * (len(columns) - len(row))
      writer.writerow(row)
  return path


def write_plots(folder: str, time: np.ndarray, predicted: np.ndarray, values: dict,
                classes: tuple, tasks: tuple, crops: list, title: str) -> list:
  """PNGs of the module's docstring into `folder`; `crops` [(time, uint8 crop, caption)]."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel
  written = []

  def save(fig, name):
    path = os.path.join(folder, f'{name}.png')
    fig.savefig(path, dpi=100, bbox_inches='tight')
    plt.close(fig)
    written.append(path)

  if 'va' in tasks:
    fig, ax = plt.subplots(figsize=(10, 3.2))
    for k, name in enumerate(('valence', 'arousal')):
      ax.plot(time, np.where(predicted, values['va'][:, k], np.nan), label=name, lw=1.2)
    ax.set(xlabel='time (s)', ylim=(-1.05, 1.05), title=f'{title}: valence and arousal')
    ax.axhline(0, color='grey', lw=0.5)
    ax.legend(loc='upper right')
    save(fig, 'valence_arousal')
  if 'expr' in tasks:
    fig, ax = plt.subplots(figsize=(10, 3.2))
    probs = np.where(predicted[:, None], values['expr'], 0.0)
    ax.stackplot(time, probs.T, labels=classes, alpha=0.85)
    ax.set(xlabel='time (s)', ylabel='probability', ylim=(0, 1),
           title=f'{title}: expression probabilities (blank: no face)')
    ax.legend(loc='center left', bbox_to_anchor=(1.0, 0.5), fontsize=8)
    save(fig, 'expressions')
  if 'au' in tasks:
    fig, ax = plt.subplots(figsize=(10, 3.2))
    grid = np.where(predicted[:, None], values['au'], np.nan).T
    image = ax.imshow(grid, aspect='auto', cmap='magma', vmin=0, vmax=1, interpolation='nearest',
                      extent=(time[0], time[-1] if len(time) > 1 else time[0] + 1, 11.5, -0.5))
    ax.set(yticks=range(labels.NUM_AUS), xlabel='time (s)',
           title=f'{title}: action unit probabilities')
    ax.set_yticklabels(labels.AU_NAMES)
    fig.colorbar(image)
    save(fig, 'action_units')
  if crops:
    cols = min(6, len(crops))
    rows = -(-len(crops) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2 * cols, 2.3 * rows), squeeze=False)
    for ax in axes.ravel():
      ax.axis('off')
    for ax, (at, crop, caption) in zip(axes.ravel(), crops):
      ax.imshow(crop)
      ax.set_title(f'{at:.1f} s\n{caption}', fontsize=7)
    fig.suptitle(f'{title}: sample aligned crops', fontsize=9, y=1.02)
    save(fig, 'contact_sheet')
  return written


def caption(values: dict, t: int, classes: tuple, tasks: tuple) -> str:
  """A crop's caption: the expression, the active AUs and V/A at frame row t."""
  words = []
  if 'expr' in tasks:
    words.append(classes[int(values['expr'][t].argmax())])
  if 'va' in tasks:
    words.append(f'V {values["va"][t, 0]:+.2f} A {values["va"][t, 1]:+.2f}')
  if 'au' in tasks:
    on = [a for a, v in zip(labels.AU_NAMES, values['au_on'][t]) if v]
    words.append(' '.join(on[:4]) + (' ...' if len(on) > 4 else '') if on else 'no AU')
  return '\n'.join(words)
