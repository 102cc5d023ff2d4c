"""What differs between image runs and temporal runs, chosen once by `config.kind`.

A kind says how a split is loaded (`load_split`: the frame index of the face crops, or the
per-frame features an image run extracted), how the frames of a test list are loaded, the
training, evaluation and test iterators over what it loaded, the model, the dummy inputs that
initialise it, and what the model reads from a batch on the device (`model_inputs`). The steps,
the loop, checkpoints, evaluation and prediction are shared by every kind. A new kind of run is
one class here and one entry in `KINDS`.

`load_split` and `load_test` read the config's data fields only; everything after them uses the
resolved config of `runs.resolve_config`.
"""
import os
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from affectjax import labels, parallel, train
from affectjax.data import index as index_lib
from affectjax.data import pipeline, sampling, sequences, sources, unlabelled
from affectjax.data.synthetic import generate as synthetic
from affectjax.models import affect, stat, temporal


def data_root(config: ml_collections.ConfigDict) -> str:
  """The configured Aff-Wild2 root, or the synthetic Aff-Wild2 (generated once) when unset."""
  if config.data.root:
    return config.data.root
  cache = config.data.cache_dir or os.path.join(os.path.expanduser('~'), '.cache', 'affectjax')
  logging.info('config.data.root is unset: using the synthetic Aff-Wild2 in %s', cache)
  print(f'config.data.root is unset: training on the built-in synthetic Aff-Wild2 ({cache})',
        flush=True)
  return synthetic.ensure_synthetic(os.path.join(cache, 'synthetic'),
                                    **config.data.synthetic.to_dict())


def load_index(config: ml_collections.ConfigDict, split: str, tasks: tuple | None = None):
  """The frame index of `split` for `tasks` (default: the config's): from the Aff-Wild2 root,
  or from packed shards alone. The training split leaves out the validation videos of `tasks`
  (`data.holdout_validation_videos`, see `holdout_validation_videos`)."""
  tasks = tasks or labels.parse_tasks(config.tasks)
  root = None if packed_only(config) else data_root(config)
  index = _split_index(config, root, split, tasks)
  if split == 'train':
    index = holdout_validation_videos(index, _split_index(config, root, 'validation', tasks),
                                      config.data.holdout_validation_videos)
    if config.data.folds > 0 and 0 <= config.data.fold < config.data.folds:
      rest = fold_of_rows(index, config.data.folds) != config.data.fold
      if parallel.is_main_process():
        print(f'fold {config.data.fold} of {config.data.folds}: {int((~rest).sum())} training '
              'frames of its source videos left out (mode=oof predicts them)', flush=True)
      index = index.subset(np.flatnonzero(rest))
  if parallel.is_main_process():
    print(index.describe(), flush=True)
  return index


def fold_of_rows(index, folds: int) -> np.ndarray:
  """int [N]: the fold of each row. Whole source videos (both crops of a two-subject video
  together) go, most frames first, to the fold with the fewest frames so far: balanced folds,
  a function of the index alone."""
  sources = np.asarray(index.source_videos)[index.video_id] if len(index) else np.zeros(0, str)
  names, per_row, counts = np.unique(sources, return_inverse=True, return_counts=True)
  fold_of_source, load = np.zeros(len(names), np.int64), np.zeros(folds, np.int64)
  for s in sorted(range(len(names)), key=lambda s: (-counts[s], names[s])):
    fold_of_source[s] = int(np.argmin(load))
    load[fold_of_source[s]] += counts[s]
  return fold_of_source[per_row]


def packed_only(config: ml_collections.ConfigDict) -> bool:
  """Training from ArrayRecord shards without the raw tree: the pack carries its index."""
  return not config.data.root and config.data.source == 'arrayrecord' and config.data.packed_dir


def _split_index(config, root, split: str, tasks: tuple):
  if root is None:
    index = sources.packed_index(config.data.packed_dir, split)
    sources.check_packed_labels(index, config.data.packed_dir, config.data.layout, tasks,
                                config.num_expr_classes)
    return index.subset(sampling.labelled_rows(index, tasks))
  return index_lib.build_index(
      root, split, layout=config.data.layout, tasks=tasks,
      num_expr_classes=config.num_expr_classes, cache_dir=config.data.cache_dir or None)


