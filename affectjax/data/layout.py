"""Where the Aff-Wild2 annotation files and face crops are: layout detection and fingerprints.

Folder names are matched case-insensitively. The per-task sets are looked for in
`<root>/Annotations`, `<root>/annotations`, `<root>` itself, then any direct subfolder of `<root>`
holding a task folder (e.g. `6th ABAW Annotations/`). `layout='auto'` picks the per-task sets when
every requested task has its folder for the split, else the s-Aff-Wild2 file, else raises.
"""
import dataclasses
import os

import numpy as np

from affectjax import labels

IMAGE_DIR = 'cropped_aligned'
ANNOTATIONS_DIR = 'Annotations'  # holds the task folders (also matched: none, or any subfolder)
# The first name of each is the one the organisers use today (and the synthetic set writes).
TASK_FOLDERS = {'expr': ('EXPR_Set', 'EXPR_Recognition_Challenge'),
                'au': ('AU_Set', 'AU_Detection_Challenge'),
                'va': ('VA_Set', 'VA_Estimation_Challenge')}
SPLIT_FOLDERS = {'train': ('Train_Set', 'Training_Set'), 'validation': ('Validation_Set',)}
MTL_FILES = {'train': 'training_set_annotations.txt',
             'validation': 'validation_set_annotations.txt'}
LAYOUTS = ('auto', 'per_task', 'mtl')

EXPECTED_LAYOUT = """\
Expected under the dataset root, either layout:
  per-task sets (ABAW1/2, ABAW5 onwards), line k after the header = frame k:
    <root>/Annotations/{VA_Set,EXPR_Set,AU_Set}/{Train_Set,Validation_Set}/<video>.txt
    (also accepted: 'annotations' or no such folder (task folders directly under <root>),
     'Training_Set', and task folders VA_Estimation_Challenge, EXPR_Recognition_Challenge,
     AU_Detection_Challenge)
  s-Aff-Wild2 multi-task files (ABAW3/4), rows video/00001.jpg,v,a,e,au x12:
    <root>/training_set_annotations.txt, <root>/validation_set_annotations.txt
  and the face crops (unless check_images=False):
    <root>/cropped_aligned/<video>/00001.jpg"""


class DatasetLayoutError(FileNotFoundError):
  """The dataset root is missing or does not hold the expected folders; shows both layouts."""


@dataclasses.dataclass(frozen=True)
class Sources:
  """The annotation files one index is built from."""
  layout: str  # 'per_task' or 'mtl'
  files: dict  # per_task: {task: {video: path}}; mtl: {}
  mtl_file: str | None
  stats: tuple  # ((path relative to root, size, mtime_ns), ...) for cache invalidation

  def file_counts(self) -> dict:
    if self.layout == 'mtl':
      return {'mtl': 1}
    return {t: len(v) for t, v in self.files.items()}


def _entries(path) -> dict:
  """Lower-cased name -> os.DirEntry of a folder; {} when it cannot be listed."""
  try:
    with os.scandir(path) as it:
      return {e.name.lower(): e for e in sorted(it, key=lambda e: e.name, reverse=True)}
  except OSError:
    return {}


def _child(entries, names, want_dir=True):
  """Path of the first of `names` present in `entries` (a folder, or a file)."""
  for name in names:
    e = entries.get(name.lower())
    if e is not None and (e.is_dir() if want_dir else e.is_file()):
      return e.path
  return None


def _annotation_dir(root, root_entries):
  """The folder holding the task folders, or None."""
  subdirs = [e.path for _, e in sorted(root_entries.items()) if e.is_dir()]
  for candidate in [_child(root_entries, (ANNOTATIONS_DIR,)), root] + subdirs:
    if candidate and any(_child(_entries(candidate), names) for names in TASK_FOLDERS.values()):
      return candidate
  return None


def _split_dirs(annotation_dir, split):
  """{task: split folder or None} for all three tasks."""
  entries = _entries(annotation_dir) if annotation_dir else {}
  found = {}
  for task, names in TASK_FOLDERS.items():
    task_dir = _child(entries, names)
    found[task] = _child(_entries(task_dir), SPLIT_FOLDERS[split]) if task_dir else None
  return found


