"""Per-frame prediction files in the ABAW submission formats.

- `mtl` (ABAW3/4 multi-task): one CSV, header `image,valence,arousal,expression,aus`, rows
  `video/00001.jpg,v,a,e,au1,...,au12`.
- `per_task` (ABAW5 onwards): one CSV per trained task, `VA.csv` (`image_location,valence,
  arousal`), `EXPR.csv` (`image_location,Neutral,...`; one class index per row) and `AU.csv`
  (`image_location,AU1,...,AU26`; twelve 0/1 columns).
- `per_video` (ABAW1/2): per trained task a folder (`VA/`, `EXPR/`, `AU/`) with one `<video>.txt`
  per video: the training files' header, then one line per video frame 1..N. Frames without a
  prediction (no face crop, or an unreadable one) take the nearest predicted frame's decision
  (the earlier one on a tie), as the organisers ask. N is the video's frame count when given,
  else its last frame with a crop.

In every format a listed frame whose crop could not be read is filled the same way, so each
listed frame gets a line. Untrained tasks get the missing-label sentinels in the `mtl` file.
Every file (and every `per_video` task folder) is written under a temporary name and renamed
when complete (`files.atomic_write`), so a failure leaves the previous version, never a partial
one.
"""
import json
import os

import numpy as np

from affectjax import files
from affectjax import labels
from affectjax import metrics
from affectjax.data import index as index_lib

MTL_HEADER = 'image,valence,arousal,expression,aus'
FORMATS = ('mtl', 'per_task', 'per_video')
FILE_ORDER = ('va', 'expr', 'au')  # per-task files are written in the organisers' task order


def clip_va(va) -> np.ndarray:
  """Valence and arousal within their range, [-1, 1] (a linear VA head can leave it)."""
  return np.clip(va, -1.0, 1.0)


def decode_outputs(outputs: dict, tasks: tuple, au_threshold=0.5) -> dict:
  """Model outputs (NumPy) -> per-frame decisions: EXPR class, AU 0/1 (probability at least
  `au_threshold`, a scalar or one per AU), VA values.

  Untrained tasks get the missing-label sentinels, as in the annotation files.
  """
  decided = labels.missing_labels(len(next(iter(outputs.values()))), 'decision')
  if 'expr' in tasks:
    decided['expr'] = np.argmax(outputs['expr'], axis=-1)
  if 'au' in tasks:
    decided['au'] = (metrics.sigmoid(outputs['au']) >= au_threshold).astype(np.int64)
  if 'va' in tasks:
    decided['va'] = clip_va(outputs['va'])
  return decided


def read_au_thresholds(path: str):
  """0.5, or the 12 per-AU thresholds of an eval JSON (`au_thresholds`, written by mode=eval)
  or of a file of 12 comma-separated numbers."""
  if not path:
    return 0.5
  with open(path) as f:
    text = f.read()
  try:
    values = json.loads(text)
  except json.JSONDecodeError:
    values = [x for x in text.replace('\n', ',').split(',') if x.strip()]
  if isinstance(values, dict):
    values = values.get('au_thresholds')
  try:
    thresholds = np.asarray(values, np.float64).reshape(-1)
  except (TypeError, ValueError):
    thresholds = np.zeros(0)
  if thresholds.shape != (labels.NUM_AUS,) or not np.all((thresholds > 0) & (thresholds < 1)):
    raise ValueError(f'{path}: expected {labels.NUM_AUS} AU thresholds in (0, 1) (a mode=eval '
                     'JSON with au_thresholds, or comma-separated numbers)')
  return thresholds


def gather_decisions(rows: list, num_frames: int, tasks: tuple, au_threshold=0.5) -> tuple:
  """(decisions per index row, predicted bool [num_frames]) from the evaluation loop's
  (outputs, batch) pairs; `batch['index']` maps each valid row to its index row.
  `au_threshold`: a scalar or one per AU."""
  decided = labels.missing_labels(num_frames, 'decision')
  predicted = np.zeros(num_frames, bool)
  for outputs, batch in rows:
    keep = np.asarray(batch['valid'], bool)
    where = np.asarray(batch['index'])[keep]
    batch_decided = decode_outputs({k: np.asarray(v)[keep] for k, v in outputs.items()}, tasks,
                                   au_threshold)
    for key, values in batch_decided.items():
      decided[key][where] = values
    predicted[where] = True
  return decided, predicted


