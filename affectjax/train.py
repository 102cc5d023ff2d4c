"""Train state and the pure per-device train and evaluation steps.

The steps are written as per-device code with collectives over the mesh axis `DATA_AXIS`
(`lax.psum`, and BatchNorm's `axis_name` when `model.sync_bn`), the way `pmap` code is written,
and wrapped by `parallel.data_parallel` as `jax.jit(jax.shard_map(...))` over a 1-D mesh. What
the model reads from a batch is the run kind's `model_inputs` (affectjax.kinds): the images, or
the feature segments of the temporal models.
"""
import collections.abc
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.training import train_state

from affectjax import labels, losses
from affectjax import optim
from affectjax.data import sampling
from affectjax.models import preprocess
from affectjax.parallel import DATA_AXIS


# (batch, config, augmentation key or None) -> the model's input (affectjax.kinds).
ModelInputs = Callable[[Mapping[str, jax.Array], ml_collections.ConfigDict, Any], Any]


class TrainState(train_state.TrainState):
  """Flax TrainState plus BatchNorm statistics, the PRNG key for dropout/augmentation and, for
  temporal models that carry their state across segments, the 'carry' collection of every
  batch lane of the global batch (replicated; None otherwise)."""
  batch_stats: Any = None
  rng: jax.Array = None
  carry: Any = None


@jax.tree_util.register_pytree_node_class
class StepMetrics(collections.abc.Mapping):
  """A step's scalar metrics as one float32 vector (`vector`, in the order of `names`), read
  as a Mapping (`metrics['loss']`: an element of the vector, a device array until
  `jax.device_get`). The step then has one metrics output, and the loop copies one array to
  the host per step, instead of one of each per metric (15 in the multi-task step): host time
  that every step pays, on the thread that dispatches the steps."""

  def __init__(self, vector, names):
    self.vector, self.names = vector, tuple(names)

  @classmethod
  def pack(cls, metrics: Mapping[str, jax.Array]) -> 'StepMetrics':
    names = sorted(metrics)
    return cls(jnp.stack([jnp.asarray(metrics[k], jnp.float32) for k in names]), names)

  def __getitem__(self, name: str):
    if name not in self.names:
      raise KeyError(name)
    return self.vector[self.names.index(name)]

  def __iter__(self):
    return iter(self.names)

  def __len__(self) -> int:
    return len(self.names)

  def tree_flatten(self):
    return (self.vector,), self.names

  @classmethod
  def tree_unflatten(cls, names, children):
    return cls(children[0], names)


def create_train_state(model, tx: optax.GradientTransformation, seed: int,
                       inputs, carry_lanes: int = 1) -> TrainState:
  """Initialises parameters on a dummy batch: zeros of image shape `inputs` (H, W, 3), or
  `inputs` itself when it is a dict of dummy arrays (the temporal models).

  Compiled as one program (`jax.jit`): a ResNet50's state starts in about 4 s on a 2-core
  CPU instead of 9 op by op, a test-sized ResNet18's in 1.9 instead of 5.1. Initialisation
  draws from an 'rbg' key: XLA compiles a whole-ResNet init with it several times faster on
  CPU than with threefry. The state's own key (dropout, augmentation) is a plain threefry
  key, which Orbax saves as an ordinary array.
  """
  def init(dummy):
    init_key = jax.random.key(seed, impl='rbg')
    variables = model.init({'params': init_key, 'dropout': init_key}, dummy, train=False)
    carry = variables.get('carry')  # zero states of `carry_lanes` lanes (the global batch)
    if carry is not None:
      carry = jax.tree_util.tree_map(
          lambda x: jnp.zeros((carry_lanes,) + x.shape[1:], x.dtype), carry)
    return TrainState.create(apply_fn=model.apply, params=variables['params'],
                             batch_stats=variables.get('batch_stats', {}), tx=tx,
                             rng=jax.random.fold_in(jax.random.PRNGKey(seed), 1), carry=carry)

  dummy = (inputs if isinstance(inputs, Mapping)
           else jnp.zeros((1,) + tuple(inputs), jnp.float32))
  return jax.jit(init)(dummy)


def _gather_lanes(local: Any, carry: Any) -> Any:
  """Every device's lanes back into a replicated global-batch carry: each device's rows in
  place in zeros, summed over the devices (a psum: its result is replicated)."""
  def gather(x, into):
    start = jax.lax.axis_index(DATA_AXIS) * x.shape[0]
    placed = jax.lax.dynamic_update_slice_in_dim(jnp.zeros_like(into), x.astype(into.dtype),
                                                 start, axis=0)
    return jax.lax.psum(placed, DATA_AXIS)
  return jax.tree_util.tree_map(gather, local, carry)


