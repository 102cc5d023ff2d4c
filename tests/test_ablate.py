"""The ablation runner (affectjax.ablate): a half-finished table resumes without running its
finished rows again; the table's means and spreads are NumPy's over the seeds' results; rows
that train on another row's features or start from its run get that run's folder. (A real
row runs through the command line in test_docs.py: the README's ablation command.)"""
import json
import os

import numpy as np
import pytest

from affectjax import ablate, config as config_lib, inference, oof, trainer
from run_helpers import REPO

TABLE = '''
def get_table(variant=None):
  return {{'title': 'A test table', 'metrics': ('expr_f1', 'au_f1'), 'seeds': (0, 1, 2),
          'rows': {rows}}}
'''


def _table_file(tmp_path, rows) -> str:
  folder = tmp_path / 'configs' / 'ablations'
  folder.mkdir(parents=True, exist_ok=True)
  path = folder / 'table.py'
  path.write_text(TABLE.format(rows=repr(rows)))
  return str(path)


def _write_features(folder, predictions=False):
  """What the stand-ins of mode=features / mode=oof leave: each split's meta.json."""
  for split in ('train', 'validation'):
    os.makedirs(os.path.join(folder, 'features', split), exist_ok=True)
    for name in ('meta.json',) + ('predictions.npy',) * predictions:
      open(os.path.join(folder, 'features', split, name), 'w').close()


def _fake_metrics(name: str, seed: int) -> dict:
  base = {'frames': 0.5, 'gru': 0.6, 'lstm': 0.7}[name]
  return {'expr_f1': base + 0.01 * seed, 'au_f1': base / 2 + 0.02 * seed * seed}


def test_a_half_finished_table_resumes_without_rerunning_finished_rows(tmp_path, monkeypatch):
  rows = [{'name': 'frames', 'config': 'configs/mtl3.py', 'paper': {'expr_f1': 0.4}},
          {'name': 'gru', 'config': 'configs/temporal.py:gru', 'features_of': 'frames'},
          {'name': 'lstm', 'config': 'configs/temporal.py:lstm', 'features_of': 'frames'}]
  table = ablate.load_table(_table_file(tmp_path, rows) + ':test')
  table['base'] = REPO
  calls, stop_after = [], [4]

  def train(config, workdir):
    if len(calls) == stop_after[0]:
      raise KeyboardInterrupt  # the table is interrupted here
    name, seed = os.path.basename(os.path.dirname(workdir)), config.seed
    calls.append((name, seed, config.temporal.features_dir))
    return {'stop_reason': 'finished', 'final_metrics': _fake_metrics(name, seed),
            'best_score': 1.0 + seed}

  def features(config, workdir):
    _write_features(workdir)
    calls.append(('features', config.seed, workdir))

  monkeypatch.setattr(trainer, 'train_and_evaluate', train)
  monkeypatch.setattr(inference, 'extract_features', features)
  monkeypatch.setattr(inference, 'evaluate_checkpoint', lambda config, workdir: {})
  out = str(tmp_path / 'runs')
  with pytest.raises(KeyboardInterrupt):
    ablate.run_table(table, out)
  first = list(calls)
  assert [c[:2] for c in first] == [('frames', 0), ('frames', 1), ('frames', 2),
                                    ('features', 0)]
  stop_after[0] = -1
  summary = ablate.run_table(table, out)
  again = calls[len(first):]
  # Nothing finished ran again: the GRU of seed 0 (whose features exist) first.
  assert [c[:2] for c in again] == [('gru', 0), ('features', 1), ('gru', 1), ('features', 2),
                                    ('gru', 2), ('lstm', 0), ('lstm', 1), ('lstm', 2)]
  assert all(c[2] == os.path.join(out, 'frames', f'seed{c[1]}', 'features')
             for c in again if c[0] in ('gru', 'lstm'))
  for name in ('frames', 'gru', 'lstm'):
    values = [_fake_metrics(name, s)['au_f1'] for s in (0, 1, 2)]
    cell = summary[name]['au_f1']
    assert cell['n'] == 3 and cell['mean'] == pytest.approx(np.mean(values))
    assert cell['std'] == pytest.approx(np.std(values, ddof=1))
  text = open(os.path.join(out, 'table.md')).read()
  assert '| frames | 0.510 ± 0.010 (3) | 0.400 |' in text
  assert '| lstm | 0.700, 0.710, 0.720 | 0.350, 0.370, 0.430 | 1.000, 2.000, 3.000 |' in text
  # A later call for one seed neither reruns nor narrows the summary to that seed.
  assert ablate.run_table(table, out, seeds=[1]) == summary
  assert '| frames | 0.510 ± 0.010 (3) | 0.400 |' in open(os.path.join(out, 'table.md')).read()
  assert json.load(open(os.path.join(out, 'results.json')))['rows']['lstm']['best_score'][
      'mean'] == pytest.approx(2.0)
  assert ablate.run_table(table, out) == summary and len(calls) == len(first) + len(again)


