"""The data of a run's splits: the frame index (from the Aff-Wild2 root, packed shards, or the
built-in synthetic set), or for temporal runs the extracted features; their iterators; and the
loss weights computed from the training labels."""
import os

import jax
import ml_collections
from absl import logging

from affectjax import losses, parallel
from affectjax.data import index as index_lib
from affectjax.data import pipeline, sampling, sequences, sources
from affectjax.data.synthetic import generate as synthetic


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


def load_index(config: ml_collections.ConfigDict, split: str, tasks: tuple):
  """The frame index of `split`: from the Aff-Wild2 root, or from packed shards alone."""
  if not config.data.root and config.data.source == 'arrayrecord' and config.data.packed_dir:
    # Training from ArrayRecord shards without the raw tree: the pack carries its index.
    index = sources.packed_index(config.data.packed_dir, split)
    index = index.subset(sampling.labelled_rows(index, tasks))
  else:
    index = index_lib.build_index(
        data_root(config), split, layout=config.data.layout, tasks=tasks,
        num_expr_classes=config.num_expr_classes, cache_dir=config.data.cache_dir or None)
  if parallel.is_main_process():
    print(index.describe(), flush=True)
  return index


def is_temporal(config: ml_collections.ConfigDict) -> bool:
  """A temporal run: segments of per-frame features (configs/temporal.py), not images."""
  return config.kind == 'temporal'


def load_split(config: ml_collections.ConfigDict, split: str, tasks: tuple):
  """What a split's iterators read: its frame index, or for temporal runs its extracted
  features (a `sequences.FeatureSet`, whose `.index` is the frame index)."""
  if is_temporal(config):
    features = sequences.FeatureSet(config.temporal.features_dir, split)
    if parallel.is_main_process():
      print(f'{split}: {len(features.index)} frames of {features.dim}-d features from '
            f'{features.path} (checkpoint step {features.meta.get("step")})', flush=True)
    return features
  return load_index(config, split, tasks)


def frame_index(data):
  """The frame index of what `load_split` returned."""
  return data.index if isinstance(data, sequences.FeatureSet) else data


def make_train_iterator(config: ml_collections.ConfigDict, data):
  if is_temporal(config):
    return sequences.make_iterator(
        data, config.data, window=config.temporal.window, length=config.temporal.length,
        global_batch_size=config.global_batch_size, seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count())
  return pipeline.make_train_iterator(
      data, config.data, global_batch_size=config.global_batch_size, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count())


def make_eval_iterator(config: ml_collections.ConfigDict, data, labelled_only: bool = True):
  if is_temporal(config):
    return sequences.make_iterator(
        data, config.data, window=config.temporal.window, length=config.temporal.length,
        global_batch_size=config.eval_batch_size, training=False, labelled_only=labelled_only,
        process_index=jax.process_index(), process_count=jax.process_count())
  return pipeline.make_eval_iterator(
      data, config.data, global_batch_size=config.eval_batch_size,
      process_index=jax.process_index(), process_count=jax.process_count(),
      labelled_only=labelled_only)


def with_label_weights(config: ml_collections.ConfigDict, train_index
                       ) -> ml_collections.ConfigDict:
  """The config with data-dependent loss weights ('balanced', 'neg_pos_ratio') computed from
  the training index's labels of the trained tasks (saved in config.json as numbers)."""
  loss = config.loss
  if not (isinstance(loss.expr_class_weights, str) or isinstance(loss.au_pos_weight, str)):
    return config
  config = config.copy_and_resolve_references()
  with config.ignore_type():
    config.loss = losses.resolve_label_weights(loss, train_index.expr, train_index.au,
                                               config.num_expr_classes)
  for key in ('expr_class_weights', 'au_pos_weight'):
    if isinstance(loss[key], str):
      values = ', '.join(f'{w:.3g}' for w in config.loss[key])
      print(f'loss.{key} ({loss[key]}, from {len(train_index)} training frames): {values}',
            flush=True)
  return config
