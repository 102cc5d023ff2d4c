"""Checkpoints: weights-only initialisation from converted weights and from runs, key reports."""
import os

import jax
import numpy as np
import optax
import pytest

from affectjax import checkpoint as ckpt_lib
from affectjax import config as config_lib
from affectjax import train, weights
from affectjax.models import affect, resnet

IMAGE = (16, 16, 3)


def tiny_state(seed: int, tasks=('expr', 'au'), width: int = 4, kernel_layout: str = 'OHWI'):
  c = config_lib.base_config().model
  c.arch, c.width, c.head_hidden, c.kernel_layout = 'resnet18', width, 8, kernel_layout
  model = affect.create_model(c, tasks, 7)
  return train.create_train_state(model, optax.adam(1e-3), seed, IMAGE)


def leaves_equal(a, b) -> bool:
  return all(np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def test_merge_variables_reports_loaded_missing_unexpected_and_mismatched():
  target = {'a': {'kernel': np.zeros((2, 3))}, 'b': {'bias': np.zeros(4)},
            'c': {'scale': np.zeros(5)}}
  loaded = {'a': {'kernel': np.ones((2, 3))}, 'b': {'bias': np.ones(7)},
            'x': {'kernel': np.ones(1)}}
  merged, report = ckpt_lib.merge_variables(target, loaded)
  np.testing.assert_array_equal(merged['a']['kernel'], np.ones((2, 3)))
  np.testing.assert_array_equal(merged['b']['bias'], np.zeros(4))  # shape differs: kept
  assert report['loaded'] == ['a/kernel']
  assert report['missing'] == ['c/scale']  # b/bias is in the file, with another shape
  assert report['unexpected'] == ['x/kernel']
  assert report['mismatched'] == ['b/bias: (7,) vs (4,)']


def test_init_from_converted_backbone_weights_keeps_the_new_heads(tmp_path):
  source, fresh = tiny_state(1), tiny_state(2)
  variables = {'params': {'backbone': jax.device_get(source.params['backbone'])},
               'batch_stats': {'backbone': jax.device_get(source.batch_stats['backbone'])}}
  meta = {'arch': 'resnet18', 'width': 4, 'stride_on': '3x3', 'stem_pool': 'torch',
          'preprocessing': {'channel_order': 'RGB', 'mean': [0, 0, 0], 'std': [1, 1, 1]}}
  weights.save_converted(str(tmp_path), variables, meta)
  state, report = ckpt_lib.init_from(fresh, str(tmp_path))
  assert leaves_equal(state.params['backbone'], source.params['backbone'])
  assert leaves_equal(state.batch_stats['backbone'], source.batch_stats['backbone'])
  assert leaves_equal(state.params['head'], fresh.params['head'])
  assert report['missing'] and all(k.startswith('head/') for k in report['missing'])
  assert not report['unexpected'] and not report['mismatched']


def test_init_from_a_run_restores_its_weights_not_its_optimizer(tmp_path):
  source, fresh = tiny_state(3), tiny_state(4)
  checkpoints = ckpt_lib.Checkpoints(str(tmp_path / 'checkpoints'), async_save=False)
  checkpoints.save(7, source, {'step': 7}, score=1.0)
  checkpoints.close()
  state, report = ckpt_lib.init_from(fresh, str(tmp_path))
  assert leaves_equal(state.params, source.params)
  assert int(state.step) == 0 and not report['missing']


def _trained(state, seed: int):
  """`state` after one Adam step on random gradients: moments that are not zero."""
  rng = np.random.default_rng(seed)
  return state.apply_gradients(grads=jax.tree_util.tree_map(
      lambda p: rng.normal(size=p.shape).astype(np.float32), state.params))


@pytest.mark.parametrize('saved,into', [('HWIO', 'OHWI'), ('OHWI', 'HWIO')])
def test_checkpoints_and_weights_of_the_other_kernel_layout_read_exactly(tmp_path, saved, into):
  """A run or converted weights whose kernels are in the other layout (HWIO: flax's, every run
  and conversion before `model.kernel_layout`) are read into the model's layout, transposed
  and otherwise bit for bit: the resume (params and Adam moments), the inference restore and
  init_from."""
  source = _trained(tiny_state(8, kernel_layout=saved), 9)
  target = tiny_state(10, kernel_layout=into)
  assert resnet.kernel_layout_of(source.params) == saved
  assert resnet.kernel_layout_of(target.params) == into
  stem = source.params['backbone']['conv1']['kernel']
  checkpoints = ckpt_lib.Checkpoints(str(tmp_path / 'run' / 'checkpoints'), async_save=False)
  checkpoints.save(1, source, {'step': 1}, score=1.0)
  state, input_state = checkpoints.restore(target)
  assert input_state == {'step': 1} and int(state.step) == 1
  want = resnet.relayout(ckpt_lib.state_tree(source), into)
  np.testing.assert_array_equal(state.params['backbone']['conv1']['kernel'],
                                np.transpose(stem, (3, 0, 1, 2) if into == 'OHWI'
                                             else (1, 2, 3, 0)))
  assert jax.tree_util.tree_structure(ckpt_lib.state_tree(state)) == (
      jax.tree_util.tree_structure(want))
  assert leaves_equal(ckpt_lib.state_tree(state), want)  # params, statistics, both moments
  assert not leaves_equal(state.opt_state, target.opt_state)
  model = checkpoints.restore_model(target, 1)
  assert leaves_equal(model.params, want['params']) and leaves_equal(model.opt_state,
                                                                     target.opt_state)
  checkpoints.close()
  for path in (tmp_path / 'run', tmp_path / 'converted'):
    if path.name == 'converted':
      weights.save_converted(str(path), {'params': jax.device_get(source.params),
                                         'batch_stats': jax.device_get(source.batch_stats)},
                             {'arch': 'resnet18'})
    loaded, report = ckpt_lib.init_from(target, str(path))
    assert not report['mismatched'] and not report['missing'], path.name
    assert leaves_equal(loaded.params, want['params']), path.name


def test_kernel_layouts_are_told_apart_by_the_stem():
  """`kernel_layout_of` reads the stem kernel (never ambiguous: 3 input channels against a
  7x7 window), also of shapes; `relayout` leaves other arrays and kernel-free trees alone."""
  for width in (1, 3, 7, 64):
    hwio = {'conv1': {'kernel': np.zeros((7, 7, 3, width))}, 'fc': {'kernel': np.zeros((3, 7))},
            'layer1_0': {'conv2': {'kernel': np.zeros((3, 3, width, width))}}}
    assert resnet.kernel_layout_of(hwio) == 'HWIO'
    ohwi = resnet.relayout(hwio, 'OHWI')
    assert ohwi['conv1']['kernel'].shape == (width, 7, 7, 3)
    assert ohwi['layer1_0']['conv2']['kernel'].shape == (width, 3, 3, width)
    assert ohwi['fc']['kernel'].shape == (3, 7)
    assert resnet.kernel_layout_of(ohwi) == 'OHWI'
    shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), ohwi)
    assert resnet.kernel_layout_of(shapes) == 'OHWI'
    back = resnet.relayout(shapes, 'HWIO')
    assert back['conv1']['kernel'].shape == (7, 7, 3, width)
  assert resnet.kernel_layout_of({'head': {'kernel': np.zeros((4, 2))}}) is None
  tree = {'head': {'kernel': np.zeros((1, 2, 3, 4))}}  # no stem: as it is
  assert resnet.relayout(tree, 'OHWI') is tree
  with pytest.raises(ValueError, match='kernel_layout must be one of OHWI, HWIO'):
    resnet.relayout(hwio, 'OIHW')


