"""Temporal encoders against PyTorch (GRU, LSTM, TransformerEncoderLayer) and feature segments."""
import pickle
import types

import jax
import numpy as np
import pytest
import torch

from affectjax import labels
from affectjax.data import index as index_lib
from affectjax.data import pipeline, sampling, sequences
from affectjax.models import stat, temporal

D, H, HEAD = 5, 8, 6


def _model(encoder, tasks=('expr', 'au', 'va')):
  return temporal.TemporalModel(encoder=encoder, hidden=H, num_layers=1, num_heads=2, ff_dim=12,
                                head_dims=(HEAD,), dropout=0.0, tasks=tasks, num_expr_classes=8)


def _inputs(seed=0, batch=3, length=7):
  rng = np.random.default_rng(seed)
  mask = np.ones((batch, length), bool)
  mask[1, 4:] = False  # a segment ending early (padding after it)
  return {'features': rng.normal(size=(batch, length, D)).astype(np.float32), 'mask': mask}


def _t(x):
  return torch.tensor(np.asarray(x), dtype=torch.float32)


def torch_gru(p, in_dim: int, hidden: int):
  """torch.nn.GRU with a flax GRU layer's parameters `p` copied in."""
  rnn = torch.nn.GRU(in_dim, hidden, batch_first=True)
  rnn.weight_ih_l0.data = torch.cat([_t(p[k]['kernel']).T for k in ('ir', 'iz', 'in')])
  rnn.weight_hh_l0.data = torch.cat([_t(p[k]['kernel']).T for k in ('hr', 'hz', 'hn')])
  rnn.bias_ih_l0.data = torch.cat([_t(p['ir']['bias']), _t(p['iz']['bias']),
                                   _t(p['in']['bias'])])
  rnn.bias_hh_l0.data = torch.cat([torch.zeros(2 * hidden), _t(p['hn']['bias'])])
  return rnn


def torch_head(hp, size: int):
  """Dense, ReLU, Dense in PyTorch with a flax TaskHead's parameters `hp` copied in."""
  first = torch.nn.Linear(hp['hidden0']['kernel'].shape[0], HEAD)
  last = torch.nn.Linear(HEAD, size)
  first.weight.data, first.bias.data = _t(hp['hidden0']['kernel']).T, _t(hp['hidden0']['bias'])
  last.weight.data, last.bias.data = _t(hp['out']['kernel']).T, _t(hp['out']['bias'])
  return torch.nn.Sequential(first, torch.nn.ReLU(), last)


