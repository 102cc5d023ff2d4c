"""AffectNet and RAF-DB (their own layouts, synthetic stand-ins written here) become an Aff-Wild2
per-task tree that the index and the pipeline read: labels mapped by class name, valence and
arousal kept, face boxes cut out; bad lines stop with their location, bad images are counted."""
import csv
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from affectjax import labels
from affectjax.data import annotations, pipeline, stills
from affectjax.data import index as index_lib
from affectjax.data.synthetic import stills as synthetic_stills

# The datasets' own class names by code, mapped to Aff-Wild2's by name (an independent table).
AFFECTNET_NAMES = ('Neutral', 'Happiness', 'Sadness', 'Surprise', 'Fear', 'Disgust', 'Anger',
                   'Contempt')
RAFDB_NAMES = {1: 'Surprise', 2: 'Fear', 3: 'Disgust', 4: 'Happiness', 5: 'Sadness', 6: 'Anger',
               7: 'Neutral'}


@pytest.fixture(scope='module')
def sources(tmp_path_factory):
  root = tmp_path_factory.mktemp('stills')
  synthetic_stills.write_affectnet(str(root / 'AffectNet'), 40, seed=3)
  synthetic_stills.write_rafdb(str(root / 'RAF-DB'), 24, seed=3)
  return root


def _expected(root, num_classes):
  """{source image path: (expr, valence, arousal)} read from the sets' own files."""
  names = labels.EXPR_CLASSES_8[:num_classes]
  want = {}
  for split_file in ('training.csv', 'validation.csv'):
    with open(root / 'AffectNet' / 'Manually_Annotated_file_lists' / split_file) as f:
      for row in csv.DictReader(f):
        code = int(row['expression'])
        if code == 10:
          continue  # No-Face: not written
        name = AFFECTNET_NAMES[code] if code < 8 else None
        name = 'Other' if name == 'Contempt' else name
        va = [float(row[k]) for k in ('valence', 'arousal')]
        want[str(root / 'AffectNet' / 'Manually_Annotated_Images' / row['subDirectory_filePath'])] = (
            names.index(name) if name in names else -1, *[-5.0 if v == -2 else v for v in va])
  for line in open(root / 'RAF-DB' / 'basic' / 'EmoLabel' / 'list_patition_label.txt'):
    name, code = line.split()
    path = root / 'RAF-DB' / 'basic' / 'Image' / 'aligned' / name.replace('.jpg', '_aligned.jpg')
    want[str(path)] = (names.index(RAFDB_NAMES[int(code)]), -5.0, -5.0)
  return want


@pytest.mark.parametrize('num_classes', [7, 8])
def test_converted_sets_carry_each_images_labels_and_face(sources, tmp_path, num_classes):
  out = tmp_path / 'out'
  summary = stills.convert(str(out), affectnet=str(sources / 'AffectNet'),
                           rafdb=str(sources / 'RAF-DB'), num_expr_classes=num_classes,
                           images_per_video=16, progress=False)
  want = _expected(sources, num_classes)
  assert summary['bad'] == 0 and sum(summary['written'].values()) == len(want)
  origin = {(r['video'], int(r['frame'])): r['source']
            for r in csv.DictReader(open(out / 'sources.csv'))}
  seen = 0
  for split in ('train', 'validation'):
    index = index_lib.build_index(str(out), split, layout='per_task', tasks=('expr', 'va'),
                                  num_expr_classes=num_classes, use_cache=False)
    for row in range(len(index)):
      source = origin[(index.video_names[index.video_id[row]], int(index.frame[row]))]
      expr, valence, arousal = want[source]
      assert index.expr[row] == expr, source
      np.testing.assert_allclose(index.va[row], [valence, arousal], atol=1e-4)
      seen += 1
  # Rows without any requested label (None/Uncertain without VA) are not indexed.
  assert seen == sum(1 for e, v, _ in want.values() if e >= 0 or v != -5)
  # The AffectNet crop is the CSV's face box, resized (PIL as the reference; JPEG tolerance).
  first = next(r for r in csv.DictReader(open(
      sources / 'AffectNet' / 'Manually_Annotated_file_lists' / 'training.csv')))
  x, y, w, h = (int(first[k]) for k in ('face_x', 'face_y', 'face_width', 'face_height'))
  image = Image.open(sources / 'AffectNet' / 'Manually_Annotated_Images' /
                     first['subDirectory_filePath']).convert('RGB')
  reference = np.asarray(image.crop((x, y, x + w, y + h)).resize((112, 112), Image.BOX), float)
  written = np.asarray(Image.open(out / 'cropped_aligned' / 'affectnet_train_0001' /
                                  '00001.jpg').convert('RGB'), float)
  assert np.abs(written - reference).mean() < 6
  # The pipeline reads it as Aff-Wild2.
  config = pipeline.default_data_config()
  config.tasks, config.read_threads = 'expr,va', 0
  index = index_lib.build_index(str(out), 'train', layout='per_task', tasks=('expr', 'va'),
                                num_expr_classes=num_classes, use_cache=False)
  batch = next(pipeline.make_train_iterator(index, config, global_batch_size=8, seed=0))
  assert batch['image'].shape == (8, 112, 112, 3) and batch['valid'].all()


def test_a_malformed_line_stops_with_its_file_and_line(sources, tmp_path):
  bad = tmp_path / 'AffectNet'
  os.makedirs(bad)
  lines = open(sources / 'AffectNet' / 'Manually_Annotated_file_lists' / 'training.csv').read(
  ).splitlines()
  lines[2] = lines[2].rsplit(',', 3)[0] + ',happy,0.1,0.2'
  (bad / 'training.csv').write_text('\n'.join(lines) + '\n')
  with pytest.raises(annotations.AnnotationError, match=r'training.csv, line 3: not an AffectNet'):
    stills.read_affectnet(str(bad), 'train')
  raf = tmp_path / 'RAF-DB' / 'basic' / 'EmoLabel'
  os.makedirs(raf)
  (raf / 'list_patition_label.txt').write_text('train_00001.jpg 5\ntrain_00002.jpg 9\n')
  with pytest.raises(annotations.AnnotationError, match=r'list_patition_label.txt, line 2'):
    stills.read_rafdb(str(tmp_path / 'RAF-DB'), 'train')


def test_bad_images_are_counted_and_skipped_within_the_tolerance(sources, tmp_path):
  copy = tmp_path / 'RAF-DB'
  shutil.copytree(sources / 'RAF-DB', copy)
  (copy / 'basic' / 'Image' / 'aligned' / 'train_00002_aligned.jpg').write_bytes(b'not a jpeg')
  os.remove(copy / 'basic' / 'Image' / 'aligned' / 'train_00003_aligned.jpg')
  summary = stills.convert(str(tmp_path / 'ok'), rafdb=str(copy), max_bad_fraction=0.1,
                           progress=False)
  assert summary['bad'] == 2 and summary['written']['rafdb/train'] == 22
  with pytest.raises(ValueError, match='2 images do not decode'):
    stills.convert(str(tmp_path / 'strict'), rafdb=str(copy), progress=False)
  assert not (tmp_path / 'strict').exists()  # nothing half-written
  # The command refuses an existing output folder.
  done = subprocess.run([sys.executable, '-m', 'affectjax.data.stills', '--rafdb', str(copy),
                         '--out', str(tmp_path / 'ok')], capture_output=True, text=True)
  assert done.returncode == 1 and 'exists (pass --overwrite' in done.stderr
