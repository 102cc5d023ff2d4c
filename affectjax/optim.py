"""Optax optimisers and learning-rate schedules built from the config."""
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import traverse_util

OPTIMIZERS = ('adam', 'adamw', 'sgd')
SCHEDULES = ('cosine', 'constant')


def default_optim_config() -> ml_collections.ConfigDict:
  """Defaults of the incomplete-labels paper: Adam, cosine annealing from 1e-3."""
  return ml_collections.ConfigDict({
      'optimizer': 'adam',  # 'adam' | 'adamw' | 'sgd'
      'learning_rate': 1e-3,  # peak rate for a global batch of `global_batch_size`
      'schedule': 'cosine',  # 'cosine' | 'constant'
      'warmup_epochs': 0.0,
      'end_lr_factor': 0.0,  # the cosine ends at learning_rate * end_lr_factor
      'b1': 0.9,
      'b2': 0.999,
      'eps': 1e-8,
      'momentum': 0.9,  # sgd only
      'nesterov': False,  # sgd only
      'weight_decay': 0.0,  # decoupled for adamw, L2 added to the gradient for adam and sgd
      'grad_clip_norm': 0.0,  # 0 disables global-norm clipping
      # ReduceLROnPlateau (PyTorch's defaults), as optax.contrib.reduce_on_plateau on the
      # epoch-mean training loss ('train_loss') or on the validation score of each evaluation
      # ('val_score', higher is better; patience then counts evaluations): after `patience`
      # without an improvement of `rtol` (relative for the loss, absolute for the score), the
      # update is scaled by `factor` (then `cooldown` without a check).
      'plateau': ml_collections.ConfigDict({
          'enabled': False, 'monitor': 'train_loss', 'factor': 0.1, 'patience': 10,
          'rtol': 1e-4, 'cooldown': 0, 'min_scale': 0.0}),
  })


def learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int,
                           num_epochs: float) -> optax.Schedule:
  """Linear warmup then cosine decay (or constant), both measured in optimiser steps."""
  total_steps = max(int(round(num_epochs * steps_per_epoch)), 1)
  warmup_steps = min(int(round(config.warmup_epochs * steps_per_epoch)), total_steps - 1)
  peak = config.learning_rate
  if config.schedule == 'constant':
    main = optax.constant_schedule(peak)
  elif config.schedule == 'cosine':
    main = optax.cosine_decay_schedule(
        peak, decay_steps=max(total_steps - warmup_steps, 1), alpha=config.end_lr_factor)
  else:
    raise ValueError(f'optim.schedule must be one of {SCHEDULES}, got {config.schedule!r}')
  if warmup_steps == 0:
    return main
  warmup = optax.linear_schedule(0.0, peak, warmup_steps)
  return optax.join_schedules([warmup, main], boundaries=[warmup_steps])


def decay_mask(params: Any) -> Any:
  """True for kernels that take weight decay; BatchNorm scales/biases and all biases do not."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({k: k[-1] == 'kernel' for k in flat})


def create_optimizer(config: ml_collections.ConfigDict, schedule: optax.Schedule,
                     steps_per_epoch: int = 1, frozen: Callable[[Any], Any] | None = None
                     ) -> optax.GradientTransformationExtraArgs:
  """The configured optimiser with optional clipping, masked weight decay and plateau
  scaling. Its `update` takes the step's loss as `value=` (used by the plateau rule).
  `frozen(params)`, a tree of bools, marks parameters that never change (zero updates, no weight
  decay, no optimiser state)."""
  tx = optax.chain(*_optimizer_parts(config, schedule), *_plateau(config, steps_per_epoch))
  if frozen is None:
    return tx
  return optax.multi_transform(
      {'train': tx, 'frozen': optax.set_to_zero()},
      lambda params: jax.tree_util.tree_map(lambda f: 'frozen' if f else 'train',
                                            frozen(params)))


PLATEAU_MONITORS = ('train_loss', 'val_score')


def _plateau_rule(p, accumulation_size: int) -> optax.GradientTransformationExtraArgs:
  # PyTorch's patience is the number of bad epochs tolerated (it reduces after patience + 1);
  # optax reduces after `patience` of them. The validation score is fed negated (optax
  # minimises), where a relative tolerance would flip with the sign: it improves when it rises
  # by more than `rtol` (PyTorch's threshold_mode='abs').
  absolute = p.monitor == 'val_score'
  return optax.contrib.reduce_on_plateau(
      factor=p.factor, patience=p.patience + 1, rtol=0.0 if absolute else p.rtol,
      atol=p.rtol if absolute else 0.0, cooldown=p.cooldown,
      accumulation_size=accumulation_size, min_scale=p.min_scale)


def _plateau(config: ml_collections.ConfigDict, steps_per_epoch: int) -> list:
  p = config.plateau
  if not p.enabled:
    return []
  if p.monitor == 'train_loss':
    return [_plateau_rule(p, max(int(steps_per_epoch), 1))]
  rule = _plateau_rule(p, 1)  # the state; the steps only apply its scale (observe_plateau)

  def update(updates, state, params=None, **extra):
    del params, extra
    return jax.tree_util.tree_map(lambda u: (state.scale * u).astype(u.dtype), updates), state

  return [optax.GradientTransformationExtraArgs(rule.init, update)]


def observe_plateau(config: ml_collections.ConfigDict, opt_state, score: float):
  """The optimiser state after an evaluation with `score`: with plateau.monitor='val_score' the
  plateau rule sees it (a step towards reducing the scale when it does not improve); otherwise
  unchanged. The new leaves keep the old ones' shardings."""
  p = config.plateau
  if not (p.enabled and p.monitor == 'val_score'):
    return opt_state
  kind, rule = optax.contrib.ReduceLROnPlateauState, _plateau_rule(p, 1)

  def observe(state):
    new = rule.update({}, state, value=jnp.asarray(-score, jnp.float32))[1]
    return jax.tree_util.tree_map(lambda n, o: jax.device_put(n, o.sharding), new, state)

  return jax.tree_util.tree_map(lambda x: observe(x) if isinstance(x, kind) else x, opt_state,
                                is_leaf=lambda x: isinstance(x, kind))


def plateau_scale(opt_state) -> jax.Array | float:
  """The current plateau factor on the learning rate (1.0 without the plateau rule)."""
  kind = optax.contrib.ReduceLROnPlateauState
  found = [leaf for leaf in jax.tree_util.tree_leaves(opt_state,
                                                      is_leaf=lambda x: isinstance(x, kind))
           if isinstance(leaf, kind)]
  return found[0].scale if found else 1.0


def _optimizer_parts(config: ml_collections.ConfigDict, schedule: optax.Schedule) -> list:
  parts = []
  if config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  name = config.optimizer
  if name == 'adamw':
    parts.append(optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                             weight_decay=config.weight_decay, mask=decay_mask))
    return parts
  if config.weight_decay > 0:
    parts.append(optax.add_decayed_weights(config.weight_decay, mask=decay_mask))
  if name == 'adam':
    parts.append(optax.adam(schedule, b1=config.b1, b2=config.b2, eps=config.eps))
  elif name == 'sgd':
    parts.append(optax.sgd(schedule, momentum=config.momentum or None,
                           nesterov=config.nesterov))
  else:
    raise ValueError(f'optim.optimizer must be one of {OPTIMIZERS}, got {name!r}')
  return parts