def nearest_predicted(frames: np.ndarray, predicted_frames: np.ndarray) -> np.ndarray:
  """Per frame of `frames`, the position in the sorted `predicted_frames` of the nearest one
  (the earlier one on a tie)."""
  after = np.clip(np.searchsorted(predicted_frames, frames), 0, predicted_frames.size - 1)
  before = np.clip(after - 1, 0, predicted_frames.size - 1)
  take_before = np.abs(frames - predicted_frames[before]) <= np.abs(
      predicted_frames[after] - frames)
  return np.where(take_before, before, after)


def fill_rows(index, predicted: np.ndarray) -> np.ndarray:
  """int64 [N]: per index row, the row whose decision it gets (itself when predicted, else the
  nearest predicted frame of its video). ValueError if a video has no predicted frame."""
  source = np.arange(len(index), dtype=np.int64)
  for video in np.unique(index.video_id[~predicted]):
    rows = np.flatnonzero(index.video_id == video)
    have = rows[predicted[rows]]
    if have.size == 0:
      raise ValueError(f'no frame of video {index.video_names[video]} could be read: nothing '
                       'to fill its predictions from')
    missing = rows[~predicted[rows]]
    source[missing] = have[nearest_predicted(index.frame[missing].astype(np.int64),
                                             index.frame[have].astype(np.int64))]
  return source


def _image_name(index, row: int) -> str:
  return f'{index.video_names[index.video_id[row]]}/{index.frame[row]:05d}.jpg'


def _header(task: str, num_expr_classes: int) -> str:
  """The task's header line, as in the training files: class names, AU names or valence,arousal."""
  return ','.join(labels.TASK_TABLE[task].header(num_expr_classes))


def _task_line(task: str, decided: dict, row: int) -> str:
  if task == 'va':
    v, a = decided['va'][row]
    return f'{v:.6f},{a:.6f}'
  if task == 'expr':
    return str(decided['expr'][row])
  return ','.join(str(x) for x in decided['au'][row])


def write_mtl(path: str, index, decided: dict, rows) -> str:
  """The ABAW3/4 multi-task CSV for the index rows `rows` (in order)."""
  with files.atomic_write(path) as f:
    f.write(MTL_HEADER + '\n')
    for row in rows:
      f.write(f"{_image_name(index, row)},{_task_line('va', decided, row)},"
              f"{decided['expr'][row]},{_task_line('au', decided, row)}\n")
  return path


def write_per_task(out_dir: str, entries: list, decided: dict, tasks: tuple,
                   num_expr_classes: int) -> list:
  """ABAW5+: one CSV per trained task, a line per (image name, index row) of `entries`."""
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for task in (t for t in FILE_ORDER if t in tasks):
    path = os.path.join(out_dir, f'{labels.TASK_TABLE[task].submission_name}.csv')
    with files.atomic_write(path) as f:
      f.write(f'image_location,{_header(task, num_expr_classes)}\n')
      f.writelines(f'{name},{_task_line(task, decided, row)}\n' for name, row in entries)
    paths.append(path)
  return paths


def read_frame_counts(path: str) -> dict:
  """`video,num_frames` lines (a header line is allowed) -> {video: num_frames}."""
  counts = {}
  with open(path) as f:
    for number, line in enumerate(f, 1):
      fields = [x.strip() for x in line.replace('\t', ',').split(',')]
      if not line.strip() or (number == 1 and not fields[-1].isdigit()):
        continue
      if len(fields) != 2 or not fields[1].isdigit():
        raise ValueError(f'{path}:{number}: expected <video>,<number of frames>, got '
                         f'{line.strip()!r}')
      counts[fields[0]] = int(fields[1])
  return counts


def every_frame_rows(index, predicted: np.ndarray, frame_counts: dict | None = None) -> dict:
  """{video: int64 [N]}: for each frame 1..N of each video (N from `frame_counts`, by its name
  or its source video's, 'v' for 'v_left'; else its last crop), the index row whose decision it
  takes: its own, else its nearest predicted frame's. Given counts that name neither, a
  ValueError names the video."""
  rows_by_video = {}
  for video_id, video in enumerate(index.video_names):
    rows = np.flatnonzero(index.video_id == video_id)
    have = rows[predicted[rows]]
    if have.size == 0:
      raise ValueError(f'no frame of video {video} could be read: nothing to predict from')
    last = int(index.frame[rows].max())
    count = last
    if frame_counts:
      source = index_lib.source_video(video)
      count = frame_counts.get(video, frame_counts.get(source))
      if count is None:
        raise ValueError(f'the frame counts (predict.frame_counts) do not list video {video}'
                         + (f' or {source}' if source != video else ''))
    if count < last:
      raise ValueError(f'frame count {count} of video {video} is below its last crop ({last})')
    frames = np.arange(1, count + 1, dtype=np.int64)
    rows_by_video[video] = have[nearest_predicted(frames, index.frame[have].astype(np.int64))]
  return rows_by_video