def _torch_reference(encoder, params):
  """The same network in PyTorch, with the flax parameters copied in."""
  if encoder == 'gru':
    rnn = torch_gru(params['gru0'], D, H)
  elif encoder == 'lstm':
    rnn = torch.nn.LSTM(D, H, batch_first=True)
    p = params['lstm0']
    rnn.weight_ih_l0.data = torch.cat([_t(p[k]['kernel']).T for k in ('ii', 'if', 'ig', 'io')])
    rnn.weight_hh_l0.data = torch.cat([_t(p[k]['kernel']).T for k in ('hi', 'hf', 'hg', 'ho')])
    rnn.bias_ih_l0.data = torch.zeros(4 * H)
    rnn.bias_hh_l0.data = torch.cat([_t(p[k]['bias']) for k in ('hi', 'hf', 'hg', 'ho')])
  else:
    project = torch.nn.Linear(D, H)
    project.weight.data, project.bias.data = (_t(params['project']['kernel']).T,
                                              _t(params['project']['bias']))
    layer = torch.nn.TransformerEncoderLayer(H, 2, dim_feedforward=12, dropout=0.0,
                                             batch_first=True, norm_first=False)
    p = params['layer0']
    a = p['attention']
    layer.self_attn.in_proj_weight.data = torch.cat(
        [_t(a[k]['kernel']).reshape(H, H).T for k in ('query', 'key', 'value')])
    layer.self_attn.in_proj_bias.data = torch.cat(
        [_t(a[k]['bias']).reshape(H) for k in ('query', 'key', 'value')])
    layer.self_attn.out_proj.weight.data = _t(a['out']['kernel']).reshape(H, H).T
    layer.self_attn.out_proj.bias.data = _t(a['out']['bias'])
    for name, torch_name in (('ff1', 'linear1'), ('ff2', 'linear2')):
      getattr(layer, torch_name).weight.data = _t(p[name]['kernel']).T
      getattr(layer, torch_name).bias.data = _t(p[name]['bias'])
    for name in ('norm1', 'norm2'):
      getattr(layer, name).weight.data = _t(p[name]['scale'])
      getattr(layer, name).bias.data = _t(p[name]['bias'])
    layer.eval()
  heads = {task: torch_head(params['head'][task], size)
           for task, size in (('expr', 8), ('au', 12), ('va', 2))}

  def forward(features, mask):
    x = _t(features)
    if encoder in ('gru', 'lstm'):
      x, _ = rnn(x)  # causal: frames before a segment's end do not see the padding
    else:
      x = project(x) + _t(temporal.sinusoidal_positions(x.shape[1], H))[None]
      x = layer(x, src_key_padding_mask=torch.tensor(~mask))
    out = {task: head(x) for task, head in heads.items()}
    out['va'] = torch.tanh(out['va'])
    return {k: v.detach().numpy() for k, v in out.items()}
  return forward


@pytest.mark.parametrize('encoder', temporal.ENCODERS)
def test_temporal_model_matches_pytorch(encoder):
  model, inputs = _model(encoder), _inputs()
  params = model.init(jax.random.key(0), inputs)['params']
  ours = model.apply({'params': params}, inputs)
  with torch.no_grad():
    reference = _torch_reference(encoder, jax.device_get(params))(inputs['features'],
                                                                 inputs['mask'])
  for task in ('expr', 'au', 'va'):
    assert ours[task].shape == reference[task].shape
    np.testing.assert_allclose(np.asarray(ours[task])[inputs['mask']],
                               reference[task][inputs['mask']], rtol=2e-4, atol=2e-5,
                               err_msg=task)


