"""The Aff-Wild2 frame index: every usable frame with its EXPR, AU and VA labels, as NumPy columns.

`build_index(root, split)` reads either annotation layout (`layout.EXPECTED_LAYOUT`), merges the
tasks per frame, keeps frames that have at least one requested label and a face crop on disk,
counts the others by reason in `summary`, and caches the result as a compressed `.npz` (no pickle).
Rows are sorted by (video, frame). Missing labels: expr -1, au -1 (per AU), va -5 (per column).
Pure NumPy: importing this module does not import jax.
"""
import dataclasses
import functools
import hashlib
import json
import os
import zipfile

import numpy as np

from affectjax import files
from affectjax import labels
from affectjax.data import annotations
from affectjax.data import layout as layout_lib

_FORMAT_VERSION = 1  # of saved index files (packs and feature sets carry them)
_BUILD_VERSION = 2  # of what build_index computes: part of the cache fingerprint
_TWO_SUBJECT_SUFFIXES = ('_left', '_right')


def run_bounds(ids) -> tuple:
  """(start, end) int64 [N] each: the first row and one past the last row of the run of equal
  consecutive `ids` that holds each row (e.g. a video's rows in a frame index, which are
  contiguous: rows are sorted by video and frame)."""
  ids = np.asarray(ids)
  n = len(ids)
  starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]) if n else np.zeros(0, np.int64)
  lengths = np.diff(np.r_[starts, n]).astype(np.int64)
  return np.repeat(starts, lengths), np.repeat(np.r_[starts[1:], n], lengths)


def source_video(video: str) -> str:
  """The source video of a two-subject crop folder: 'v_left' -> 'v'; other names unchanged."""
  for suffix in _TWO_SUBJECT_SUFFIXES:
    if video.endswith(suffix):
      return video[:-len(suffix)]
  return video