def test_init_from_rejects_weights_that_match_nothing(tmp_path):
  source = tiny_state(5)
  variables = {'params': {'other': jax.device_get(source.params['backbone'])}, 'batch_stats': {}}
  weights.save_converted(str(tmp_path), variables, {'arch': 'resnet18'})
  with pytest.raises(ValueError, match='no parameter matched'):
    ckpt_lib.init_from(tiny_state(6), str(tmp_path))


def test_best_checkpoint_survives_a_restart(tmp_path):
  """The best-K policy and best_step() see the scores saved by an earlier process."""
  class State:  # the TrainState fields the checkpoint saves
    def __init__(self, value):
      self.step, self.params, self.batch_stats = value, {'w': np.full(3, value, np.float32)}, {}
      self.opt_state, self.rng = {}, np.zeros(2, np.uint32)

  first = ckpt_lib.Checkpoints(str(tmp_path), keep_latest=1, keep_best=1, async_save=False)
  for step, score in ((1, 0.2), (2, 0.9), (3, None), (4, 0.5)):
    first.save(step, State(step), {'step': step}, score=score)
  first.close()
  resumed = ckpt_lib.Checkpoints(str(tmp_path), keep_latest=1, keep_best=1, async_save=False)
  assert resumed.best_step() == 2
  for step, score in ((5, None), (6, 0.3)):
    resumed.save(step, State(step), {'step': step}, score=score)
  assert sorted(resumed.manager.all_steps()) == [2, 6]  # the best (0.9) and the latest
  assert resumed.best_step() == 2 and resumed.latest_step() == 6
  resumed.close()


EXPECTED_INIT = ("expected converted weights (python -m affectjax.convert --out) or a run's "
                 'workdir / checkpoints folder / step folder')