@pytest.mark.parametrize('encoder', ['gru', 'lstm'])
def test_carried_state_equals_one_pass_over_the_concatenated_segments(encoder):
  """Segment 2 of lane 0 continues segment 1 (its last state carried); lane 1 starts a new
  video at segment 2 (reset): both against PyTorch over the whole sequences."""
  model = temporal.TemporalModel(encoder=encoder, hidden=H, num_layers=1, head_dims=(HEAD,),
                                 dropout=0.0, num_expr_classes=8, carry_state=True)
  rng = np.random.default_rng(3)
  whole = rng.normal(size=(2, 10, D)).astype(np.float32)
  first = {'features': whole[:, :6], 'mask': np.ones((2, 6), bool)}
  variables = model.init(jax.random.key(0), first)
  params, carry = variables['params'], variables['carry']
  assert jax.tree_util.tree_leaves(carry)[0].shape == (2, H)
  out1, new = model.apply({'params': params, 'carry': carry},
                          dict(first, reset=np.array([True, True])), mutable=['carry'])
  out2, _ = model.apply({'params': params, 'carry': new['carry']},
                        {'features': whole[:, 6:], 'mask': np.ones((2, 4), bool),
                         'reset': np.array([False, True])}, mutable=['carry'])
  with torch.no_grad():
    forward = _torch_reference(encoder, jax.device_get(params))
    full = forward(whole, np.ones((2, 10), bool))
    fresh = forward(whole[1:, 6:], np.ones((1, 4), bool))
  for task in ('expr', 'au', 'va'):
    np.testing.assert_allclose(np.asarray(out1[task]), full[task][:, :6], rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(np.asarray(out2[task])[0], full[task][0, 6:], rtol=2e-4,
                               atol=2e-5, err_msg=f'{task}: the carried lane')
    np.testing.assert_allclose(np.asarray(out2[task])[1], fresh[task][0], rtol=2e-4,
                               atol=2e-5, err_msg=f'{task}: the reset lane')


def test_lanes_keep_each_video_in_order_and_flag_its_first_segment(tmp_path):
  video = np.array([0, 0, 0, 1, 2, 2, 3, 4, 4, 4, 4])  # segments' videos (5 videos, 11 segments)
  plans = [sequences.lane_plan(video, 3, np.random.default_rng(e)) for e in range(6)]
  for plan in plans:
    assert plan.shape == (4, 3)  # longest first: lanes {4}, {0, 1}, {2, 3} -> 4, 4, 3 segments
    assert sorted(plan[plan >= 0].tolist()) == list(range(11))  # every segment once
    for lane in plan.T:
      segments = lane[lane >= 0]
      for v in set(video[segments]):  # a video's segments consecutive and in order on a lane
        mine = segments[video[segments] == v]
        assert np.all(np.diff(mine) == 1) and len(mine) == (video == v).sum()
  assert len({p.tobytes() for p in plans}) > 1  # the videos' order within lanes is shuffled
  feature_set, _ = _feature_set(tmp_path)
  config = pipeline.default_data_config()
  config.read_threads = 0
  batches = list(sequences.make_iterator(feature_set, config, length=4, global_batch_size=2,
                                         training=False, carry_state=True))
  seen = [b['index'][lane] for b in batches for lane in range(2)]
  rows = np.concatenate([r[r >= 0] for r in seen])
  assert sorted(rows.tolist()) == list(range(len(feature_set.index)))  # every frame once
  for b in batches:
    for lane in range(2):
      present = b['index'][lane][b['index'][lane] >= 0]
      if present.size:  # reset exactly where a video starts on this lane
        starts = present[0] == 0 or feature_set.index.video_id[present[0] - 1] != (
            feature_set.index.video_id[present[0]])
        assert b['reset'][lane] == starts


@pytest.mark.parametrize('encoder', temporal.ENCODERS)
def test_padding_does_not_change_the_valid_frames(encoder):
  model, inputs = _model(encoder), _inputs()
  params = model.init(jax.random.key(1), inputs)['params']
  other = dict(inputs, features=np.where(inputs['mask'][..., None], inputs['features'], 7.0))
  a, b = (model.apply({'params': params}, x) for x in (inputs, other))
  for task in a:
    np.testing.assert_allclose(np.asarray(a[task])[inputs['mask']],
                               np.asarray(b[task])[inputs['mask']], rtol=1e-5, atol=1e-6)


def _feature_set(tmp_path, num_videos=3):
  """A feature set of `num_videos` videos of 5, 7, 9... frames with known features."""
  frames = [np.arange(1, 6 + 2 * v) for v in range(num_videos)]
  n = sum(len(f) for f in frames)
  rng = np.random.default_rng(0)
  index = index_lib.AffWild2Index(
      tuple(f'video{v}' for v in range(num_videos)),
      np.concatenate([np.full(len(f), v, np.int32) for v, f in enumerate(frames)]),
      np.concatenate(frames).astype(np.int32), rng.integers(-1, 8, n).astype(np.int8),
      rng.integers(-1, 2, (n, 12)).astype(np.int8),
      rng.uniform(-1, 1, (n, 2)).astype(np.float32), str(tmp_path), 'train', {'tasks': ['expr']})
  features = (np.arange(n)[:, None] + np.zeros((1, 4))).astype(np.float16)  # row number
  ok = np.ones(n, bool)
  ok[3] = False
  sequences.write_feature_set(str(tmp_path), 'train', index, features, ok, {'step': 1})
  return sequences.FeatureSet(str(tmp_path), 'train'), index


def test_predictions_are_read_in_place_of_the_embedding_and_their_absence_is_named(tmp_path):
  embedded, index = _feature_set(tmp_path / 'a')  # written without predictions
  with pytest.raises(FileNotFoundError, match=r'a/train/predictions\.npy not found: '
                     r'temporal\.inputs=predictions reads it; extract these features again'):
    sequences.FeatureSet(str(tmp_path / 'a'), 'train', 'predictions')
  predictions = np.random.default_rng(2).uniform(size=(len(index), 21)).astype(np.float16)
  sequences.write_feature_set(str(tmp_path / 'b'), 'train', index, embedded.features,
                              embedded.ok, {'step': 1}, predictions=predictions)
  read = sequences.FeatureSet(str(tmp_path / 'b'), 'train', 'predictions')
  assert read.dim == 21 and read.inputs == 'predictions'
  np.testing.assert_array_equal(read.features, predictions)
  again = pickle.loads(pickle.dumps(read))  # as worker processes reopen it
  np.testing.assert_array_equal(again.features, predictions)


def test_feature_folders_concatenate_per_frame_when_they_list_the_same_frames(tmp_path):
  first, index = _feature_set(tmp_path / 'a')
  n = len(index)
  other = np.random.default_rng(1).normal(size=(n, 3)).astype(np.float16)
  ok = np.ones(n, bool)
  ok[5] = False
  sequences.write_feature_set(str(tmp_path / 'b'), 'train', index, other, ok, {'step': 2})
  both = sequences.FeatureSet(f"{tmp_path / 'a'},{tmp_path / 'b'}", 'train')
  assert both.dim == 7 and both.features.shape == (n, 7)
  rows = np.array([4, 0, 9])
  np.testing.assert_array_equal(both.features[rows], np.concatenate(
      [np.asarray(first.features)[rows], other[rows]], axis=-1))
  assert np.flatnonzero(~both.ok).tolist() == [3, 5]  # unreadable in either
  config = pipeline.default_data_config()
  config.read_threads = 0
  batch = next(iter(sequences.make_iterator(both, config, length=4, global_batch_size=2,
                                            training=False)))
  assert batch['features'].shape == (2, 4, 7)
  shuffled = index_lib.AffWild2Index(index.video_names, index.video_id, index.frame[::-1].copy(),
                                     index.expr, index.au, index.va, str(tmp_path), 'train', {})
  sequences.write_feature_set(str(tmp_path / 'c'), 'train', shuffled, other, ok, {'step': 3})
  with pytest.raises(ValueError, match='list other frames or another order'):
    sequences.FeatureSet(f"{tmp_path / 'a'},{tmp_path / 'c'}", 'train')


def test_segments_cover_every_frame_once_and_carry_their_labels(tmp_path):
  feature_set, index = _feature_set(tmp_path)
  segments = sequences.segment_rows(index, 4)
  rows = segments[segments >= 0]
  assert sorted(rows.tolist()) == list(range(len(index)))
  for segment in segments:  # one video per segment, consecutive frames, padding at the end
    present = segment[segment >= 0]
    assert len(set(index.video_id[present])) == 1 and np.all(np.diff(present) == 1)
    assert np.all(segment[len(present):] == -1)
  config = pipeline.default_data_config()
  config.tasks, config.read_threads = 'expr,va', 0
  batches = list(sequences.make_iterator(feature_set, config, length=4,
                                         global_batch_size=2, training=False))
  seen = np.concatenate([b['index'][b['mask']] for b in batches])
  assert sorted(seen.tolist()) == list(range(len(index)))
  for b in batches:
    rows = b['index'][b['mask']]
    np.testing.assert_array_equal(b['features'][b['mask']][:, 0], rows)  # the row's features
    np.testing.assert_array_equal(b['expr'][b['mask']], index.expr[rows])
    np.testing.assert_array_equal(b['va'][b['mask']], index.va[rows])
    assert (b['au'] == labels.AU_MISSING).all()  # untrained task
    np.testing.assert_array_equal(b['valid'][b['mask']], rows != 3)  # unreadable frame 3
    assert not b['valid'][~b['mask']].any() and (b['features'][~b['mask']] == 0).all()
  train = sequences.make_iterator(feature_set, config, length=4, global_batch_size=2,
                                  seed=5)
  first = [next(train) for _ in range(train.steps_per_epoch)]
  picked = np.concatenate([b['index'].reshape(-1) for b in first])
  assert len(set(picked[picked >= 0].tolist())) == (picked >= 0).sum()  # no repeats in an epoch
  resumed = sequences.make_iterator(feature_set, config, length=4, global_batch_size=2,
                                    seed=5)
  resumed.set_state({'step': 1})
  np.testing.assert_array_equal(next(resumed)['index'], first[1]['index'])


def _copy_lstm(torch_lstm, p, suffix=''):
  getattr(torch_lstm, f'weight_ih_l0{suffix}').data = torch.cat(
      [_t(p[k]['kernel']).T for k in ('ii', 'if', 'ig', 'io')])
  getattr(torch_lstm, f'weight_hh_l0{suffix}').data = torch.cat(
      [_t(p[k]['kernel']).T for k in ('hi', 'hf', 'hg', 'ho')])
  getattr(torch_lstm, f'bias_ih_l0{suffix}').data = torch.zeros(
      getattr(torch_lstm, f'bias_ih_l0{suffix}').shape)
  getattr(torch_lstm, f'bias_hh_l0{suffix}').data = torch.cat(
      [_t(p[k]['bias']) for k in ('hi', 'hf', 'hg', 'ho')])


def test_stat_model_matches_numpy_statistics_and_a_pytorch_bilstm():
  c, hidden, branch = 7, 6, 5
  model = stat.StatModel(stat=True, lstm_layers=1, lstm_hidden=hidden, branch_hidden=branch,
                             va5=True, tasks=('expr', 'va'), num_expr_classes=c)
  rng = np.random.default_rng(3)
  mask = np.ones((3, 6), bool)
  mask[1, 2:] = mask[2, 5:] = False  # blocks near a video's start are shorter
  probs = rng.dirichlet(np.ones(c), size=(3, 6)).astype(np.float32)
  inputs = {'features': rng.normal(size=(3, 6, D)).astype(np.float32), 'probs': probs,
            'mask': mask}
  params = jax.device_get(model.init(jax.random.key(2), inputs)['params'])
  ours = model.apply({'params': params}, inputs)
  padded = {k: np.where(mask[..., None], v, 7.0) if k != 'mask' else v
            for k, v in inputs.items()}
  for task, value in model.apply({'params': params}, padded).items():  # padding is ignored
    np.testing.assert_allclose(value, ours[task], rtol=1e-5, atol=1e-6)
  bilstm = torch.nn.LSTM(c, hidden, batch_first=True, bidirectional=True)
  _copy_lstm(bilstm, params['lstm0_forward'])
  _copy_lstm(bilstm, params['lstm0_backward'], '_reverse')
  heads = {}
  for task, size in (('expr', c), ('va', 2), ('va5', 5)):
    hp = params['head'][task]
    first, last = torch.nn.Linear(hp['hidden0']['kernel'].shape[0], branch), torch.nn.Linear(
        branch, size)
    first.weight.data, first.bias.data = _t(hp['hidden0']['kernel']).T, _t(hp['hidden0']['bias'])
    last.weight.data, last.bias.data = _t(hp['out']['kernel']).T, _t(hp['out']['bias'])
    heads[task] = torch.nn.Sequential(first, torch.nn.ReLU(), last)
  for b in range(3):
    n = int(mask[b].sum())
    f, p = inputs['features'][b, :n], probs[b, :n]
    stats = [p.mean(0), p.max(0), p.min(0), f.mean(0), f.max(0), f.min(0)]
    with torch.no_grad():
      _, (h, _) = bilstm(_t(p)[None])  # the unpadded block: h [2 directions, 1, hidden]
      fused = torch.cat([_t(f[-1]), _t(p[-1]), *[_t(s) for s in stats], h[0, 0], h[1, 0]])
      for task, head in heads.items():
        expected = head(fused).numpy()
        expected = np.tanh(expected) if task != 'expr' else expected
        np.testing.assert_allclose(np.asarray(ours[task])[b, 0], expected, rtol=2e-4,
                                   atol=2e-5, err_msg=f'{task} row {b}')


def test_blocks_hold_the_frame_and_its_past_and_label_the_frame(tmp_path):
  feature_set, index = _feature_set(tmp_path)
  blocks = sampling.block_rows(index, 3)
  for i, block in enumerate(blocks):
    present = block[block >= 0]
    assert present[-1] == i and np.all(np.diff(present) == 1)
    assert len(set(index.video_id[present])) == 1 and len(present) == min(
        3, i - np.flatnonzero(index.video_id == index.video_id[i])[0] + 1)
  config = pipeline.default_data_config()
  config.tasks, config.read_threads, config.sampling = 'expr', 0, 'balanced'
  evaluation = list(sequences.make_iterator(feature_set, config, window='block', length=3,
                                            global_batch_size=4, training=False))
  targets = np.concatenate([b['index'][:, 0] for b in evaluation])
  labelled = np.flatnonzero(index.expr >= 0)
  assert sorted(targets[targets >= 0].tolist()) == labelled.tolist()  # each labelled frame once
  for b in evaluation:
    rows = b['index'][:, 0]
    for j, row in enumerate(rows[rows >= 0]):
      np.testing.assert_array_equal(b['features'][j][b['mask'][j]][:, 0], blocks[row][
          blocks[row] >= 0])
      assert b['expr'][j, 0] == index.expr[row]
  train = sequences.make_iterator(feature_set, config, window='block', length=3,
                                  global_batch_size=4, seed=1)
  batch = next(train)
  assert batch['expr'].shape == (4, 1) and (batch['expr'] >= 0).all()


def test_blocks_count_video_frames_and_repeat_the_last_frame_over_gaps():
  # Video 0 has crops at frames 3, 4, 7, 8 (5 and 6: no face); video 1 at 1, 2.
  index = types.SimpleNamespace(video_id=np.array([0, 0, 0, 0, 1, 1]),
                                frame=np.array([3, 4, 7, 8, 1, 2]))
  np.testing.assert_array_equal(sampling.block_rows(index, 3), [
      [0, -1, -1],  # frame 3: frames 1 and 2 come before the video's first crop
      [0, 1, -1],
      [1, 1, 2],  # frame 7: frames 5, 6 (frame 4's row repeated), 7
      [1, 2, 3],  # frame 8: frames 6 (frame 4), 7, 8
      [4, -1, -1],
      [4, 5, -1]])


@pytest.mark.parametrize('encoder,layers', [
    ('gru', ('gru0', 'gru1')), ('lstm', ('lstm0', 'lstm1')),
    ('transformer', ('layer0', 'layer1', 'project'))])
def test_encoder_parameters_keep_the_checkpoint_layout(encoder, layers):
  """Encoders are modules of their own (temporal.ENCODERS), but their parameters stay directly
  under the model, as in the runs saved before: those checkpoints still restore."""
  model = temporal.TemporalModel(encoder=encoder, hidden=H, num_layers=2, num_heads=2,
                                 ff_dim=12, head_dims=(HEAD,), tasks=('expr', 'va'))
  params = model.init(jax.random.key(0), _inputs())['params']
  assert sorted(params) == sorted(layers + ('head',))
  assert sorted(params['head']) == ['expr', 'va']
  assert sorted(params['head']['expr']) == ['hidden0', 'out']
