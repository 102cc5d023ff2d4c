"""A run: its config resolved once, and what it derives from it before the first step (kind,
model, optimiser, mesh, initial state, the jitted steps).

`resolve_config` is the one place a config is completed: references resolved, data-dependent
loss weights computed from the training labels, the compute dtype and the BatchNorm axis set,
the input normalisation chosen and, for converted weights, their block layout copied in. Every
mode (training, evaluation, prediction, feature extraction) resolves once and hands the result
on; `config.json` of a run is the resolved config.
"""
import dataclasses
import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from affectjax import kinds, labels, losses, optim, parallel, train, weights
from affectjax.models import preprocess, resnet


@dataclasses.dataclass(frozen=True)
class Run:
  """Everything a run derives from its resolved config before the first step."""
  config: ml_collections.ConfigDict  # resolved (`resolve_config`)
  kind: kinds.Kind
  tasks: tuple
  mesh: Any
  model: Any
  state: train.TrainState
  steps_per_epoch: int
  total_steps: int
  schedule: Any

  def train_step(self):
    """The jitted data-parallel training step `(state, batch) -> (state, metrics)`; the state
    argument is donated."""
    return parallel.data_parallel(
        functools.partial(train.train_step, config=self.config, lr_schedule=self.schedule,
                          model_inputs=self.kind.model_inputs), self.mesh, donate_state=True)

  def eval_step(self):
    """The jitted data-parallel inference step `(state, batch) -> outputs` (split by batch);
    for a model that carries its state across segments, a `CarriedEval` of it."""
    step = parallel.data_parallel(
        functools.partial(train.eval_step, config=self.config,
                          model_inputs=self.kind.model_inputs), self.mesh, batch_out=True)
    return step if self.state.carry is None else CarriedEval(step, self.state.carry, self.mesh)


class CarriedEval:
  """An inference step that threads the recurrent states of its batch lanes from one call to
  the next, on the devices (split by batch like the outputs; the training state's own carry is
  left alone). The lanes start at zero; a segment flagged `reset` (a video's first) starts from
  zero anyway, so one pass over an evaluation split needs nothing else."""

  def __init__(self, step, template, mesh):
    self.step, self.carry = step, None
    self.zeros = jax.jit(lambda mask: jax.tree_util.tree_map(
        lambda x: jnp.zeros(mask.shape[:1] + x.shape[1:], x.dtype), template),
        out_shardings=parallel.batch_sharding(mesh))

  def __call__(self, state, batch):
    if self.carry is None:
      self.carry = self.zeros(batch['mask'])
    outputs = dict(self.step(state, dict(batch, carry=self.carry)))
    self.carry = outputs.pop('carry')
    return outputs


def resolve_dtype(name: str) -> str:
  if name == 'auto':
    return 'float32' if jax.default_backend() == 'cpu' else 'bfloat16'
  if name not in ('float32', 'bfloat16'):
    raise ValueError(f"config.dtype must be 'auto', 'float32' or 'bfloat16', got {name!r}")
  return name


def read_weights_meta(path: str) -> dict | None:
  """The metadata of converted weights (python -m affectjax.convert), None for a run dir."""
  meta_path = os.path.join(path, weights.META_FILE)
  if os.path.exists(meta_path):
    with open(meta_path) as f:
      return json.load(f)
  return None


def resolve_preprocessing(name: str, meta: dict | None) -> dict:
  """Input normalisation: the converted weights' own when 'auto', else the named preset."""
  if name == 'auto':
    if meta is not None:
      return dict(meta['preprocessing'])
    name = 'unit'
  if name not in preprocess.PRESETS:
    raise ValueError(f'config.preprocessing={name!r}: expected auto or one of '
                     f'{", ".join(preprocess.PRESETS)}')
  return dict(preprocess.PRESETS[name])


def _resolve_label_weights(config: ml_collections.ConfigDict, train_index) -> None:
  """Data-dependent loss weights ('balanced', 'neg_pos_ratio') from the training index's
  labels of the trained tasks, in place (config.json then holds the numbers)."""
  loss = config.loss
  if not (isinstance(loss.expr_class_weights, str) or isinstance(loss.au_pos_weight, str)):
    return
  with config.ignore_type():
    config.loss = losses.resolve_label_weights(loss, train_index.expr, train_index.au,
                                               config.num_expr_classes)
  for key in ('expr_class_weights', 'au_pos_weight'):
    if isinstance(loss[key], str):
      values = ', '.join(f'{w:.3g}' for w in config.loss[key])
      print(f'loss.{key} ({loss[key]}, from {len(train_index)} training frames): {values}',
            flush=True)


def resolve_config(config: ml_collections.ConfigDict, train_index=None
                   ) -> ml_collections.ConfigDict:
  """The config completed for a run (a copy; see the module docstring). Label weights are
  computed from `train_index` when given (training); inference needs no loss."""
  config = config.copy_and_resolve_references()
  kinds.get_kind(config)  # validates config.kind
  if train_index is not None:
    _resolve_label_weights(config, train_index)
  config.model.dtype = resolve_dtype(config.dtype)
  config.model.bn_axis_name = parallel.DATA_AXIS if config.model.sync_bn else None
  meta = read_weights_meta(config.init_from) if config.init_from else None
  with config.unlocked():
    config.input_preprocessing = resolve_preprocessing(config.preprocessing, meta)
  if meta is not None:
    # The block layout of the weights (VGGFace2: stride on the 1x1, ceil-mode pool) is part
    # of the weights; depth and width must be chosen to match them.
    config.model.stride_on, config.model.stem_pool = meta['stride_on'], meta['stem_pool']
    config.model.bn_epsilon = meta.get('bn_epsilon', config.model.bn_epsilon)
    weights.check_model_config(config.model, meta)
  return config


def build_run(config: ml_collections.ConfigDict, data, steps_per_epoch: int = 1) -> Run:
  """Model, optimiser, mesh and the replicated initial state of a resolved config; `data` is a
  split loaded by the config's kind (its features' width sizes a temporal model)."""
  if 'input_preprocessing' not in config:
    raise ValueError('build_run needs a resolved config: runs.resolve_config(config)')
  kind = kinds.get_kind(config)
  tasks = labels.parse_tasks(config.tasks)
  mesh = parallel.make_mesh(config.num_devices)
  if config.global_batch_size % mesh.size or config.eval_batch_size % mesh.size:
    raise ValueError(f'global_batch_size={config.global_batch_size} and eval_batch_size='
                     f'{config.eval_batch_size} must be multiples of the {mesh.size} devices')
  total_steps = max(int(round(config.num_epochs * steps_per_epoch)), 1)
  schedule = optim.learning_rate_schedule(config.optim, steps_per_epoch, config.num_epochs)
  parts = resnet.frozen_parts(config.model.get('trainable', 'all'))
  tx = optim.create_optimizer(
      config.optim, schedule, steps_per_epoch,
      frozen=functools.partial(resnet.frozen_parameters, frozen=parts) if parts else None)
  model = kind.create_model(config, tasks)
  state = train.create_train_state(model, tx, config.seed, kind.dummy_inputs(config, data),
                                   carry_lanes=config.global_batch_size)
  return Run(config, kind, tasks, mesh, model, state, steps_per_epoch, total_steps, schedule)