def _describe_found(root, root_entries, split_dirs) -> str:
  names = sorted(e.name + ('/' if e.is_dir() else '') for e in root_entries.values())
  shown = ', '.join(names[:20]) + (f', ... ({len(names)} entries)' if len(names) > 20 else '')
  tasks = ', '.join(f'{t}: {os.path.relpath(d, root)}' for t, d in split_dirs.items() if d)
  return f'Found in {root}: {shown or "(empty)"}\nPer-task split folders found: {tasks or "none"}'


def _video_files(split_dir, root):
  """{video: path} of the .txt files in a split folder, and their (relpath, size, mtime_ns)."""
  files, stats = {}, []
  for name, e in sorted(_entries(split_dir).items()):
    if name.endswith('.txt') and e.is_file():
      st = e.stat()
      files[e.name[:-4]] = e.path
      stats.append((os.path.relpath(e.path, root), st.st_size, st.st_mtime_ns))
  return files, stats


def find_sources(root: str, split: str, layout: str, tasks: tuple) -> Sources:
  """Detects the layout and lists the annotation files of `split` for `tasks`."""
  if not os.path.isdir(root):
    raise DatasetLayoutError(f'dataset root {root} does not exist or is not a folder.\n'
                             f'{EXPECTED_LAYOUT}')
  root_entries = _entries(root)
  annotation_dir = _annotation_dir(root, root_entries)
  split_dirs = _split_dirs(annotation_dir, split)
  mtl_file = _child(root_entries, (MTL_FILES[split],), want_dir=False)
  missing = [t for t in tasks if split_dirs[t] is None]
  if layout == 'auto':
    layout = 'per_task' if not missing else 'mtl' if mtl_file else None
  if layout == 'mtl' and mtl_file:
    st = os.stat(mtl_file)
    return Sources('mtl', {}, mtl_file,
                   ((os.path.relpath(mtl_file, root), st.st_size, st.st_mtime_ns),))
  if layout == 'per_task' and not missing:
    files, stats = {}, []
    for t in tasks:
      files[t], task_stats = _video_files(split_dirs[t], root)
      stats += task_stats
    return Sources('per_task', files, None, tuple(stats))
  present = tuple(t for t in labels.TASKS if split_dirs[t])
  if layout == 'mtl':
    problem = f'no s-Aff-Wild2 file {MTL_FILES[split]} in {root}'
  elif present:
    problem = (f"per-task annotations for split '{split}' lack the folder of task(s) "
               f"{', '.join(missing)}; pass tasks={present} to use only the tasks found")
  else:
    problem = f"no Aff-Wild2 annotations for split '{split}' found in {root}"
  raise DatasetLayoutError(f'{problem}.\n{_describe_found(root, root_entries, split_dirs)}\n'
                           f'{EXPECTED_LAYOUT}')


def image_folder_stats(root: str) -> tuple:
  """((video folder, mtime_ns), ...) of the crop folders: they change when crops come or go."""
  image_dir = os.path.join(root, IMAGE_DIR)
  if not os.path.isdir(image_dir):
    raise DatasetLayoutError(f'no face crop folder {image_dir} (pass check_images=False to index '
                             f'the annotations alone).\n{EXPECTED_LAYOUT}')
  return tuple((name, e.stat().st_mtime_ns) for name, e in sorted(_entries(image_dir).items()))


def image_frames(video_dir: str) -> np.ndarray | None:
  """int64 frame numbers of the `%05d.jpg` crops in a folder (one scandir); None if no folder."""
  try:
    with os.scandir(video_dir) as it:
      names = [e.name for e in it]
  except (FileNotFoundError, NotADirectoryError):
    return None
  return np.array([int(n[:-4]) for n in names
                   if n[-4:].lower() == '.jpg' and n[:-4].isascii() and n[:-4].isdigit()],
                  dtype=np.int64)