def _init_error(path) -> str:
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    ckpt_lib.read_variables(str(path))
  assert '\n' not in str(e.value)
  return str(e.value)


def test_init_from_a_missing_path_says_so_and_creates_nothing(tmp_path):
  missing = tmp_path / 'runs' / 'typo'
  assert _init_error(missing) == (
      f'init_from={missing}: no such file or directory; {EXPECTED_INIT}')
  assert not (tmp_path / 'runs').exists()
  with pytest.raises(ckpt_lib.CheckpointError):
    ckpt_lib.init_from(None, str(missing))  # fails before it touches the state
  assert not (tmp_path / 'runs').exists()


def test_init_from_says_what_it_found_and_what_it_expects(tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  assert _init_error(empty) == f'init_from={empty}: an empty folder; {EXPECTED_INIT}'
  assert os.listdir(empty) == []  # still empty: nothing was created in it
  random_file = tmp_path / 'weights.bin'
  random_file.write_bytes(os.urandom(64))
  assert _init_error(random_file) == (
      f'init_from={random_file}: a file, not a folder; {EXPECTED_INIT}')
  torch_file = tmp_path / 'resnet18.pth'
  torch_file.write_bytes(b'x')
  assert 'convert a weights file first: python -m affectjax.convert' in _init_error(torch_file)
  other = tmp_path / 'other'
  other.mkdir()
  (other / 'notes.txt').write_text('x')
  assert _init_error(other) == (
      f'init_from={other}: a folder of neither converted weights (affectjax_weights.json) nor '
      f'checkpoints (found: notes.txt); {EXPECTED_INIT}')
  half_converted = tmp_path / 'converted'
  half_converted.mkdir()
  (half_converted / weights.META_FILE).write_text('{}')
  assert 'converted weights without their variables/ folder' in _init_error(half_converted)


def test_init_from_a_checkpoints_folder_without_steps(tmp_path):
  checkpoints = tmp_path / 'checkpoints'
  checkpoints.mkdir()
  (checkpoints / '4.orbax-checkpoint-tmp-17').mkdir()  # a save that never finished
  message = ('holds no checkpoint step (found: 4.orbax-checkpoint-tmp-17/; steps are numbered '
             f'folders); {EXPECTED_INIT}')
  assert _init_error(tmp_path) == (
      f'init_from={tmp_path}: a workdir whose checkpoints/ folder {message}')
  assert _init_error(checkpoints) == (
      f'init_from={checkpoints}: a checkpoints folder that {message}')
  assert sorted(os.listdir(checkpoints)) == ['4.orbax-checkpoint-tmp-17']


def test_init_from_a_checkpoints_folder_or_a_step_folder(tmp_path):
  class State:  # the TrainState fields the checkpoint saves
    step, batch_stats, opt_state, rng = 3, {}, {}, np.zeros(2, np.uint32)
    params = {'w': np.arange(3, dtype=np.float32)}

  checkpoints = ckpt_lib.Checkpoints(str(tmp_path / 'checkpoints'), async_save=False)
  checkpoints.save(3, State(), {'step': 3})
  checkpoints.close()
  for path in (tmp_path, tmp_path / 'checkpoints', tmp_path / 'checkpoints' / '3'):
    np.testing.assert_array_equal(ckpt_lib.read_variables(str(path))['params']['w'],
                                  State.params['w'])


def test_init_from_a_run_reads_its_best_step_else_its_latest(tmp_path):
  class State:  # the TrainState fields the checkpoint saves
    batch_stats, opt_state, rng = {}, {}, np.zeros(2, np.uint32)

  def state(step):
    s = State()
    s.step, s.params = step, {'w': np.full(2, step, np.float32)}
    return s

  checkpoints = ckpt_lib.Checkpoints(str(tmp_path / 'checkpoints'), async_save=False,
                                     keep_latest=1, keep_best=1)
  checkpoints.save(1, state(1), {'step': 1}, score=0.9)  # the best
  checkpoints.save(2, state(2), {'step': 2}, score=0.1)
  checkpoints.save(3, state(3), {'step': 3})  # the latest, unscored
  assert (checkpoints.best_step(), checkpoints.latest_step()) == (1, 3)
  checkpoints.close()
  np.testing.assert_array_equal(ckpt_lib.read_variables(str(tmp_path))['params']['w'], [1, 1])
  unscored = ckpt_lib.Checkpoints(str(tmp_path / 'other'), async_save=False)
  unscored.save(4, state(4), {'step': 4})
  unscored.save(5, state(5), {'step': 5})
  unscored.close()
  np.testing.assert_array_equal(ckpt_lib.read_variables(str(tmp_path / 'other'))['params']['w'],
                                [5, 5])
