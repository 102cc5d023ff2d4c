"""Synthetic stand-ins for AffectNet and RAF-DB basic, in their own layouts, so that the path
of `affectjax.data.stills` (and the frame model's fine-tuning on them) runs without the
licensed sets:

  python -m affectjax.data.synthetic.stills --out /data/stills_src --images 600

writes `<out>/AffectNet` (`Manually_Annotated_file_lists/{training,validation}.csv`, images of
a face inside a larger picture under `Manually_Annotated_Images/<n>/`, the face box in the
CSV; AffectNet's expression codes, Contempt, None and No-Face rows included, valence/arousal
-2 where missing) and `<out>/RAF-DB` (`basic/EmoLabel/list_patition_label.txt`, 100x100
aligned faces `basic/Image/aligned/{train,test}_NNNNN_aligned.jpg`, RAF-DB's label codes).
Faces are drawn like the synthetic Aff-Wild2's (`faces.render_face`), each image its own
identity, the expression's prototype action units and valence-arousal as there.
"""
import argparse
import os

import cv2
import numpy as np

from affectjax import labels
from affectjax.data import stills
from affectjax.data.synthetic import faces, tracks

_AFFWILD2_TO_AFFECTNET = {v: k for k, v in stills.AFFECTNET_TO_AFFWILD2.items()}
_AFFWILD2_TO_RAFDB = {v: k for k, v in stills.RAFDB_TO_AFFWILD2.items()}
_CSV_HEADER = ('subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,'
               'expression,valence,arousal')


def _face(rng: np.random.Generator, expr: int, size: int) -> tuple:
  """(RGB uint8 [size, size, 3], valence, arousal) of a new identity showing Aff-Wild2 class
  `expr` (0-7; 7 Other stands for AffectNet's Contempt)."""
  target = tracks.segment_targets(rng, expr)
  au = np.clip(target + rng.normal(0, 0.04, target.shape), 0, 1)
  va = au[:labels.NUM_AUS] @ np.stack([tracks.VALENCE_WEIGHTS, tracks.AROUSAL_WEIGHTS], 1)
  va = np.clip(va + tracks.VA_OFFSETS[expr] + rng.normal(0, 0.06, 2), -1, 1)
  scene = faces.Scene(roll=rng.uniform(-8, 8), yaw=rng.uniform(-0.15, 0.15),
                      brightness=rng.uniform(0.85, 1.1), noise_std=rng.uniform(0, 3))
  rgb = faces.render_face(au[:labels.NUM_AUS], faces.Identity.sample(rng), scene, size, rng,
                          au[labels.NUM_AUS:])
  return rgb, float(va[0]), float(va[1])


def _jpeg(rgb: np.ndarray) -> bytes:
  ok, data = cv2.imencode('.jpg', cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                          [cv2.IMWRITE_JPEG_QUALITY, 92])
  assert ok
  return data.tobytes()


def write_affectnet(root: str, num_images: int, seed: int = 0) -> dict:
  """AffectNet's layout at `root`; returns {split: rows written}."""
  rng = np.random.default_rng([seed, 0xAF])
  counts = {}
  for split, name in stills.AFFECTNET_SPLITS.items():
    n = num_images if split == 'train' else max(num_images // 4, 8)
    rows = [_CSV_HEADER]
    for i in range(n):
      code = int(rng.choice(11, p=[.2, .2, .1, .08, .06, .05, .08, .05, .08, .05, .05]))
      sub = f'{i % 7}/{split}_{i:05d}.jpg'
      path = os.path.join(root, 'Manually_Annotated_Images', sub)
      os.makedirs(os.path.dirname(path), exist_ok=True)
      size = int(rng.integers(72, 112))
      canvas = rng.integers(0, 255, (size + 40, size + 56, 3), np.uint8)
      x, y = int(rng.integers(0, 56)), int(rng.integers(0, 40))
      expr = stills.AFFECTNET_TO_AFFWILD2.get(code, int(rng.integers(7)))
      face, valence, arousal = _face(rng, expr, size)
      canvas[y:y + size, x:x + size] = face
      with open(path, 'wb') as f:
        f.write(_jpeg(canvas))
      if code == stills.AFFECTNET_NO_FACE:
        valence = arousal = stills.AFFECTNET_VA_MISSING
      landmarks = ';'.join(f'{v:.1f}' for v in rng.uniform(0, size, 136))
      rows.append(f'{sub},{x},{y},{size},{size},{landmarks},{code},{valence:.4f},{arousal:.4f}')
    lists = os.path.join(root, 'Manually_Annotated_file_lists')
    os.makedirs(lists, exist_ok=True)
    with open(os.path.join(lists, name), 'w') as f:
      f.write('\n'.join(rows) + '\n')
    counts[split] = n
  return counts


def write_rafdb(root: str, num_images: int, seed: int = 0) -> dict:
  """RAF-DB basic's layout at `root`; returns {split: images written}."""
  rng = np.random.default_rng([seed, 0x4AF])
  aligned = os.path.join(root, 'basic', 'Image', 'aligned')
  os.makedirs(aligned, exist_ok=True)
  lines, counts = [], {}
  for split, prefix in stills.RAFDB_SPLITS.items():
    n = num_images if split == 'train' else max(num_images // 4, 8)
    for i in range(1, n + 1):
      expr = int(rng.choice(7, p=tracks.EXPR_PRIOR[:7] / tracks.EXPR_PRIOR[:7].sum()))
      face, _, _ = _face(rng, expr, 100)
      with open(os.path.join(aligned, f'{prefix}{i:05d}_aligned.jpg'), 'wb') as f:
        f.write(_jpeg(face))
      lines.append(f'{prefix}{i:05d}.jpg {_AFFWILD2_TO_RAFDB[expr]}')
    counts[split] = n
  path = os.path.join(root, stills.RAFDB_LIST)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  return counts


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True, help='writes <out>/AffectNet and <out>/RAF-DB')
  parser.add_argument('--images', type=int, default=600, help='training images of each set')
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)
  for name, write in (('AffectNet', write_affectnet), ('RAF-DB', write_rafdb)):
    counts = write(os.path.join(args.out, name), args.images, args.seed)
    print(f'synthetic {name} at {os.path.join(args.out, name)}: '
          + ', '.join(f'{k} {v}' for k, v in counts.items()), flush=True)


if __name__ == '__main__':
  main()
