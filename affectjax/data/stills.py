"""Still-image expression datasets (AffectNet, RAF-DB basic) as an Aff-Wild2 per-task tree.

The temporal statistical model (method 2) fine-tunes its frame model on AffectNet and RAF-DB with
7 classes before Aff-Wild2. This command reads their own layouts and writes one folder in the
Aff-Wild2 per-task layout (`cropped_aligned/<video>/<frame:05d>.jpg`, EXPR_Set and VA_Set files),
so every part of affectjax (index, packing, decoded cache, sampling, training) reads it as it
reads Aff-Wild2:

  python -m affectjax.data.stills --affectnet /data/AffectNet --rafdb /data/RAF-DB \
    --out /data/stills
  python -m affectjax.main --config=configs/mtl_va.py --workdir=runs/stills \
    --config.data.root=/data/stills --config.init_from=/weights/vggface2_r50
  python -m affectjax.main --config=configs/mtl_va.py --workdir=runs/frames \
    --config.data.root=/data/affwild2 --config.init_from=runs/stills

Images are grouped into pseudo-videos of `--images-per-video` (`affectnet_train_0001`, ...;
their frame numbers say nothing about time). `sources.csv` maps every written crop back to its
file. Read:
- AffectNet: `training.csv` / `validation.csv` (at the root or under
  `Manually_Annotated_file_lists/`), columns `subDirectory_filePath, face_x, face_y, face_width,
  face_height, facial_landmarks, expression, valence, arousal`; images under
  `Manually_Annotated_Images/` (or the root). The face box is cut out and resized. Expression
  codes 0-6 map to Aff-Wild2's classes, 7 (Contempt) to Other with `--num-expr-classes 8` and
  to no label with 7, 8-9 (None, Uncertain) to no label, 10 (No-Face) drops the image; valence
  and arousal of -2 are missing.
- RAF-DB basic: `basic/EmoLabel/list_patition_label.txt` (`train_00001.jpg 5`; the file name
  is RAF-DB's own spelling), aligned images `basic/Image/aligned/<name>_aligned.jpg`; labels
  1-7 = Surprise, Fear, Disgust, Happiness, Sadness, Anger, Neutral; its test part is the
  validation split. No valence or arousal.

A malformed line stops the command with its file and line. An image that does not decode (or
is missing) is counted and skipped, and more than `--max-bad-fraction` of them stops it. The
output appears whole or not at all (written under a temporary name, renamed at the end).
"""
import argparse
import concurrent.futures
import csv
import os
import pathlib
import time

import cv2
import numpy as np
import tqdm

from affectjax import files, labels
from affectjax.data import annotations
from affectjax.data import layout
from affectjax.data.synthetic import generate

# AffectNet expression codes -> Aff-Wild2 classes (labels.EXPR_CLASSES_8); 7 is Contempt.
AFFECTNET_TO_AFFWILD2 = {0: 0, 1: 4, 2: 5, 3: 6, 4: 3, 5: 2, 6: 1, 7: 7}
AFFECTNET_NO_FACE = 10
AFFECTNET_VA_MISSING = -2.0
# RAF-DB basic labels 1..7 -> Aff-Wild2 classes.
RAFDB_TO_AFFWILD2 = {1: 6, 2: 3, 3: 2, 4: 4, 5: 5, 6: 1, 7: 0}
AFFECTNET_SPLITS = {'train': 'training.csv', 'validation': 'validation.csv'}
AFFECTNET_COLUMNS = ('subDirectory_filePath', 'expression', 'valence', 'arousal')
RAFDB_LIST = os.path.join('basic', 'EmoLabel', 'list_patition_label.txt')
RAFDB_SPLITS = {'train': 'train_', 'validation': 'test_'}


def _found(root: str, *candidates: str) -> str:
  for candidate in candidates:
    path = os.path.join(root, candidate)
    if os.path.exists(path):
      return path
  raise layout.DatasetLayoutError(f'{root}: none of {", ".join(candidates)} found')


