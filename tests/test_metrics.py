"""Tests for affectjax.metrics against scikit-learn and an independent NumPy CCC."""
import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score

from affectjax import metrics

NUM_AUS = 12


def _np_ccc(x, y):
  """CCC from its definition in methods.md, population statistics."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  cov = np.mean((x - x.mean()) * (y - y.mean()))
  return 2 * cov / (x.var() + y.var() + (x.mean() - y.mean()) ** 2)


def _sk_expr(pred, target, c):
  m = target >= 0
  return (f1_score(target[m], pred[m], average='macro', labels=range(c), zero_division=0),
          accuracy_score(target[m], pred[m]))


def _sk_au(pred, target):
  per_au = [f1_score(target[target[:, k] >= 0, k], pred[target[:, k] >= 0, k], zero_division=0)
            for k in range(target.shape[1])]
  m = target >= 0
  return per_au, accuracy_score(target[m], pred[m])


def _eval_data(rng, n, c=8, p_missing=0.25):
  """Random outputs and labels with missing labels and padding rows holding garbage outputs."""
  expr_logits = rng.standard_normal((n, c)).astype(np.float32)
  expr_logits[:, c - 1] -= 100.0  # the last class is never predicted
  expr = rng.integers(0, c - 2, n).astype(np.int32)  # class c-2 never present
  expr[rng.random(n) < p_missing] = -1
  au_logits = (2 * rng.standard_normal((n, NUM_AUS))).astype(np.float32)
  au = (rng.random((n, NUM_AUS)) < 0.3).astype(np.int32)
  au[:, 3] = 0  # an AU never present
  au[rng.random(n) < p_missing] = -1
  au[rng.random((n, NUM_AUS)) < 0.05] = -1
  va = rng.uniform(-1, 1, (n, 2)).astype(np.float32)
  va_pred = np.clip(0.5 * va + 0.3 * rng.standard_normal((n, 2)), -1, 1).astype(np.float32)
  va[rng.random(n) < p_missing] = -5.0
  valid = rng.random(n) > 0.1
  expr[~valid], au[~valid], va[~valid] = -1, -1, -5.0
  expr_logits[~valid] = 1e3 * rng.standard_normal((np.sum(~valid), c))
  au_logits[~valid], va_pred[~valid] = 50.0, 7.0
  outputs = {'expr': expr_logits, 'au': au_logits, 'va': va_pred}
  batch = {'expr': expr, 'au': au, 'va': va, 'valid': valid, 'index': np.arange(n)}
  return outputs, batch


def _references(outputs, batch, c):
  """Every metric recomputed with scikit-learn and the NumPy CCC on the valid, labelled rows."""
  valid = batch['valid']
  pred = outputs['expr'].argmax(-1)
  target = np.where(valid, batch['expr'], -1)
  f1, acc = _sk_expr(pred, target, c)
  au_target = np.where(valid[:, None], batch['au'], -1)
  per_au, au_acc = _sk_au(outputs['au'] >= 0, au_target)
  vm = valid & (batch['va'] > -5).all(-1)
  cccs = [_np_ccc(outputs['va'][vm, k], batch['va'][vm, k]) for k in range(2)]
  return {'expr_f1': f1, 'expr_acc': acc, 'expr_abaw2': 0.67 * f1 + 0.33 * acc,
          'au_f1': np.mean(per_au), 'au_f1_per_au': per_au, 'au_acc': au_acc,
          'au_abaw2': 0.5 * np.mean(per_au) + 0.5 * au_acc,
          'va_ccc_valence': cccs[0], 'va_ccc_arousal': cccs[1], 'va_ccc': np.mean(cccs),
          'va_mse': np.mean((outputs['va'][vm].astype(np.float64) - batch['va'][vm]) ** 2),
          'mtl_score': np.mean(cccs) + f1 + np.mean(per_au),
          'count_expr': np.sum(target >= 0), 'count_au': np.sum(au_target >= 0),
          'count_va': np.sum(vm)}


def _uneven_batches(outputs, batch, rng):
  n = len(batch['valid'])
  cuts = np.sort(rng.choice(np.arange(1, n), 9, replace=False))
  for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, n]):
    yield ({k: v[lo:hi] for k, v in outputs.items()}, {k: v[lo:hi] for k, v in batch.items()})


@pytest.mark.parametrize('seed,c', [(0, 8), (1, 7), (2, 8)])
def test_streaming_accumulator_matches_sklearn_and_numpy(seed, c):
  rng = np.random.default_rng(seed)
  outputs, batch = _eval_data(rng, 500, c)
  acc = metrics.MetricsAccumulator(('expr', 'au', 'va'), num_expr_classes=c)
  for out_b, batch_b in _uneven_batches(outputs, batch, rng):
    acc.update(out_b, batch_b)
  got, ref = acc.compute(), _references(outputs, batch, c)
  assert set(ref) <= set(got)
  for key, value in ref.items():
    np.testing.assert_allclose(got[key], value, rtol=1e-9, atol=1e-12, err_msg=key)
  # A class never present and never predicted counts as F1 0 (sklearn zero_division=0).
  assert got['expr_f1_per_class'][c - 1] == 0.0 and got['au_f1_per_au'][3] == 0.0
  np.testing.assert_array_equal(np.array(got['expr_confusion']).sum(), got['count_expr'])


def test_streaming_equals_one_shot_and_standalone_functions():
  rng = np.random.default_rng(3)
  outputs, batch = _eval_data(rng, 400)
  one_shot = metrics.MetricsAccumulator(('expr', 'au', 'va'), 8, keep_predictions=True)
  one_shot.update(outputs, batch)
  streamed = metrics.MetricsAccumulator(('expr', 'au', 'va'), 8, keep_predictions=True)
  for out_b, batch_b in _uneven_batches(outputs, batch, rng):
    streamed.update(out_b, batch_b)
  assert streamed.compute() == one_shot.compute()
  kept = streamed.predictions()
  v = batch['valid']
  np.testing.assert_array_equal(kept['expr']['index'], np.flatnonzero(v & (batch['expr'] >= 0)))
  np.testing.assert_array_equal(kept['va']['index'],
                                np.flatnonzero(v & (batch['va'] > -5).all(-1)))
  # The standalone functions on the kept rows agree with the accumulator.
  result = one_shot.compute()
  expr = metrics.expr_metrics(kept['expr']['pred'].argmax(-1), kept['expr']['target'], 8)
  au = metrics.au_metrics(kept['au']['pred'], kept['au']['target'])
  va = metrics.va_metrics(kept['va']['pred'], kept['va']['target'])
  for part in (expr, au, va):
    for key, value in part.items():
      np.testing.assert_allclose(value, result[key], rtol=1e-12, err_msg=key)
  assert result['mtl_score'] == pytest.approx(
      metrics.abaw_mtl_score(va['va_ccc'], expr['expr_f1'], au['au_f1']))


def test_only_evaluated_tasks_and_all_missing_task():
  rng = np.random.default_rng(4)
  outputs, batch = _eval_data(rng, 50)
  batch['au'][:] = -1
  acc = metrics.MetricsAccumulator(('au', 'expr'), 8)
  acc.update(outputs, batch)
  got = acc.compute()
  assert not any(k.startswith('va') for k in got) and 'mtl_score' not in got
  assert got['count_au'] == 0 and got['au_f1'] == 0.0 and got['au_acc'] == 0.0
  empty = metrics.MetricsAccumulator(('va',), 7).compute()
  assert empty['count_va'] == 0 and empty['va_ccc'] == 0.0 and empty['va_mse'] == 0.0


def test_ccc_matches_numpy_and_degenerate_inputs():
  rng = np.random.default_rng(5)
  x, y = rng.uniform(-1, 1, 300), rng.uniform(-1, 1, 300)
  y = 0.7 * x + 0.3 * y
  assert metrics.ccc(x, y) == pytest.approx(_np_ccc(x, y), rel=1e-12)
  assert abs(metrics.ccc(np.full(300, 0.2), y)) < 1e-15  # constant prediction: covariance 0
  assert metrics.ccc(np.full(5, 0.2), np.full(5, 0.2)) == 0.0  # 0/0 defined as 0
  assert metrics.ccc([], []) == 0.0


def test_expr_metrics_degenerate_classes_match_sklearn():
  target = np.array([0, 0, 1, 1, 2, -1, 2, 0])
  pred = np.array([0, 1, 1, 1, 0, 5, 0, 0])  # class 2 never predicted; 3..6 never present
  got = metrics.expr_metrics(pred, target, 7)
  f1, acc = _sk_expr(pred, target, 7)
  assert got['expr_f1'] == pytest.approx(f1) and got['expr_acc'] == pytest.approx(acc)
  assert got['count_expr'] == 7


def test_score_editions():
  m = {'expr_f1': 0.4, 'expr_abaw2': 0.5, 'au_f1': 0.3, 'au_abaw2': 0.6, 'va_ccc': 0.2}
  assert metrics.score(m, ('expr', 'au'), 'abaw2') == pytest.approx(1.1)
  assert metrics.score(m, ('expr', 'au', 'va'), 'abaw3') == pytest.approx(0.9)
  assert metrics.score(m, ('va',), 'abaw2') == pytest.approx(0.2)
  with pytest.raises(ValueError):
    metrics.score(m, ('va',), 'abaw9')


def test_tuned_au_thresholds_improve_f1_and_apply_per_au():
  rng = np.random.default_rng(6)
  n = 4000
  # Each AU's scores are shifted differently, so the best threshold differs per AU.
  shift = np.linspace(-0.3, 0.3, NUM_AUS)
  target = (rng.random((n, NUM_AUS)) < np.linspace(0.05, 0.5, NUM_AUS)).astype(np.int32)
  probs = np.clip(0.5 + shift + 0.25 * (target - 0.5) + 0.2 * rng.standard_normal((n, NUM_AUS)),
                  0, 1)
  target[rng.random((n, NUM_AUS)) < 0.1] = -1
  tune, held = slice(0, n // 2), slice(n // 2, n)
  grid = np.round(np.arange(0.05, 0.96, 0.05), 2)
  thresholds = metrics.tune_au_thresholds(probs[tune], target[tune], grid)
  assert thresholds.shape == (NUM_AUS,) and len(np.unique(thresholds)) > 3
  # Per AU, the chosen threshold is the grid's best F1 on the tuning split (checked with sklearn).
  for k in range(NUM_AUS):
    m = target[tune, k] >= 0
    scores = [f1_score(target[tune, k][m], probs[tune, k][m] >= t, zero_division=0) for t in grid]
    assert f1_score(target[tune, k][m], probs[tune, k][m] >= thresholds[k]) == pytest.approx(
        max(scores))
  base = metrics.au_metrics(probs[tune], target[tune])['au_f1']
  assert metrics.au_metrics(probs[tune], target[tune], thresholds)['au_f1'] > base + 0.02
  held_out = metrics.au_metrics(probs[held], target[held], thresholds)
  per_au, _ = _sk_au(probs[held] >= thresholds, target[held])
  np.testing.assert_allclose(held_out['au_f1_per_au'], per_au, rtol=1e-12)


def test_smooth_per_video_is_a_centred_moving_average_within_each_video():
  rng = np.random.default_rng(0)
  video = np.repeat([3, 0, 7], [5, 1, 9])  # contiguous runs, ids need not be sorted
  values = rng.normal(size=(15, 2))
  for window in (1, 3, 5, 21):
    expected = np.empty_like(values)
    for i in range(15):  # reference: average of the rows within half a window, same video
      same = [j for j in range(15) if video[j] == video[i] and abs(j - i) <= window // 2]
      expected[i] = values[same].mean(axis=0)
    np.testing.assert_allclose(metrics.smooth_per_video(values, video, window), expected,
                               rtol=1e-12)


def test_smoothing_windows_count_video_frames_where_frames_are_sparse():
  rng = np.random.default_rng(2)
  video = np.repeat([4, 1], [8, 6])
  frame = np.r_[1, 2, 3, 7, 8, 20, 21, 22, 5, 6, 9, 10, 11, 30]  # gaps: no face, no label
  values = rng.normal(size=(14, 2))
  for window in (1, 3, 5, 9):
    expected = np.empty_like(values)
    for i in range(14):  # reference: the rows of the video within half a window of frames
      same = [j for j in range(14)
              if video[j] == video[i] and abs(frame[j] - frame[i]) <= window // 2]
      expected[i] = values[same].mean(axis=0)
    np.testing.assert_allclose(metrics.smooth_per_video(values, video, window, frame),
                               expected, rtol=1e-12)
  # Contiguous frames: the same as counting rows.
  np.testing.assert_allclose(metrics.smooth_per_video(values, video, 5, np.arange(14) + 1),
                             metrics.smooth_per_video(values, video, 5), rtol=1e-12)
  with pytest.raises(ValueError, match='ascend'):
    metrics.smooth_per_video(values, video, 3, frame[::-1])
  for window in (2, 5):  # causal: the frame and the window - 1 frames before it
    expected = np.stack([values[[j for j in range(14) if video[j] == video[i]
                                 and 0 <= frame[i] - frame[j] < window]].mean(axis=0)
                         for i in range(14)])
    np.testing.assert_allclose(metrics.smooth_per_video(values, video, window, frame, causal=True),
                               expected, rtol=1e-12)


def test_tuned_va_window_maximises_ccc():
  rng = np.random.default_rng(1)
  video = np.repeat(np.arange(4), 50)
  t = np.arange(200)
  target = np.stack([np.sin(t / 9.0), np.cos(t / 13.0)], axis=1)
  pred = target + rng.normal(scale=0.5, size=target.shape)  # noisy frame-wise predictions
  windows = (1, 3, 9, 25)
  best = metrics.tune_va_window(pred, target, video, windows)
  scores = {w: 0.5 * sum(metrics.ccc(metrics.smooth_per_video(pred, video, w)[:, k],
                                     target[:, k]) for k in range(2)) for w in windows}
  assert best == max(scores, key=scores.get) and best > 1
