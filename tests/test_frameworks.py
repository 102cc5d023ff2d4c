"""The ABAW4 winners' multi-task frameworks (share-bottom, feedback) and separate linear valence
and arousal heads, against a PyTorch re-implementation with the same weights."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from affectjax.models import temporal
from test_temporal import D, H, HEAD, _inputs, _t, torch_gru, torch_head

TASKS = ('expr', 'au', 'va')
SIZES = {'expr': 8, 'au': 12}


def _model(framework, feedback=(), va_heads='tanh'):
  return temporal.TemporalModel(
      encoder='gru', hidden=H, num_layers=1, head_dims=(HEAD,), dropout=0.0, tasks=TASKS,
      num_expr_classes=8, framework=framework, top_layers=1, feedback=feedback,
      va_heads=va_heads)


def _torch_forward(params, features, feedback, va_heads):
  """Bottom GRU, one top GRU per task (a target's input: bottom output and its sources' top
  outputs, concatenated), task heads."""
  bottom = torch_gru(params['gru0'], D, H)
  with torch.no_grad():
    x, _ = bottom(_t(features))
    tops = {}
    for task in temporal.top_order(TASKS, feedback):
      fed = [tops[s] for s, target in feedback if target == task]
      rnn = torch_gru(params[f'top_{task}']['gru0'], H * (1 + len(fed)), H)
      tops[task], _ = rnn(torch.cat([x] + fed, dim=-1))
    out = {t: torch_head(params['head'][t], SIZES[t])(tops[t]) for t in SIZES}
    if va_heads == 'linear':
      va = params['head']['va']
      out['va'] = torch.cat([torch_head(va[k], 1)(tops['va']) for k in ('valence', 'arousal')],
                            dim=-1)
    else:
      out['va'] = torch.tanh(torch_head(params['head']['va'], 2)(tops['va']))
  return {k: v.numpy() for k, v in out.items()}


@pytest.mark.parametrize('framework,feedback,va_heads', [
    ('share_bottom', (), 'tanh'), ('feedback', (('au', 'expr'), ('expr', 'va')), 'linear')])
def test_frameworks_match_pytorch(framework, feedback, va_heads):
  model, inputs = _model(framework, feedback, va_heads), _inputs()
  params = jax.device_get(model.init(jax.random.key(0), inputs)['params'])
  assert sorted(k for k in params if k.startswith('top_')) == ['top_au', 'top_expr', 'top_va']
  ours = model.apply({'params': params}, inputs)
  reference = _torch_forward(params, inputs['features'], feedback, va_heads)
  for task in TASKS:
    np.testing.assert_allclose(np.asarray(ours[task])[inputs['mask']],
                               reference[task][inputs['mask']], rtol=2e-4, atol=2e-5,
                               err_msg=task)


def test_feedback_sends_no_gradient_into_the_source():
  model, inputs = _model('feedback', (('au', 'expr'),)), _inputs()
  params = model.init(jax.random.key(0), inputs)['params']

  def grads(task):
    return jax.grad(lambda p: jnp.sum(model.apply({'params': p}, inputs)[task]))(params)

  from_expr, from_au = grads('expr'), grads('au')
  norm = lambda tree: float(sum(jnp.abs(x).sum() for x in jax.tree_util.tree_leaves(tree)))
  assert norm(from_expr['top_au']) == 0.0  # the target's loss does not train the source's top
  assert norm(from_expr['top_expr']) > 0 and norm(from_expr['gru0']) > 0
  assert norm(from_au['top_au']) > 0 and norm(from_au['top_expr']) == 0.0


def test_framework_settings_are_checked():
  inputs = _inputs()
  with pytest.raises(ValueError, match='cycle'):
    _model('feedback', (('au', 'expr'), ('expr', 'au'))).init(jax.random.key(0), inputs)
  with pytest.raises(ValueError, match='needed by, and only by'):
    _model('share_bottom', (('au', 'expr'),)).init(jax.random.key(0), inputs)
  with pytest.raises(ValueError, match='not tasks of this run'):
    _model('feedback', (('au', 'pose'),)).init(jax.random.key(0), inputs)
  assert temporal.parse_feedback('au>expr, expr>va') == (('au', 'expr'), ('expr', 'va'))
  with pytest.raises(ValueError, match='source>target'):
    temporal.parse_feedback('au-expr')