def read_affectnet(root: str, split: str, num_expr_classes: int = 7) -> list:
  """[(image path, (x, y, w, h) or None, Aff-Wild2 expr or -1, valence, arousal)] of `split`."""
  name = AFFECTNET_SPLITS[split]
  path = _found(root, name, os.path.join('Manually_Annotated_file_lists', name))
  image_dir = os.path.join(root, 'Manually_Annotated_Images')
  image_dir = image_dir if os.path.isdir(image_dir) else root
  records = []
  with open(path, newline='', encoding='utf-8') as f:
    reader = csv.reader(f)
    header = [h.strip() for h in next(reader, [])]
    missing = [c for c in AFFECTNET_COLUMNS if c not in header]
    if missing:
      raise annotations.AnnotationError(f'{path}, line 1: no column {", ".join(missing)} in the '
                                        f'header (AffectNet: {", ".join(AFFECTNET_COLUMNS)}, ...)')
    col = {c: header.index(c) for c in header}
    box = [col.get(c) for c in ('face_x', 'face_y', 'face_width', 'face_height')]
    for row in reader:
      if not row or not ''.join(row).strip():
        continue
      try:
        if len(row) != len(header):
          raise ValueError(f'{len(row)} fields, the header has {len(header)}')
        code = int(row[col['expression']])
        va = [float(row[col['valence']]), float(row[col['arousal']])]
        face = None if None in box else tuple(int(float(row[i])) for i in box)
      except ValueError as e:
        raise annotations.line_error(path, reader.line_num, f'not an AffectNet row ({e})',
                                     ','.join(row).encode()) from None
      if code == AFFECTNET_NO_FACE:
        continue
      expr = AFFECTNET_TO_AFFWILD2.get(code, labels.EXPR_MISSING)
      expr = expr if expr < num_expr_classes else labels.EXPR_MISSING
      va = [labels.VA_MISSING if v == AFFECTNET_VA_MISSING else v for v in va]
      if not all(-1 <= v <= 1 or v == labels.VA_MISSING for v in va):
        raise annotations.line_error(path, reader.line_num, 'valence/arousal outside [-1, 1]',
                                     ','.join(row).encode())
      records.append((os.path.join(image_dir, row[col['subDirectory_filePath']]), face, expr,
                      *va))
  return records


def read_rafdb(root: str, split: str) -> list:
  """[(aligned image path, None, Aff-Wild2 expr, -5, -5)] of `split` (test = validation)."""
  path = _found(root, RAFDB_LIST)
  records = []
  with open(path, 'rb') as f:
    for lineno, line in enumerate(f, 1):
      words = line.split()
      if not words:
        continue
      if len(words) != 2 or not words[1].isdigit() or int(words[1]) not in RAFDB_TO_AFFWILD2:
        raise annotations.line_error(path, lineno, 'expected "<name>.jpg <label 1-7>"', line)
      name = words[0].decode()
      if name.startswith(RAFDB_SPLITS[split]):
        stem = os.path.splitext(name)[0]
        records.append((os.path.join(root, 'basic', 'Image', 'aligned', f'{stem}_aligned.jpg'),
                        None, RAFDB_TO_AFFWILD2[int(words[1])], labels.VA_MISSING,
                        labels.VA_MISSING))
  return records


def face_crop(path: str, box, size: int) -> bytes | None:
  """JPEG bytes of the image at `path` cut to `box` (x, y, w, h; None: whole) and resized to
  size x size; None when it does not decode or the box holds no pixel."""
  try:
    data = np.fromfile(path, np.uint8)
  except OSError:
    return None
  image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
  if image is None:
    return None
  if box is not None:
    x, y, w, h = box
    image = image[max(y, 0):max(y + h, 0), max(x, 0):max(x + w, 0)]
    if image.size == 0:
      return None
  image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
  ok, jpeg = cv2.imencode('.jpg', image, [cv2.IMWRITE_JPEG_QUALITY, 95])
  return jpeg.tobytes() if ok else None


def _write_video(out: str, split: str, video: str, records: list, crops: list,
                 num_expr_classes: int) -> list:
  """Writes one pseudo-video's crops and per-task files; [(video, frame, source)] written."""
  frame_dir = os.path.join(out, layout.IMAGE_DIR, video)
  os.makedirs(frame_dir, exist_ok=True)
  kept = [(r, c) for r, c in zip(records, crops) if c is not None]
  for k, (_, crop) in enumerate(kept, 1):
    with open(os.path.join(frame_dir, f'{k:05d}.jpg'), 'wb') as f:
      f.write(crop)
  lines = {'expr': [str(r[2]) for r, _ in kept],
           'va': [f'{r[3]:.4f},{r[4]:.4f}' if r[3] != labels.VA_MISSING or r[4] != labels.VA_MISSING
                  else '-5,-5' for r, _ in kept]}
  for task, body in lines.items():
    if task == 'va' and all(line == '-5,-5' for line in body):
      continue  # no VA in this video (RAF-DB): no VA file, as Aff-Wild2's per-task sets
    path = generate.task_file(pathlib.Path(out), task, split, video)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = ','.join(labels.TASK_TABLE[task].header(num_expr_classes))
    path.write_text('\n'.join([header] + body) + '\n')
  return [(video, k, r[0]) for k, (r, _) in enumerate(kept, 1)]