def write_per_video(out_dir: str, index, decided: dict, predicted: np.ndarray, tasks: tuple,
                    num_expr_classes: int, frame_counts: dict | None = None) -> list:
  """ABAW1/2: `<out_dir>/<TASK>/<video>.txt`, one line per frame 1..N of each video, frames
  without a prediction filled from the nearest predicted frame. Each task folder is replaced
  whole."""
  rows_by_video = every_frame_rows(index, predicted, frame_counts)
  os.makedirs(out_dir, exist_ok=True)
  written = []
  for task in (t for t in FILE_ORDER if t in tasks):
    folder = os.path.join(out_dir, labels.TASK_TABLE[task].submission_name)
    with files.atomic_dir(folder) as tmp:
      for video, source in rows_by_video.items():
        with open(os.path.join(tmp, f'{video}.txt'), 'w') as f:
          f.write(_header(task, num_expr_classes) + '\n')
          f.writelines(_task_line(task, decided, int(row)) + '\n' for row in source)
    written.extend(os.path.join(folder, f'{video}.txt') for video in rows_by_video)
  return written


def write_predictions(path: str, rows: list, index, tasks: tuple) -> str:
  """mode=eval: the `mtl` CSV of every evaluated frame (padding and unreadable frames
  skipped), from the evaluation loop's (outputs, batch) pairs."""
  decided, predicted = gather_decisions(rows, len(index), tasks)
  return write_mtl(path, index, decided, np.flatnonzero(predicted))


def submission_format(requested: str, image_list: bool) -> str:
  """The format of `predict.format`: 'auto' is `mtl` for an image list (ABAW3/4), else
  `per_video` (ABAW1/2); otherwise one of `FORMATS`."""
  fmt = requested if requested != 'auto' else ('mtl' if image_list else 'per_video')
  if fmt not in FORMATS:
    raise ValueError(f'predict.format must be auto or one of {FORMATS}, got {fmt!r}')
  return fmt


def write_submission(fmt: str, out: str, index, decided: dict, predicted: np.ndarray,
                     tasks: tuple, num_expr_classes: int, frame_counts: dict | None = None,
                     order=None) -> list:
  """Writes the decisions of a test list's frames in the submission format `fmt` to `out` (a
  file for `mtl`, else a folder); returns the paths written. `order`: the index rows of an
  image list's lines, in the list's order (`list_order`), which `mtl` and `per_task` keep;
  without it (a video list) `mtl` writes the index rows and `per_task`, like `per_video`, every
  frame 1..N of each video. Frames without a prediction take their video's nearest predicted
  frame's decision."""
  if fmt == 'per_video':
    return write_per_video(out, index, decided, predicted, tasks, num_expr_classes,
                           frame_counts)
  rows = range(len(index)) if order is None else order
  if fmt == 'mtl':
    filled = {k: v[fill_rows(index, predicted)] for k, v in decided.items()}
    os.makedirs(os.path.dirname(out) or '.', exist_ok=True)
    return [write_mtl(out if out.endswith('.csv') else out + '.csv', index, filled, rows)]
  if order is not None:
    source = fill_rows(index, predicted)
    entries = [(_image_name(index, row), source[row]) for row in rows]
  else:
    entries = [(f'{video}/{frame:05d}.jpg', row) for video, source in
               every_frame_rows(index, predicted, frame_counts).items()
               for frame, row in enumerate(source, 1)]
  return write_per_task(out, entries, decided, tasks, num_expr_classes)


def list_order(index, images: list) -> np.ndarray:
  """The index row of each (video, frame) of an image list (`unlabelled.read_image_list`), in
  the list's order (repeated lines repeat their row)."""
  row_of = {(index.video_names[v], int(f)): r
            for r, (v, f) in enumerate(zip(index.video_id, index.frame))}
  return np.asarray([row_of[(video, frame)] for video, frame in images], np.int64)