@dataclasses.dataclass(eq=False, repr=False)
class AffWild2Index:
  """Columnar frame table. N rows sorted by (video_id, frame).

  video_id int32[N] indexes `video_names`; frame int32[N] is 1-based; expr int8[N] (-1 missing);
  au int8[N,12] (-1 missing, per AU); va float32[N,2] (valence, arousal; -5 missing, per column).
  """
  video_names: tuple
  video_id: np.ndarray
  frame: np.ndarray
  expr: np.ndarray
  au: np.ndarray
  va: np.ndarray
  root: str
  split: str
  summary: dict
  source_videos: tuple = dataclasses.field(init=False)  # per video, '_left'/'_right' removed

  def __post_init__(self):
    self.video_names = tuple(self.video_names)
    self.source_videos = tuple(source_video(v) for v in self.video_names)

  def __len__(self) -> int:
    return int(self.frame.shape[0])

  def __repr__(self) -> str:
    return (f'AffWild2Index(split={self.split!r}, rows={len(self)}, '
            f'videos={len(self.video_names)}, root={self.root!r})')

  @property
  def image_dir(self) -> str:
    return os.path.join(self.root, layout_lib.IMAGE_DIR)

  def image_path(self, i: int) -> str:
    """Path of row i's face crop: `<root>/cropped_aligned/<video>/<frame:05d>.jpg`."""
    video = self.video_names[int(self.video_id[i])]
    return os.path.join(self.image_dir, video, f'{int(self.frame[i]):05d}.jpg')

  def image_paths(self, indices=None) -> list:
    """Image paths of `indices` (all rows when None), in that order."""
    rows = np.arange(len(self)) if indices is None else np.asarray(indices).reshape(-1)
    prefixes = self._video_prefixes
    return [f'{prefixes[v]}{f:05d}.jpg'
            for v, f in zip(self.video_id[rows].tolist(), self.frame[rows].tolist())]

  @functools.cached_property
  def _video_prefixes(self) -> list:
    """'<root>/cropped_aligned/<video>/' per video (built once: image_paths runs per batch)."""
    return [os.path.join(self.image_dir, v, '') for v in self.video_names]

  def label_columns(self) -> dict:
    """{task: its label column}, every task in `labels.TASKS` order."""
    return {task: getattr(self, task) for task in labels.TASKS}

  def has_label(self, task: str) -> np.ndarray:
    """bool [N]: the row has a label of `task` (for AU and VA: of at least one column)."""
    return labels.has_label(task, getattr(self, task))

  def subset(self, selection) -> 'AffWild2Index':
    """A new index of the rows picked by a bool [N] mask or an index array; ids unchanged."""
    rows = np.asarray(selection) if len(selection) else np.zeros(0, np.intp)
    if rows.dtype == bool and rows.shape != (len(self),):
      raise ValueError(f'mask has shape {rows.shape}, expected ({len(self)},)')
    summary = dict(self.summary, subset={'from': len(self), 'rows': int(
        rows.sum() if rows.dtype == bool else rows.size)})
    columns = {task: column[rows] for task, column in self.label_columns().items()}
    return AffWild2Index(self.video_names, self.video_id[rows], self.frame[rows], **columns,
                         root=self.root, split=self.split, summary=summary)

  def describe(self) -> str:
    """Human-readable multi-line summary: frames per task, kept/dropped by reason, videos."""
    return format_summary(self.summary)

  def save(self, path: str, fingerprint: str = '') -> None:
    """Writes a compressed .npz (no pickled objects, readable by np.load), atomically."""
    arrays = dict(
        format_version=np.int32(_FORMAT_VERSION),
        video_names=np.array(self.video_names, dtype=np.str_).reshape(-1),
        video_id=self.video_id, frame=self.frame, **self.label_columns(),
        root=np.array(self.root), split=np.array(self.split),
        summary=np.array(json.dumps(self.summary)), fingerprint=np.array(fingerprint))
    # Like np.savez_compressed, at zlib level 1: the labels compress about 8x either way and
    # level 1 writes about 4x faster than the default.
    with files.atomic_write(path, 'wb') as out, zipfile.ZipFile(
        out, 'w', zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
      for name, value in arrays.items():
        with zf.open(name + '.npy', 'w', force_zip64=True) as f:
          np.lib.format.write_array(f, np.asanyarray(value), allow_pickle=False)

  @classmethod
  def load(cls, path: str, root: str | None = None) -> 'AffWild2Index':
    """Reads a file written by `save`; `root` overrides the stored dataset root."""
    return _load(path, root)[0]


def _load(path, root=None):
  """(index, fingerprint) from a saved index."""
  with np.load(path, allow_pickle=False) as z:
    if int(z['format_version']) != _FORMAT_VERSION:
      raise ValueError(f'{path}: index format {int(z["format_version"])}, '
                       f'this version reads {_FORMAT_VERSION}')
    index = AffWild2Index(
        tuple(z['video_names'].tolist()), z['video_id'], z['frame'],
        **{task: z[task] for task in labels.TASKS}, root=root or str(z['root']),
        split=str(z['split']), summary=json.loads(str(z['summary'])))
    return index, str(z['fingerprint'])


def union_frames(index: AffWild2Index, others) -> AffWild2Index:
  """`index` with a row added (labels missing) for every frame of the indexes `others` (e.g.
  built with another layout or EXPR class count) that it lacks; rows sorted by (video, frame).
  A pack made from it holds the frames of every such index, so any of them maps onto it."""
  names = tuple(sorted(set(index.video_names).union(*(o.video_names for o in others))))
  position = {name: i for i, name in enumerate(names)}

  def keys(ix):
    video = np.array([position[name] for name in ix.video_names], np.int64)
    return (video[ix.video_id] << 32) | ix.frame.astype(np.int64)

  own = keys(index)
  every = np.unique(np.concatenate([own] + [keys(other) for other in others]))
  if every.size == own.size:
    return index
  source = np.full(every.size, -1, np.int64)
  source[np.searchsorted(every, own)] = np.arange(len(index))
  columns, taken = labels.missing_labels(every.size, 'index'), source >= 0
  for task, column in index.label_columns().items():
    columns[task][taken] = column[source[taken]]
  summary = dict(index.summary, unlabelled_frames=int(every.size - own.size))
  return AffWild2Index(names, (every >> 32).astype(np.int32),
                       (every & 0xFFFFFFFF).astype(np.int32), **columns,
                       root=index.root, split=index.split, summary=summary)


def format_summary(summary: dict) -> str:
  """The text of `AffWild2Index.describe()`."""
  s = summary
  tasks = s['tasks']
  lines = [
      f"Aff-Wild2 index: split={s['split']}, layout={s['layout']}, tasks={','.join(tasks)}, "
      f"EXPR classes={s['num_expr_classes']}, images checked={s['check_images']}",
      '  annotation files: ' + ', '.join(f'{k} {v}' for k, v in s['annotation_files'].items()),
      f"  frames seen: {s['frames_seen']} (union over the requested tasks' annotations)",
      f"  kept: {s['kept']} frames in {s['videos']} videos "
      f"({s['two_subject_videos']} of them _left/_right crops of two-subject videos)",
      '  dropped: ' + ', '.join(f'{k} {v}' for k, v in s['dropped'].items()) +
      f"; {s['videos_dropped']} videos had no kept frame, "
      f"{s['videos_without_images']} had no image folder",
      f"  {'task':<6}{'lines':>12}{'labelled':>12}{'kept':>12}",
  ]
  for t in tasks:
    lines.append(f"  {t:<6}{s['annotation_lines'][t]:>12}{s['labelled'][t]:>12}"
                 f"{s['kept_labels'][t]:>12}")
  gaps = s.get('annotation_gaps', {})
  if gaps.get('short_files') or gaps.get('crops_beyond'):
    lines.append(
        f"  warning: {gaps['short_files']} per-task annotation files have fewer lines than the "
        f"longest file of their video, and {gaps['crops_beyond']} crops lie after the last "
        f"annotated frame of their video (no label: not used), e.g. {'; '.join(gaps['examples'])}")
  if s.get('unlabelled_frames'):
    lines.append(f"  plus {s['unlabelled_frames']} frames labelled only in other layouts or "
                 "with the other EXPR class count (packed for other configs; no labels here)")
  if 'subset' in s:
    lines.append(f"  subset: {s['subset']['rows']} of {s['subset']['from']} rows selected")
  return '\n'.join(lines)


class _Collector:
  """Accumulates the kept rows of each video and the counts behind `summary`."""

  def __init__(self, tasks, image_dir):
    self.tasks, self.image_dir = tasks, image_dir
    self.counts = dict(frames_seen=0, no_requested_label=0, no_image=0,
                       videos_dropped=0, videos_without_images=0)
    self.lines = dict.fromkeys(tasks, 0)
    self.labelled = dict.fromkeys(tasks, 0)
    self.kept_labels = dict.fromkeys(tasks, 0)
    self.videos, self.parts = [], {name: [] for name in ('frame',) + labels.TASKS}
    # Per-task layout: annotation files shorter than their video's longest, crops after the
    # last annotated frame (counted and reported: files cut short lose labels silently).
    self.gaps = {'short_files': 0, 'crops_beyond': 0, 'examples': []}

  def note_gap(self, kind: str, count: int, example: str) -> None:
    self.gaps[kind] += count
    if len(self.gaps['examples']) < 3:
      self.gaps['examples'].append(example)

  def add(self, video, frame, task_labels, lines, every_frame: bool = False):
    """One video's rows: frame numbers and {task: labels} (of unrequested tasks: sentinels);
    `every_frame`: the annotations have a line for every frame (per-task files)."""
    present = {t: labels.has_label(t, task_labels[t]) for t in self.tasks}
    keep = np.zeros(frame.shape, bool)
    for t in self.tasks:
      keep |= present[t]
      self.lines[t] += lines[t]
      self.labelled[t] += int(present[t].sum())
    self.counts['frames_seen'] += frame.size
    self.counts['no_requested_label'] += int((~keep).sum())
    if self.image_dir is not None:
      has_image = self._has_image(video, frame, every_frame)
      self.counts['no_image'] += int((keep & ~has_image).sum())
      keep &= has_image
    for t in self.tasks:
      self.kept_labels[t] += int((present[t] & keep).sum())
    if keep.any():
      self.videos.append(video)
      for name, column in dict(task_labels, frame=frame).items():
        self.parts[name].append(column[keep])
    else:
      self.counts['videos_dropped'] += 1

  def _has_image(self, video, frame, every_frame=False):
    """bool per frame: its crop exists. One scandir of the video folder."""
    on_disk = layout_lib.image_frames(os.path.join(self.image_dir, video))
    if on_disk is None:
      self.counts['videos_without_images'] += 1
      return np.zeros(frame.shape, bool)
    beyond = int((np.asarray(on_disk) > frame.size).sum()) if every_frame else 0
    if beyond:
      self.note_gap('crops_beyond', beyond, f'{video}: {beyond} crops after line {frame.size}')
    return np.isin(frame, on_disk)

  def _concatenate(self, name):
    """One column of all kept rows; drops its parts at once so peak memory stays near one copy."""
    parts, self.parts[name] = self.parts[name], None
    if parts:
      return np.concatenate(parts)
    return labels.missing_labels(0, 'index').get(name, np.zeros(0, np.int32))

  def finish(self, root, split, summary):
    """The AffWild2Index of everything added; `summary` holds the build settings."""
    sizes = [part.size for part in self.parts['frame']]
    frame = self._concatenate('frame')
    columns = {task: self._concatenate(task) for task in labels.TASKS}
    c = self.counts
    summary = dict(
        summary, frames_seen=c['frames_seen'], kept=int(frame.size),
        dropped={'no_requested_label': c['no_requested_label'], 'no_image': c['no_image']},
        videos=len(self.videos), videos_dropped=c['videos_dropped'],
        videos_without_images=c['videos_without_images'],
        two_subject_videos=sum(source_video(v) != v for v in self.videos),
        annotation_gaps=self.gaps,
        annotation_lines=self.lines, labelled=self.labelled, kept_labels=self.kept_labels)
    video_id = np.repeat(np.arange(len(sizes), dtype=np.int32), sizes)
    return AffWild2Index(tuple(self.videos), video_id, frame.astype(np.int32, copy=False),
                         **columns, root=root, split=split, summary=summary)


def _collect_per_task(sources, tasks, num_expr_classes, collector):
  """Reads each video's per-task files and merges them: line k of every file is frame k."""
  readers = {'expr': lambda p: annotations.read_expr_file(p, num_expr_classes),
             'au': annotations.read_au_file, 'va': annotations.read_va_file}
  for video in sorted(set().union(*(sources.files[t] for t in tasks))):
    parsed = {t: readers[t](sources.files[t][video]) for t in tasks if video in sources.files[t]}
    n = max(values.shape[0] for values in parsed.values())
    merged = labels.missing_labels(n, 'index')
    for t, values in parsed.items():
      merged[t][:values.shape[0]] = values
    lines = {t: parsed[t].shape[0] if t in parsed else 0 for t in tasks}
    for t, values in parsed.items():
      if values.shape[0] < n:
        collector.note_gap('short_files', 1, f'{sources.files[t][video]}: {values.shape[0]} '
                                             f'lines, {n} in the longest file of the video')
    collector.add(video, np.arange(1, n + 1, dtype=np.int32), merged, lines, every_frame=True)


def _collect_mtl(sources, tasks, num_expr_classes, collector):
  """Reads the s-Aff-Wild2 file; labels of tasks not requested become sentinels (the expression
  column is then read with 8 classes: a run without EXPR does not care about Other)."""
  rows = annotations.read_mtl_file(sources.mtl_file, num_expr_classes if 'expr' in tasks else 8)
  bounds = np.searchsorted(rows.video_id, np.arange(len(rows.video_names) + 1))
  for v, (lo, hi) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist())):
    merged = labels.missing_labels(hi - lo, 'index')
    for t in tasks:
      merged[t] = getattr(rows, t)[lo:hi]
    collector.add(rows.video_names[v], rows.frame[lo:hi], merged, dict.fromkeys(tasks, hi - lo))


