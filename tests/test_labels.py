"""The task table and its helpers: one parser, sentinels, masking, model outputs."""
import numpy as np
import pytest

from affectjax import labels
from affectjax.data import sampling


def test_parse_tasks_gives_the_canonical_order_and_names_bad_entries():
  assert labels.parse_tasks('va, expr') == ('expr', 'va')
  assert labels.parse_tasks(['au', 'expr', 'au']) == ('expr', 'au')
  assert labels.parse_tasks(labels.TASKS) == labels.TASKS == ('expr', 'au', 'va')
  with pytest.raises(ValueError, match=r"unknown task 'pose'.*expr,au,va"):
    labels.parse_tasks('expr,pose')
  for empty in ('', ' , ', ()):
    with pytest.raises(ValueError, match='no task'):
      labels.parse_tasks(empty)


def test_missing_labels_and_masking():
  for kind, dtypes in (('index', (np.int8, np.int8, np.float32)),
                       ('batch', (np.int32, np.int32, np.float32)),
                       ('decision', (np.int64, np.int64, np.float64))):
    empty = labels.missing_labels(3, kind)
    assert list(empty) == list(labels.TASKS)
    assert [v.dtype for v in empty.values()] == [np.dtype(d) for d in dtypes]
    assert [v.shape for v in empty.values()] == [(3,), (3, labels.NUM_AUS), (3, 2)]
    assert not any(labels.has_label(t, v).any() for t, v in empty.items())
  batch = {'expr': np.array([2, 0]), 'au': np.ones((2, 12), np.int32),
           'va': np.zeros((2, 2), np.float32)}
  labels.mask_untrained(batch, ('au',))
  assert batch['expr'].tolist() == [-1, -1] and (batch['va'] == labels.VA_MISSING).all()
  assert (batch['au'] == 1).all()


def test_has_label_counts_a_row_with_any_column():
  au = np.full((3, 12), -1)
  au[1, 4] = 0
  assert labels.has_label('au', au).tolist() == [False, True, False]
  va = np.array([[-5.0, 0.1], [-5.0, -5.0]])
  assert labels.has_label('va', va).tolist() == [True, False]


def test_model_outputs_and_headers():
  assert labels.model_outputs(('va', 'expr'), 8, va5=True) == (
      ('expr', 8, 'linear'), ('va', 2, 'tanh'), ('va5', 5, 'tanh'))
  assert labels.model_outputs(('au',), 7, va5=True) == (('au', 12, 'linear'),)
  for task in labels.TASK_TABLE.values():
    for classes in (7, 8):
      assert len(task.header(classes)) == task.output_size(classes)
  assert [t.submission_name for t in labels.TASK_TABLE.values()] == ['EXPR', 'AU', 'VA']


def test_frozen_heads_are_tasks_and_phases():
  for phase, frozen in sampling.FROZEN_TASKS_BY_PHASE.items():
    assert phase in sampling.PHASE_NAMES and set(frozen) <= set(labels.TASKS)
