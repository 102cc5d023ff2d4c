"""The incomplete-labels paper's alternating phases (Algorithm 1): its two readings of the E / A
frame sets, and each phase training its own task's loss alone; and the warning of a run that
its paper starts from pretrained weights started from scratch."""
import os

import jax
import numpy as np
import pytest

from affectjax import config as config_lib
from affectjax import parallel, trainer
from affectjax.data import sampling
from test_train import assert_trees_close, make_state_and_step, random_batch, tiny_config


class _Labels:
  """The two columns make_groups reads (has_label), as an index has them."""

  def __init__(self, expr, au):
    self.labelled = {'expr': np.asarray(expr, bool), 'au': np.asarray(au, bool)}

  def has_label(self, task):
    return self.labelled[task]


def test_phase_sets_exclusive_and_inclusive():
  rng = np.random.default_rng(0)
  e, a = rng.random(40) < 0.6, rng.random(40) < 0.5
  index = _Labels(e, a)
  expected = {'exclusive': (e & ~a, a & ~e, e & a), 'inclusive': (e, a, e & a)}
  for phase_sets, sets in expected.items():
    groups = sampling.make_groups(index, ('expr', 'au'), 'alternating', phase_sets)
    assert [p for p, _ in groups.phases] == [sampling.PHASE_EXPR_ONLY, sampling.PHASE_AU_ONLY,
                                             sampling.PHASE_BOTH]
    for (_, rows), mask in zip(groups.phases, sets):
      np.testing.assert_array_equal(rows, np.flatnonzero(mask))
  with pytest.raises(ValueError, match='phase_sets'):
    sampling.make_groups(index, ('expr', 'au'), 'alternating', 'both')


def test_a_phase_trains_its_task_alone_on_frames_with_both_labels():
  # Phase E (A is the same code path, sampling.FROZEN_TASKS_BY_PHASE): the AU labels of its
  # frames change nothing.
  phase, untrained = sampling.PHASE_EXPR_ONLY, 'au'
  # The program of test_train's alternating-phase test (the compilation cache has it).
  config = tiny_config(**{'optim.optimizer': 'adam'})
  state, step, mesh = make_state_and_step(config, 2, ('expr', 'au'))
  with_both = random_batch(0, phase)
  without = dict(with_both, **{untrained: np.full_like(with_both[untrained], -1)})
  a, metrics = step(jax.tree_util.tree_map(np.copy, jax.device_get(state)),
                    parallel.global_batch(with_both, mesh))
  b, _ = step(state, parallel.global_batch(without, mesh))
  assert_trees_close(jax.device_get(a.params), jax.device_get(b.params), 0, 0)
  assert float(metrics[f'count_{untrained}']) == 0.0


def test_a_run_its_paper_starts_from_weights_warns_when_started_from_scratch():
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  load = lambda spec: config_lib.load_config_file(os.path.join(repo, 'configs', spec))
  c = load('mtl.py:test')
  warning = trainer.init_warning(c)
  assert 'starts from VGGFace2 weights' in warning and 'trains from scratch' in warning
  c.init_from = '/weights/vggface2_r50'
  assert trainer.init_warning(c) is None
  assert 'ImageNet' in trainer.init_warning(load('unitask.py:va,test'))
  assert trainer.init_warning(load('mtl3.py:test')) is None  # its paper names no weights
  assert 'frozen stages' not in warning  # mtl.py trains every stage
  frozen = trainer.init_warning(load('mtl_va.py'))  # only layer4 and the heads train
  assert 'model.trainable=layer4' in frozen and 'random initial weights' in frozen