def holdout_validation_videos(train_index, validation_index, holdout: bool):
  """`train_index` without the source videos that `validation_index` holds (when `holdout`).

  Aff-Wild2's per-task sets can place a video in one task's training set and another task's
  validation set; a multi-task run would then train on the frames of a video it validates on.
  Such overlaps are always reported; with `holdout` their training frames are removed and counted.
  """
  held = set(validation_index.source_videos)
  overlap = np.asarray([v in held for v in train_index.source_videos], bool)
  if not overlap.any():
    return train_index
  rows = overlap[train_index.video_id]
  names = sorted({train_index.source_videos[i] for i in np.flatnonzero(overlap)})
  shown = ', '.join(names[:5]) + (f' and {len(names) - 5} more' if len(names) > 5 else '')
  what = (f'{len(names)} source videos ({int(rows.sum())} frames) of the training split are also '
          f'validation videos of tasks {",".join(validation_index.summary.get("tasks", []))}: '
          f'{shown}')
  if not holdout:
    if parallel.is_main_process():
      print(f'warning: {what}; they stay in training (data.holdout_validation_videos=False), '
            'so validation scores on them are optimistic', flush=True)
    return train_index
  if parallel.is_main_process():
    print(f'{what}; held out of training (data.holdout_validation_videos)', flush=True)
  kept = train_index.subset(np.flatnonzero(~rows))
  kept.summary = dict(kept.summary, held_out_validation_videos=len(names),
                      held_out_frames=int(rows.sum()))
  return kept


def test_list(config: ml_collections.ConfigDict) -> str:
  """The test list file of `config.predict` (exactly one of videos / images)."""
  p = config.predict
  if bool(p.videos) == bool(p.images):
    raise ValueError('mode=predict needs exactly one of predict.videos (a file with one test '
                     'video per line) and predict.images (a file of <video>/<frame>.jpg lines)')
  return p.videos or p.images


def list_name(list_path: str) -> str:
  """A test list's name: its file name without the extension."""
  return os.path.splitext(os.path.basename(list_path))[0]


def test_split(list_path: str) -> str:
  """The features folder of a test list's frames: `test_<list name>`."""
  return 'test_' + list_name(list_path)


class Kind(Protocol):
  """The interface of a kind of run (`ImageKind`, `TemporalKind`)."""
  name: str
  extracts_features: bool  # mode=features can write its per-frame features

  def load_split(self, config, split: str) -> Any: ...  # what the iterators read
  def frame_index(self, data) -> Any: ...  # the AffWild2Index of what load_split returned
  def load_test(self, config) -> Any: ...  # the frames of config.predict's test list
  def train_iterator(self, config, data) -> Any: ...
  def eval_iterator(self, config, data, labelled_only: bool = True) -> Any: ...
  def test_iterator(self, config, data) -> Any: ...
  def prepare_eval(self, config, data) -> None: ...  # before training: caches to build
  def create_model(self, config, tasks: tuple) -> Any: ...
  def dummy_inputs(self, config, data) -> Any: ...  # initialises the model
  def model_inputs(self, batch, config, rng) -> Any: ...  # on the device, in the steps


def _process_share() -> dict:
  return dict(process_index=jax.process_index(), process_count=jax.process_count())


class ImageKind:
  """Face crops through a CNN and its task heads (configs/mtl*.py, expr.py, ...)."""
  name = 'image'
  extracts_features = True  # mode=features writes its per-frame features

  def load_split(self, config, split: str):
    return load_index(config, split)

  def frame_index(self, data):
    return data

  def load_test(self, config):
    """The frame index (labels missing) of the test list, crops under predict.root."""
    p = config.predict
    return unlabelled.frames_index(
        p.root or data_root(config),
        videos=unlabelled.read_video_list(p.videos) if p.videos else None,
        images=unlabelled.read_image_list(p.images) if p.images else None)

  block_length = staticmethod(lambda config: 0)  # frames per example (0: single frames)

  def train_iterator(self, config, data):
    return pipeline.make_train_iterator(
        data, config.data, global_batch_size=config.global_batch_size, seed=config.seed,
        block_length=self.block_length(config), **_process_share())

  def eval_iterator(self, config, data, labelled_only: bool = True, source=None):
    return pipeline.make_eval_iterator(
        data, config.data, global_batch_size=config.eval_batch_size,
        labelled_only=labelled_only, source=source, block_length=self.block_length(config),
        **_process_share())

  def test_iterator(self, config, data):
    """Every listed frame once, read from the crop folders (not from packed training data)."""
    return self.eval_iterator(config, data, labelled_only=False,
                              source=sources.make_source(data, config.data, source_type='jpeg'))

  def prepare_eval(self, config, data) -> None:
    """Decodes the evaluation frames into the decoded-frame cache now, when it is enabled."""
    if config.data.decoded_cache:
      sources.make_source(data, config.data)

  def create_model(self, config, tasks: tuple):
    return affect.create_model(config.model, tasks, config.num_expr_classes)

  def dummy_inputs(self, config, data) -> Any:
    del data  # the image size is the config's
    return (config.data.image_size, config.data.image_size, 3)

  model_inputs = staticmethod(train.image_inputs)


