"""TFDS builder `affwild2`: the Aff-Wild2 frames and labels as a TensorFlow Datasets dataset.

Preparing it needs TensorFlow (`pip install affectjax[tfds]`); reading it back with
`tfds.data_source` (what `sources.TfdsSource` does) does not. This module imports
tensorflow_datasets at import time, so nothing in affectjax imports it except on demand.

  tfds build affwild2 --imports affectjax.data.tfds_builder --config per_task_7 \
      --manual_dir /data/affwild2 --data_dir ~/tensorflow_datasets --file_format array_record

then train with `data.source='tfds'`, `data.packed_dir=~/tensorflow_datasets`.

Examples are written in index order (shuffling disabled): example i of a split is row i of
`build_index(manual_dir, split, layout=..., num_expr_classes=...)` with all three tasks.
"""
import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from affectjax import labels
from affectjax.data import index as index_lib

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
  one folder and pass it as --manual_dir:

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