def _lanes_of_this_device(carry: Any, lanes: int) -> Any:
  """This device's rows of a replicated global-batch carry (its share of the batch lanes)."""
  start = jax.lax.axis_index(DATA_AXIS) * lanes
  return jax.tree_util.tree_map(
      lambda x: jax.lax.dynamic_slice_in_dim(x, start, lanes, axis=0), carry)


def _head_path_selector(tasks: tuple) -> Callable:
  """Predicate on a key path: True for leaves of the heads of `tasks` (params or optimiser state)."""
  def selected(path) -> bool:
    keys = [getattr(k, 'key', getattr(k, 'name', None)) for k in path]
    return any(keys[i] == 'head' and keys[i + 1] in tasks for i in range(len(keys) - 1))
  return selected


def keep_frozen_heads(new: Any, old: Any, frozen: jax.Array, tasks: tuple) -> Any:
  """Where `frozen`, keeps the old leaves of the heads of `tasks` in `new` (params or opt_state)."""
  selected = _head_path_selector(tasks)
  return jax.tree_util.tree_map_with_path(
      lambda p, n, o: jnp.where(frozen, o, n) if selected(p) else n, new, old)


def prepare_images(images_uint8: jax.Array, config: ml_collections.ConfigDict,
                   rng: jax.Array | None) -> jax.Array:
  """Device-side input: normalise to the weights' preprocessing, augment."""
  images = preprocess.normalize(images_uint8, config.input_preprocessing, jnp.float32)
  return _augment(images, config, rng)


def _augment(images: jax.Array, config: ml_collections.ConfigDict,
             rng: jax.Array | None) -> jax.Array:
  aug = config.device_augment
  if rng is not None and (aug.flip or aug.rotate_deg or aug.scale or aug.translate):
    images = preprocess.augment(images, rng, flip=aug.flip, max_rotate_deg=aug.rotate_deg,
                                max_scale=aug.scale, max_translate=aug.translate)
  return images


def image_inputs(batch: Mapping[str, jax.Array], config: ml_collections.ConfigDict,
                 rng: jax.Array | None) -> jax.Array:
  """The model input of an image batch: its prepared `image`."""
  return prepare_images(batch['image'], config, rng)


def block_inputs(batch: Mapping[str, jax.Array], config: ml_collections.ConfigDict,
                 rng: jax.Array | None) -> dict:
  """The model input of a batch of frame blocks (image [B, S, H, W, 3]): the normalised frames,
  augmented with one draw per block (its frames as the channels of one image), and their mask."""
  images = preprocess.normalize(batch['image'], config.input_preprocessing, jnp.float32)
  b, s, h, w, c = images.shape
  stacked = jnp.moveaxis(images, 1, 3).reshape(b, h, w, s * c)
  images = jnp.moveaxis(_augment(stacked, config, rng).reshape(b, h, w, s, c), 3, 1)
  return {'image': images, 'mask': batch['mask']}


def flatten_time(outputs: Mapping[str, jax.Array], batch: Mapping[str, Any]) -> tuple:
  """Segment batches ([B, L] labels) as [B * L] frames for the losses and metrics; other
  batches unchanged. Works on jax and NumPy arrays."""
  if batch['valid'].ndim == 1:
    return outputs, batch
  frames = batch['valid'].shape[0] * batch['valid'].shape[1]
  flat = lambda x: x.reshape((frames,) + tuple(x.shape[2:]))
  keys = ('expr', 'au', 'va', 'valid', 'index')
  flat_batch = dict(batch, **{k: flat(batch[k]) for k in keys if k in batch})
  return {k: flat(v) for k, v in outputs.items()}, flat_batch


def without_untrained_labels(batch: Mapping[str, jax.Array], phase: jax.Array) -> dict:
  """`batch` with the labels of the task `phase` does not train set to their sentinels
  (sampling.FROZEN_TASKS_BY_PHASE): the alternating E phase trains on the EXPR loss alone even
  where its frames carry AU labels (data.phase_sets='inclusive'), and A on the AU loss alone."""
  out = dict(batch)
  for frozen_phase, tasks in sampling.FROZEN_TASKS_BY_PHASE.items():
    for task in (t for t in tasks if t in out):
      out[task] = jnp.where(phase == frozen_phase, labels.TASK_TABLE[task].missing, out[task])
  return out