class BlockKind(ImageKind):
  """Blocks of face crops (a frame and its `temporal.length - 1` previous frames) through the
  frame model and the temporal statistical model, trained end to end (method 2,
  configs/temporal_stat.py:end_to_end)."""
  name = 'block'
  extracts_features = False
  block_length = staticmethod(lambda config: int(config.temporal.length))

  def create_model(self, config, tasks: tuple):
    m = config.model
    return stat.BlockModel(backbone=affect.create_backbone(m),
                           temporal=temporal.create_model(config.temporal, tasks,
                                                          config.num_expr_classes),
                           num_expr_classes=config.num_expr_classes, hidden=m.head_hidden,
                           dropout=m.dropout)

  def dummy_inputs(self, config, data) -> dict:
    del data
    size, length = config.data.image_size, config.temporal.length
    return {'image': jnp.zeros((1, length, size, size, 3), jnp.float32),
            'mask': jnp.ones((1, length), bool)}

  model_inputs = staticmethod(train.block_inputs)


def _inputs(config) -> str:
  """temporal.inputs ('embedding' in the config.json of a run from before the field)."""
  return config.temporal.get('inputs', 'embedding')


class TemporalKind:
  """Windows of per-frame features through a temporal model (configs/temporal*.py)."""
  name = 'temporal'
  extracts_features = False
  INPUT_KEYS = ('features', 'probs', 'mask', 'reset')

  def load_split(self, config, split: str):
    """The extracted features of `split` (a `sequences.FeatureSet`; `.index` its frames)."""
    features = sequences.FeatureSet(config.temporal.features_dir, split, _inputs(config))
    if parallel.is_main_process():
      print(f'{split}: {len(features.index)} frames of {features.dim}-d {features.inputs} from '
            f'{features.path} (checkpoint step {features.meta.get("step")})', flush=True)
    return features

  def frame_index(self, data):
    return data.index

  def load_test(self, config):
    """The test frames' features, extracted by the image run's mode=features with the list."""
    return sequences.FeatureSet(config.temporal.features_dir, test_split(test_list(config)),
                                _inputs(config))

  def _iterator(self, config, data, **kwargs):
    return sequences.make_iterator(data, config.data, window=config.temporal.window,
                                   length=config.temporal.length,
                                   carry_state=config.temporal.carry_state, **kwargs,
                                   **_process_share())

  def train_iterator(self, config, data):
    return self._iterator(config, data, global_batch_size=config.global_batch_size,
                          seed=config.seed)

  def eval_iterator(self, config, data, labelled_only: bool = True):
    return self._iterator(config, data, global_batch_size=config.eval_batch_size,
                          training=False, labelled_only=labelled_only)

  def test_iterator(self, config, data):
    return self.eval_iterator(config, data, labelled_only=False)

  def prepare_eval(self, config, data) -> None:
    del config, data  # features are read from memory maps

  def create_model(self, config, tasks: tuple):
    return temporal.create_model(config.temporal, tasks, config.num_expr_classes)

  def dummy_inputs(self, config, data) -> dict:
    """Zeros shaped like a window of `data`'s features (and EXPR probabilities)."""
    length = config.temporal.length
    inputs = {'features': jnp.zeros((1, length, data.dim), jnp.float32),
              'mask': jnp.ones((1, length), bool)}
    if data.probs is not None:
      inputs['probs'] = jnp.zeros((1, length, data.probs.shape[1]), jnp.float32)
    return inputs

  @staticmethod
  def model_inputs(batch, config, rng):
    del config, rng  # no device-side preprocessing or augmentation of features
    return {k: batch[k] for k in TemporalKind.INPUT_KEYS if k in batch}


KINDS: dict[str, Kind] = {'image': ImageKind(), 'block': BlockKind(),
                          'temporal': TemporalKind()}


def get_kind(config: ml_collections.ConfigDict) -> Kind:
  """The kind named by `config.kind`."""
  if config.kind not in KINDS:
    raise ValueError(f'config.kind={config.kind!r}: expected one of {", ".join(KINDS)}')
  return KINDS[config.kind]
