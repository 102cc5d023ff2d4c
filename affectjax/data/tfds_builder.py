"""TFDS builder `affwild2`: the Aff-Wild2 frames and labels as a TensorFlow Datasets dataset.

Preparing it needs the `tfds` extra (`pip install -e '.[tfds]'`: tensorflow-datasets and the
importlib_resources its builders use), not TensorFlow: tensorflow-datasets 4.9.10 writes the same
examples with or without it. Reading it back with `tfds.data_source` (what `sources.TfdsSource`
does) needs no TensorFlow either. This module imports tensorflow_datasets at import time, so
nothing in affectjax imports it except on demand.

  python -m affectjax.data.tfds_builder --root /data/affwild2 --config per_task_7 \
      --data_dir /data/tfds

then train with `data.source='tfds'`, `data.packed_dir=/data/tfds` (and `data.root`:
the labels of the run's index are checked against the prepared ones). The config is the index
layout and EXPR class count of the run: `per_task_7` for configs/mtl.py, `mtl_8` for
configs/mtl3.py. (The `tfds build` command line of tensorflow-datasets also works with
`--imports affectjax.data.tfds_builder`, but it needs apache_beam, which the extra does not
install.)

Examples are written in index order (shuffling disabled): example i of a split is row i of
`build_index(manual_dir, split, layout=..., num_expr_classes=...)` with all three tasks.
"""
import argparse
import dataclasses
import os
import sys
import time

if __name__ == '__main__':
  # `python -m affectjax.data.tfds_builder`: TFDS finds a builder's files through its module,
  # which must be the importable one (and the builder must be registered once), not __main__.
  from affectjax.data import tfds_builder
  sys.exit(tfds_builder.main())

import numpy as np
import tensorflow_datasets as tfds

from affectjax import labels
from affectjax.data import annotations
from affectjax.data import index as index_lib
from affectjax.data import layout as layout_lib

LAYOUTS = ('per_task', 'mtl')


def config_name(layout: str, num_expr_classes: int) -> str:
  """Name of the builder config for an index layout and EXPR class count."""
  if layout not in LAYOUTS:
    raise ValueError(f'layout must be one of {LAYOUTS} (auto is resolved by the index), '
                     f'got {layout!r}')
  labels.expr_classes(num_expr_classes)
  return f'{layout}_{num_expr_classes}'


@dataclasses.dataclass
class Affwild2Config(tfds.core.BuilderConfig):
  layout: str = 'per_task'
  num_expr_classes: int = 7


class Affwild2(tfds.core.GeneratorBasedBuilder):
  """Aff-Wild2 cropped-and-aligned face frames with EXPR, AU and VA labels (-1 / -5 missing)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [
      Affwild2Config(name=config_name(layout, n), layout=layout, num_expr_classes=n,
                     description=f'{layout} annotations, {n} expression classes')
      for layout in LAYOUTS for n in (7, 8)
  ]
  DEFAULT_CONFIG_NAME = 'per_task_7'
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Aff-Wild2 is distributed by its authors under an end-user licence agreement
  (https://ibug.doc.ic.ac.uk/resources/aff-wild2/). Once granted access, put the release in
  one folder and pass it as --root (python -m affectjax.data.tfds_builder; --manual_dir of
  tfds build):

    <manual_dir>/cropped_aligned/<video>/<frame:05d>.jpg
    <manual_dir>/Annotations/{VA_Set,EXPR_Set,AU_Set}/{Train_Set,Validation_Set}/<video>.txt
      (config per_task_7 / per_task_8), or
    <manual_dir>/{training,validation}_set_annotations.txt   (config mtl_7 / mtl_8)
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
            'expr': tfds.features.Scalar(dtype=np.int32, doc='class, -1 missing'),
            'au': tfds.features.Tensor(shape=(labels.NUM_AUS,), dtype=np.int32,
                                       doc=f'{",".join(labels.AU_NAMES)}: 0/1, -1 missing'),
            'va': tfds.features.Tensor(shape=(2,), dtype=np.float32,
                                       doc='valence, arousal; -5 missing'),
            'index': tfds.features.Scalar(dtype=np.int32, doc='row of the frame index'),
            'video': tfds.features.Text(),
            'frame': tfds.features.Scalar(dtype=np.int32, doc='1-based frame number'),
        }),
        homepage='https://ibug.doc.ic.ac.uk/resources/aff-wild2/',
        disable_shuffling=True,  # example i = index row i, so sources can index by row
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = dl_manager.manual_dir
    return {split: self._generate_examples(root, split) for split in ('train', 'validation')}

  def _generate_examples(self, root, split: str):
    """Yields (row, example) for every row of the split's index, image as its file path."""
    index = index_lib.build_index(root, split, layout=self.builder_config.layout,
                                  tasks=labels.TASKS,
                                  num_expr_classes=self.builder_config.num_expr_classes)
    paths = index.image_paths()
    for row, path in enumerate(paths):
      yield row, {
          'image': path,
          'expr': np.int32(index.expr[row]),
          'au': index.au[row].astype(np.int32),
          'va': index.va[row],
          'index': np.int32(row),
          'video': index.video_names[index.video_id[row]],
          'frame': np.int32(index.frame[row]),
      }


def prepare(root: str, data_dir: str, name: str = 'per_task_7',
            file_format: str = 'array_record') -> dict:
  """Prepares the `affwild2/<name>` dataset from the Aff-Wild2 `root` into `data_dir`;
  returns {split: examples}."""
  config = next(c for c in Affwild2.BUILDER_CONFIGS if c.name == name)
  for split in layout_lib.SPLIT_FOLDERS:  # a wrong root: our message, before TFDS starts
    layout_lib.find_sources(os.path.abspath(root), split, config.layout, labels.TASKS)
  builder = Affwild2(config=name, data_dir=os.path.expanduser(data_dir), file_format=file_format)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=os.path.abspath(root)))
  return {split: info.num_examples for split, info in builder.info.splits.items()}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m affectjax.data.tfds_builder',
      description='Prepares the TFDS dataset affwild2 from an Aff-Wild2 root (needs the tfds '
                  "extra: pip install -e '.[tfds]').")
  parser.add_argument('--root', required=True, help='Aff-Wild2 root (cropped_aligned/, annotations)')
  parser.add_argument('--config', default=Affwild2.DEFAULT_CONFIG_NAME,
                      choices=[c.name for c in Affwild2.BUILDER_CONFIGS],
                      help='annotation layout and EXPR class count of the runs it serves')
  parser.add_argument('--data_dir', default='~/tensorflow_datasets',
                      help='TFDS data folder (data.packed_dir of the runs)')
  parser.add_argument('--file_format', default='array_record',
                      choices=('array_record', 'tfrecord'),
                      help='array_record: random access, what data.source=tfds reads')
  args = parser.parse_args(argv)
  start = time.perf_counter()
  try:
    counts = prepare(args.root, args.data_dir, args.config, args.file_format)
  except ModuleNotFoundError as e:
    print(f"error: preparing the TFDS dataset needs {e.name}: pip install -e '.[tfds]'",
          file=sys.stderr)
    return 1
  except (layout_lib.DatasetLayoutError, annotations.AnnotationError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  data_dir = os.path.expanduser(args.data_dir)
  print(f'prepared affwild2/{args.config} from {os.path.abspath(args.root)} in '
        f'{time.perf_counter() - start:.0f} s: '
        + ', '.join(f'{split} {n} examples' for split, n in sorted(counts.items()))
        + f' in {data_dir}; train with --config.data.source=tfds '
        f'--config.data.packed_dir={data_dir} --config.data.root={args.root}')
  return 0