def train_step(state: TrainState, batch: Mapping[str, jax.Array], *,
               config: ml_collections.ConfigDict, lr_schedule: optax.Schedule,
               model_inputs: ModelInputs) -> tuple[TrainState, StepMetrics]:
  """One optimisation step on this device's share of the global batch.

  Losses are global-batch means (sums, counts and CCC moments psum'd over DATA_AXIS inside
  `multitask_loss`). Under shard_map's replication checking the gradient of that
  device-invariant loss with respect to the replicated parameters is already the global
  gradient (the transpose of the replicated-to-varying cast is a psum), so the `pmean` below
  is a no-op kept for clarity; a `psum` would scale the update by the device count.
  A non-finite loss leaves the state unchanged and is reported in the metrics (`finite`).
  """
  rng, step_rng = jax.random.split(state.rng)
  device_rng = jax.random.fold_in(step_rng, jax.lax.axis_index(DATA_AXIS))
  aug_rng, dropout_rng = jax.random.split(device_rng)
  inputs = model_inputs(batch, config, aug_rng)
  phase = jax.lax.pmax(batch['phase'][0], DATA_AXIS)  # same on every row and device
  batch = without_untrained_labels(batch, phase)

  variables = {'batch_stats': state.batch_stats}
  if state.carry is not None:
    variables['carry'] = _lanes_of_this_device(state.carry, batch['valid'].shape[0])

  def loss_fn(params):
    outputs, new_vars = state.apply_fn(
        dict(variables, params=params), inputs, train=True, rngs={'dropout': dropout_rng},
        mutable=list(variables))
    flat_outputs, flat_batch = flatten_time(outputs, batch)
    total, aux = losses.multitask_loss(flat_outputs, flat_batch, config.loss,
                                       axis_name=DATA_AXIS)
    return total, (aux, new_vars)

  (total, (aux, new_vars)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  batch_stats = new_vars['batch_stats']
  grads = jax.lax.pmean(grads, DATA_AXIS)
  if not config.model.sync_bn:
    # Per-device statistics (like DDP without SyncBatchNorm); averaged so the state stays
    # replicated. Averaging running variances is the usual approximation.
    batch_stats = jax.lax.pmean(batch_stats, DATA_AXIS)

  def update(old: TrainState) -> TrainState:
    # tx.update rather than apply_gradients: the loss goes to the plateau rule (optim.py).
    updates, opt_state = old.tx.update(grads, old.opt_state, old.params, value=total)
    new = old.replace(step=old.step + 1, params=optax.apply_updates(old.params, updates),
                      opt_state=opt_state, batch_stats=batch_stats)
    for frozen_phase, tasks in sampling.FROZEN_TASKS_BY_PHASE.items():
      frozen = phase == frozen_phase
      new = new.replace(
          params=keep_frozen_heads(new.params, old.params, frozen, tasks),
          opt_state=keep_frozen_heads(new.opt_state, old.opt_state, frozen, tasks))
    return new

  # A non-finite loss (identical on every device: it is psum'd) skips the update: a select per
  # array, which XLA fuses into the update's own kernels (in place in the donated state). Not
  # lax.cond: a GPU runs a conditional by copying its predicate to the host and blocking the
  # host until then, every step, so the host could never queue the next step ahead.
  finite = jnp.isfinite(total)
  new_state = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old),
                                     update(state), state)
  # The rng, and the carried states (the lanes have moved on), advance even when the update
  # is skipped.
  new_state = new_state.replace(rng=rng)
  if state.carry is not None:
    new_state = new_state.replace(carry=_gather_lanes(new_vars['carry'], state.carry))
  metrics = dict(aux, loss=total, grad_norm=optax.tree.norm(grads), finite=finite,
                 learning_rate=lr_schedule(state.step) * optim.plateau_scale(state.opt_state))
  return new_state, StepMetrics.pack(metrics)


def eval_step(state: TrainState, batch: Mapping[str, jax.Array], *,
              config: ml_collections.ConfigDict,
              model_inputs: ModelInputs) -> dict:
  """Per-device inference on this device's share; returns the model outputs (float32). A
  batch with 'carry' (the states of its lanes, see `runs.CarriedEval`) also gets the new ones
  back under 'carry'."""
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  inputs = model_inputs(batch, config, None)
  if 'carry' not in batch:
    outputs = state.apply_fn(variables, inputs, train=False)
    return {k: v.astype(jnp.float32) for k, v in outputs.items()}
  outputs, new_vars = state.apply_fn(dict(variables, carry=batch['carry']), inputs,
                                     train=False, mutable=['carry'])
  return dict({k: v.astype(jnp.float32) for k, v in outputs.items()}, carry=new_vars['carry'])