def convert(out: str, *, affectnet: str = '', rafdb: str = '', num_expr_classes: int = 7,
            image_size: int = 112, images_per_video: int = 1000, threads: int = 8,
            max_bad_fraction: float = 0.001, progress: bool = True) -> dict:
  """Writes the Aff-Wild2 per-task tree of the given datasets at `out`; returns its summary."""
  if not (affectnet or rafdb):
    raise ValueError('nothing to convert: give the AffectNet and/or the RAF-DB root')
  labels.expr_classes(num_expr_classes)  # validates
  datasets = [(n, r) for n, r in (('affectnet', affectnet), ('rafdb', rafdb)) if r]
  parts = [(name, split, read_affectnet(root, split, num_expr_classes) if name == 'affectnet'
            else read_rafdb(root, split)) for name, root in datasets for split in ('train',
                                                                                    'validation')]
  total = sum(len(p[2]) for p in parts)
  summary = {'out': os.path.abspath(out), 'images': total, 'written': {}, 'bad': 0,
             'bad_examples': []}
  start = time.perf_counter()
  with files.atomic_dir(out) as tmp, concurrent.futures.ThreadPoolExecutor(threads) as pool, \
      tqdm.tqdm(total=total, unit='image', disable=not progress, desc='crops',
                mininterval=2.0) as bar:
    sources = ['video,frame,source']
    for name, split, records in parts:
      written = 0
      for v, begin in enumerate(range(0, len(records), images_per_video), 1):
        chunk = records[begin:begin + images_per_video]
        crops = list(pool.map(lambda r: face_crop(r[0], r[1], image_size), chunk))
        bar.update(len(chunk))
        for record, crop in zip(chunk, crops):
          if crop is None:
            summary['bad'] += 1
            if len(summary['bad_examples']) < 5:
              summary['bad_examples'].append(record[0])
        if summary['bad'] > max(max_bad_fraction * total, 0):
          raise ValueError(f'{summary["bad"]} images do not decode (more than '
                           f'--max-bad-fraction={max_bad_fraction} of {total}), e.g. '
                           f'{summary["bad_examples"]}')
        rows = _write_video(tmp, split, f'{name}_{split}_{v:04d}', chunk, crops,
                            num_expr_classes)
        sources += [f'{video},{frame},{source}' for video, frame, source in rows]
        written += len(rows)
      summary['written'][f'{name}/{split}'] = written
    with open(os.path.join(tmp, 'sources.csv'), 'w') as f:
      f.write('\n'.join(sources) + '\n')
  summary['seconds'] = time.perf_counter() - start
  return summary


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--affectnet', default='', help='AffectNet root (training.csv, images)')
  parser.add_argument('--rafdb', default='', help='RAF-DB root (basic/)')
  parser.add_argument('--out', required=True, help='the Aff-Wild2-layout folder to write')
  parser.add_argument('--num-expr-classes', type=int, default=7, choices=(7, 8))
  parser.add_argument('--image-size', type=int, default=112)
  parser.add_argument('--images-per-video', type=int, default=1000)
  parser.add_argument('--threads', type=int, default=8)
  parser.add_argument('--max-bad-fraction', type=float, default=0.001)
  parser.add_argument('--overwrite', action='store_true', help='replace an existing --out')
  args = parser.parse_args(argv)
  if os.path.exists(args.out) and not args.overwrite:
    parser.exit(1, f'error: {args.out} exists (pass --overwrite to replace it)\n')
  try:
    s = convert(args.out, affectnet=args.affectnet, rafdb=args.rafdb,
                num_expr_classes=args.num_expr_classes, image_size=args.image_size,
                images_per_video=args.images_per_video, threads=args.threads,
                max_bad_fraction=args.max_bad_fraction)
  except (ValueError, OSError) as e:
    parser.exit(1, f'error: {e}\n')
  print(f'wrote {sum(s["written"].values())} crops of {s["images"]} images to {s["out"]} in '
        f'{s["seconds"]:.1f} s (' + ', '.join(f'{k} {v}' for k, v in s['written'].items()) +
        f'); {s["bad"]} did not decode' + (f', e.g. {s["bad_examples"][:3]}' if s['bad'] else '')
        + f'\ntrain on it with --config.data.root={s["out"]} (per-task layout)')


if __name__ == '__main__':
  main()