def test_an_oof_row_gives_its_features_and_runs_first_when_left_out(tmp_path, monkeypatch):
  """A mode=oof row runs affectjax.oof in its folder and reports its full run; a temporal row
  naming it trains on its folder's features, and --rows without it runs it first. Features
  that lack what a row reads (here the predictions) are extracted again by the oof runs."""
  rows = [{'name': 'frames_oof', 'config': 'configs/mtl3.py',
           'overrides': {'mode': 'oof', 'data.folds': 2}},
          {'name': 'gru', 'config': 'configs/temporal.py:gru', 'features_of': 'frames_oof'},
          {'name': 'gru_pred', 'config': 'configs/temporal.py:gru', 'features_of': 'frames_oof',
           'overrides': {'temporal.inputs': 'predictions'}}]
  table = ablate.load_table(_table_file(tmp_path, rows) + ':test')
  table['base'] = REPO
  calls = []

  def run_oof(config, workdir):
    assert config.mode == 'oof' and config.data.folds == 2
    _write_features(workdir, predictions=len(calls) > 0)  # written before the predictions were
    calls.append(('oof', config.seed, workdir))
    return {'summary': {'stop_reason': 'finished', 'best_score': 2.0 + config.seed,
                        'final_metrics': _fake_metrics('frames', config.seed)}}

  def train(config, workdir):
    calls.append(('train', config.seed, config.temporal.features_dir))
    return {'stop_reason': 'finished', 'final_metrics': _fake_metrics('gru', config.seed),
            'best_score': 1.0}

  monkeypatch.setattr(oof, 'run_oof', run_oof)
  monkeypatch.setattr(trainer, 'train_and_evaluate', train)
  monkeypatch.setattr(inference, 'extract_features', lambda *a: pytest.fail('no extraction'))
  monkeypatch.setattr(inference, 'evaluate_checkpoint',
                      lambda config, workdir: calls.append(('eval', config.mode, workdir)))
  out = str(tmp_path / 'runs')
  summary = ablate.run_table(table, out, rows=['gru'], seeds=[1])
  folder = os.path.join(out, 'frames_oof', 'seed1')
  features = os.path.join(folder, 'features')
  assert calls == [('oof', 1, folder), ('eval', 'eval', os.path.join(folder, 'full')),
                   ('train', 1, features), ('eval', 'eval', os.path.join(out, 'gru', 'seed1'))]
  assert json.load(open(os.path.join(folder, 'result.json')))['best_score'] == 3.0
  assert summary['gru']['expr_f1']['mean'] == pytest.approx(_fake_metrics('gru', 1)['expr_f1'])
  ablate.run_table(table, out, rows=['gru_pred'], seeds=[1])  # no predictions.npy: again
  assert calls[4:] == [('oof', 1, folder), ('train', 1, features),
                       ('eval', 'eval', os.path.join(out, 'gru_pred', 'seed1'))]
  ablate.run_table(table, out, seeds=[1])  # all finished: nothing runs again
  assert len(calls) == 7


def test_a_finished_run_resumed_gets_its_result_from_its_checkpoint_and_records(
    tmp_path, monkeypatch):
  """A row whose run had finished without leaving result.json (stopped during its report):
  training resumes with nothing to do, so the final evaluation and metrics.jsonl give the
  result. A row's init_from row runs first."""
  rows = [{'name': 'frames', 'config': 'configs/mtl3.py'},
          {'name': 'tuned', 'config': 'configs/mtl3.py', 'init_from': 'frames'}]
  table = ablate.load_table(_table_file(tmp_path, rows) + ':test')
  table['base'] = REPO
  out, order = str(tmp_path / 'runs'), []

  def resumed(config, workdir):
    order.append(os.path.basename(os.path.dirname(workdir)))
    os.makedirs(os.path.join(workdir, 'checkpoints', '1'))  # a step, as init_from needs
    with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
      for score in (0.5, 0.9, 0.7):
        f.write(json.dumps({'split': 'validation', 'step': 1, 'score': score}) + '\n')
      f.write(json.dumps({'split': 'train', 'step': 1, 'score': 5.0}) + '\n')
    return {'stop_reason': 'finished', 'final_metrics': {}, 'best_score': -np.inf}

  monkeypatch.setattr(trainer, 'train_and_evaluate', resumed)
  monkeypatch.setattr(inference, 'evaluate_checkpoint',
                      lambda config, workdir: {'expr_f1': 0.25, 'au_f1': 0.5, 'per_au': [1, 2]})
  ablate.run_table(table, out, rows=['tuned'], seeds=[0])
  assert order == ['frames', 'tuned']
  result = json.load(open(os.path.join(out, 'frames', 'seed0', 'result.json')))
  assert result == {'expr_f1': 0.25, 'au_f1': 0.5, 'best_score': 0.9}


def test_a_row_that_names_a_later_row_is_refused(tmp_path):
  rows = [{'name': 'gru', 'config': 'configs/temporal.py:gru', 'features_of': 'frames'},
          {'name': 'frames', 'config': 'configs/mtl3.py'}]
  with pytest.raises(config_lib.ConfigError, match="features_of='frames' names no earlier row"):
    ablate.load_table(_table_file(tmp_path, rows))


def test_published_tables_give_runnable_configs(tmp_path):
  for method in (1, 2, 3, 4):
    table = ablate.load_table(os.path.join(REPO, 'configs', 'ablations', f'method{method}.py'
                                           ) + ':demo')
    for row in table['rows']:
      config = ablate.row_config(table, row, 1, str(tmp_path))
      assert config.seed == 1 and config.data.synthetic.num_videos == 480, row['name']
      if row.get('features_of'):
        assert config.temporal.features_dir.endswith(
            os.path.join(row['features_of'], 'seed1', 'features'))
      elif row.get('init_from'):
        assert config.init_from == os.path.join(str(tmp_path), row['init_from'], 'seed1')
      else:
        config_lib.check_config(config)