def _digest(value) -> str:
  return hashlib.sha1(json.dumps(value).encode()).hexdigest()


def _cache_paths(root, split, settings, cache_dir):
  """Where to look for / write the cache, in order: cache_dir, else next to the data, else
  the user cache folder (the dataset folder may be read-only)."""
  name = f'{split}-{_digest(settings)[:12]}.npz'
  shared_name = f'index-{_digest(root)[:12]}-{name}'  # several datasets share these folders
  if cache_dir is not None:
    return [os.path.join(os.fspath(cache_dir), shared_name)]
  return [os.path.join(root, '.affectjax_cache', f'index-{name}'),
          os.path.join(os.path.expanduser('~'), '.cache', 'affectjax', shared_name)]


def _read_cache(paths, fingerprint, root):
  for path in paths:
    try:
      index, stored = _load(path, root)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
      continue  # absent, partial or from another version: rebuild
    if stored == fingerprint:
      return index
  return None


def _write_cache(index, paths, fingerprint):
  """Writes to the first writable location; a cache that cannot be written is not an error."""
  for path in paths:
    try:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      index.save(path, fingerprint)
      return path
    except OSError:
      continue
  return None


def build_index(root, split: str, *, layout: str = 'auto', tasks=labels.TASKS,
                num_expr_classes: int = 8, check_images: bool = True, cache_dir=None,
                use_cache: bool = True) -> AffWild2Index:
  """Indexes the frames of `split` ('train' or 'validation') under the dataset `root`.

  Keeps frames with at least one label of `tasks` and (if `check_images`) a crop on disk; labels
  of other tasks are set to their sentinels. The result is cached (see `_cache_paths`) and
  rebuilt when an annotation file's size or mtime, the set of files, a crop folder's mtime or an
  argument changes. Raises annotations.AnnotationError / layout.DatasetLayoutError on bad input.
  """
  if split not in layout_lib.SPLIT_FOLDERS:
    raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
  if layout not in layout_lib.LAYOUTS:
    raise ValueError(f'layout must be one of {layout_lib.LAYOUTS}, got {layout!r}')
  tasks = labels.parse_tasks(tasks)
  labels.expr_classes(num_expr_classes)  # validates 7 or 8
  root = os.path.abspath(os.fspath(root))
  sources = layout_lib.find_sources(root, split, layout, tasks)
  image_stats = layout_lib.image_folder_stats(root) if check_images else ()
  settings = dict(version=_BUILD_VERSION, layout=sources.layout, split=split, tasks=tasks,
                  num_expr_classes=num_expr_classes, check_images=check_images)
  fingerprint = _digest([settings, sources.stats, image_stats])
  paths = _cache_paths(root, split, settings, cache_dir) if use_cache else []
  cached = _read_cache(paths, fingerprint, root)
  if cached is not None:
    return cached
  collector = _Collector(tasks, os.path.join(root, layout_lib.IMAGE_DIR) if check_images else None)
  collect = _collect_per_task if sources.layout == 'per_task' else _collect_mtl
  collect(sources, tasks, num_expr_classes, collector)
  index = collector.finish(root, split, dict(
      layout=sources.layout, split=split, tasks=list(tasks), num_expr_classes=num_expr_classes,
      check_images=check_images, annotation_files=sources.file_counts()))
  _write_cache(index, paths, fingerprint)
  return index
