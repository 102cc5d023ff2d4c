"""Configs fail safely: `check_config` names the field and what it allows before anything is
loaded, and the command line turns a bad config file, variant or field into one line."""
import glob
import os
import re
import subprocess
import sys

import pytest

from affectjax import config as config_lib
from affectjax import ensemble
from affectjax import kinds
from affectjax.models import temporal

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The variants each config file accepts before `,demo` / `,test` ('' = its default).
CHOICES = {'temporal.py': ('', *temporal.ENCODERS, 'gru,share_bottom', 'transformer,feedback'),
           'temporal_stat.py': ('', 'stat_lstm', 'stat', *(f'model{i}' for i in range(1, 7)),
                                'model3,end_to_end', 'model6,end_to_end'),
           'unitask.py': ('', 'va', 'expr', 'au', 'mtl')}


def _specs():
  for path in sorted(glob.glob(os.path.join(REPO, 'configs', '*.py'))):
    for choice in CHOICES.get(os.path.basename(path), ('',)):
      for size in ('', 'demo', 'test'):
        arg = ','.join(w for w in (choice, size) if w)
        yield os.path.relpath(path, REPO) + (f':{arg}' if arg else '')


@pytest.mark.parametrize('spec', list(_specs()))
def test_every_config_and_variant_passes(spec, tmp_path):
  c = config_lib.load_config_file(os.path.join(REPO, spec))
  if c.kind == 'temporal':  # a temporal run reads an image run's features: it must name them
    with pytest.raises(config_lib.ConfigError, match='config.temporal.features_dir is unset'):
      config_lib.check_config(c)
    c.temporal.features_dir = str(tmp_path)
  config_lib.check_config(c)


def test_kind_and_mode_names_match_their_tables():
  assert config_lib.KINDS == tuple(kinds.KINDS)
  main_source = open(os.path.join(REPO, 'affectjax', 'main.py')).read()
  assert all(f"'{mode}':" in main_source for mode in config_lib.MODES)


def _base(**fields):
  """The base config with `fields` ('a.b': value) set."""
  c = config_lib.base_config()
  c.update_from_flattened_dict(fields)
  return c


@pytest.mark.parametrize('field,value,message', [
    ('mode', 'trian', "config.mode='trian': must be one of train, eval, predict, features, "
                      'ensemble, oof'),
    ('kind', 'video', "config.kind='video': must be one of image, block, temporal"),
    ('tasks', 'expr,pose', "config.tasks='expr,pose': unknown task 'pose'; expected a non-empty "
                           'subset of expr,au,va'),
    ('tasks', '', "config.tasks='': no task"),
    ('num_expr_classes', 6, 'config.num_expr_classes=6: must be one of 7, 8'),
    ('num_epochs', 0.0, 'config.num_epochs=0.0: must be > 0'),
    ('optim.learning_rate', 0.0, 'config.optim.learning_rate=0.0: must be > 0'),
    ('optim.weight_decay', -1e-4, 'config.optim.weight_decay=-0.0001: must be >= 0'),
    ('optim.warmup_epochs', -1.0, 'config.optim.warmup_epochs=-1.0: must be >= 0'),
    ('optim.end_lr_factor', -0.1, 'config.optim.end_lr_factor=-0.1: must be >= 0'),
    ('optim.optimizer', 'lamb', "config.optim.optimizer='lamb': must be one of adam, adamw, sgd"),
    ('optim.schedule', 'step', "config.optim.schedule='step': must be one of cosine, constant"),
    ('global_batch_size', 0, 'config.global_batch_size=0: must be >= 1'),
    ('eval_batch_size', -8, 'config.eval_batch_size=-8: must be >= 1'),
    ('log_every_steps', 0, 'config.log_every_steps=0: must be >= 1'),
    ('checkpoint_every_steps', 0, 'config.checkpoint_every_steps=0: must be >= 1'),
    ('checkpoint_every_epochs', -1.0, 'config.checkpoint_every_epochs=-1.0: must be >= 0'),
    ('eval_every_epochs', 0.0, 'config.eval_every_epochs=0.0: must be > 0'),
    ('keep_best_checkpoints', -1, 'config.keep_best_checkpoints=-1: must be >= 0'),
    ('data.max_bad_frame_fraction', 1.5,
     'config.data.max_bad_frame_fraction=1.5: must be in [0, 1]'),
    ('data.image_size', 0, 'config.data.image_size=0: must be > 0'),
    ('data.worker_count', -2, 'config.data.worker_count=-2: must be >= -1 (-1: auto)'),
    ('prefetch_to_device', 0, 'config.prefetch_to_device=0: must be >= 1'),
    ('data.sampling', 'random',
     "config.data.sampling='random': must be one of joint, alternating, balanced"),
    ('data.layout', 'abaw', "config.data.layout='abaw': must be one of auto, per_task, mtl"),
    ('data.source', 'zip', "config.data.source='zip': must be one of jpeg, arrayrecord, tfds"),
    ('edition', 'abaw9', "config.edition='abaw9': must be one of abaw2, abaw3"),
    ('eval_checkpoint', 'last', "config.eval_checkpoint='last': must be best, latest or a step"),
    ('model.kernel_layout', 'OIHW',
     "config.model.kernel_layout='OIHW': must be one of OHWI, HWIO"),
    ('temporal.inputs', 'probs',
     "config.temporal.inputs='probs': must be one of embedding, predictions"),
])
def test_a_bad_value_names_the_field_and_what_it_allows(field, value, message):
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.check_config(_base(**{field: value}))
  assert str(e.value).startswith(message)
  assert '\n' not in str(e.value)


def test_training_keeps_a_checkpoint_to_resume_from():
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.check_config(_base(keep_checkpoints=0))
  assert str(e.value) == (
      'config.keep_checkpoints=0: must be >= 1 (training keeps the latest checkpoint to resume '
      'from; keep_best_checkpoints adds the best ones)')
  config_lib.check_config(_base(keep_checkpoints=0, mode='eval'))  # nothing is saved there


def test_sampling_schemes_need_their_tasks():
  with pytest.raises(config_lib.ConfigError, match='alternating: needs tasks expr and au'):
    config_lib.check_config(_base(tasks='expr,va', **{'data.sampling': 'alternating'}))
  with pytest.raises(config_lib.ConfigError, match='balanced: needs the expr task'):
    config_lib.check_config(_base(tasks='au', **{'data.sampling': 'balanced'}))


def test_feedback_pairs_are_checked(tmp_path):
  fields = {'kind': 'temporal', 'temporal.features_dir': str(tmp_path),
            'temporal.framework': 'feedback'}
  for feedback, message in (
      ('au>expr,expr>au', 'form a cycle'), ('au>pose', "names ['pose'], not tasks of this run"),
      ('', "needed by, and only by, temporal.framework='feedback'"), ('au', 'source>target')):
    with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
      config_lib.check_config(_base(**fields, **{'temporal.feedback': feedback}))
  config_lib.check_config(_base(**fields, **{'temporal.feedback': 'au>expr'}))


def test_paths_the_config_names_must_exist(tmp_path):
  missing = str(tmp_path / 'nope')
  cases = [
      ({'data.root': missing}, f'config.data.root={missing}: no such folder'),
      ({'data.source': 'arrayrecord'}, 'config.data.packed_dir is unset'),
      ({'data.source': 'tfds', 'data.packed_dir': missing},
       f'config.data.packed_dir={missing}: no such folder'),
      ({'kind': 'temporal', 'temporal.features_dir': missing},
       f'config.temporal.features_dir={missing}: no such folder'),
      ({'mode': 'features', 'kind': 'temporal', 'temporal.features_dir': str(tmp_path)},
       'config.kind=temporal: mode=features extracts features with an image run'),
  ]
  for fields, message in cases:
    with pytest.raises(config_lib.ConfigError) as e:
      config_lib.check_config(_base(**fields))
    assert str(e.value).startswith(message), str(e.value)
  (tmp_path / 'file').write_text('x')
  with pytest.raises(config_lib.ConfigError, match='data.root=.*file: a file, not a folder'):
    config_lib.check_config(_base(**{'data.root': str(tmp_path / 'file')}))


def test_init_from_must_name_weights_and_is_not_created(tmp_path):
  missing = str(tmp_path / 'weights')
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.check_config(_base(init_from=missing))
  assert str(e.value) == (
      f'config.init_from={missing}: no such file or directory; expected converted weights '
      "(python -m affectjax.convert --out) or a run's workdir / checkpoints folder / step folder")
  assert not os.path.exists(missing)
  with pytest.raises(config_lib.ConfigError, match='init_from=.*: an empty folder'):
    config_lib.check_config(_base(init_from=str(tmp_path)))


def test_carried_state_needs_a_recurrent_encoder_over_segments():
  config_lib.check_config(_base(**{'temporal.carry_state': True}))  # GRU over segments
  for field, value in (('temporal.encoder', 'transformer'), ('temporal.window', 'block')):
    with pytest.raises(config_lib.ConfigError, match='carry_state: carries a GRU or LSTM'):
      config_lib.check_config(_base(**{'temporal.carry_state': True, field: value}))


def test_ensemble_needs_run_folders_and_checkpoints(tmp_path):
  with pytest.raises(config_lib.ConfigError, match='ensemble.members is unset'):
    config_lib.check_config(_base(mode='ensemble'))
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.check_config(_base(mode='ensemble', **{'ensemble.members': str(tmp_path)}))
  assert str(e.value) == (f'config.ensemble.members: {tmp_path} is not a run folder (no '
                          'config.json there: a folder a training run wrote)')
  (tmp_path / 'config.json').write_text('{}')
  with pytest.raises(config_lib.ConfigError, match='@last: the checkpoint after @ must be'):
    config_lib.check_config(_base(mode='ensemble', **{'ensemble.members': f'{tmp_path}@last'}))
  config_lib.check_config(_base(mode='ensemble',
                                **{'ensemble.members': f'{tmp_path}, {tmp_path}@12'}))


def test_an_ensemble_takes_its_expr_classes_from_the_members_that_predict_expr():
  va_only, mtl = load_config('va', 'test'), load_config('mtl3', 'test')  # 7 (unused) and 8
  assert (va_only.num_expr_classes, mtl.num_expr_classes) == (7, 8)
  assert ensemble.expr_classes([va_only, mtl]) == ensemble.expr_classes([mtl, va_only]) == 8
  assert ensemble.expr_classes([va_only]) == 7
  with pytest.raises(ValueError, match=r'different EXPR classes \(\[7, 8\]\)'):
    ensemble.expr_classes([load_config('mtl', 'test'), mtl])


def test_predict_needs_exactly_one_existing_test_list(tmp_path):
  listed = tmp_path / 'test.txt'
  listed.write_text('video1\n')
  with pytest.raises(config_lib.ConfigError, match='mode=predict needs exactly one of them'):
    config_lib.check_config(_base(mode='predict'))
  with pytest.raises(config_lib.ConfigError, match='mode=predict needs exactly one of them'):
    config_lib.check_config(_base(mode='predict', **{'predict.videos': str(listed),
                                                     'predict.images': str(listed)}))
  for field in ('predict.videos', 'predict.au_thresholds', 'predict.frame_counts'):
    fields = {'predict.videos': str(listed), field: str(tmp_path / 'nope.txt')}
    with pytest.raises(config_lib.ConfigError) as e:
      config_lib.check_config(_base(mode='predict', **fields))
    assert str(e.value) == f'config.{field}={tmp_path / "nope.txt"}: no such file'
  with pytest.raises(config_lib.ConfigError, match='predict.images=.*: a folder, not a file'):
    config_lib.check_config(_base(mode='predict', **{'predict.images': str(tmp_path)}))
  config_lib.check_config(_base(mode='predict', **{'predict.videos': str(listed)}))
  config_lib.check_config(_base(**{'predict.videos': str(tmp_path / 'nope.txt')}))  # not read


def test_config_file_problems_are_one_line():
  problem = config_lib.config_flag_problem
  assert problem(['prog', '--config=configs/mtl.py:demo', '--config.num_epochs=2']) is None
  assert problem(['prog', '--config=configs/nope.py']).startswith(
      '--config=configs/nope.py: no such config file configs/nope.py (config files in configs: '
      'au.py, expr.py, mtl.py')
  assert problem(['prog', '--config', 'configs/mtl.py:bogus']) == (
      "configs/mtl.py: unknown variant 'bogus': expected demo or test (or no variant)")
  assert problem(['prog', '--config=configs/unitask.py:vaa']) == (
      "configs/unitask.py: unknown variant 'vaa': expected one of va, expr, au, mtl, optionally "
      'with demo or test (e.g. configs/unitask.py:va,demo)')
  assert problem(['prog', '--config=configs/mtl.py', '--config.optim.lr=1']).startswith(
      "--config.optim.lr: config.optim has no field 'lr'. Valid fields of config.optim: b1, b2")


@pytest.mark.parametrize('args,status,message', [
    (['--config=configs/nope.py'], 2, 'error: --config=configs/nope.py: no such config file '
                                      'configs/nope.py (config files in configs: au.py'),
    (['--config=configs/mtl.py:bogus'], 2,
     "error: configs/mtl.py: unknown variant 'bogus': expected demo or test (or no variant)"),
    (['--config=configs/mtl.py:test', '--config.num_epochs=0'], 2,
     'error: config.num_epochs=0.0: must be > 0'),
    (['--config=configs/mtl3.py:test', '--config.mode=predict', '--config.data.root={tmp}',
      '--config.predict.videos={tmp}/empty.txt'], 1,
     'error: {tmp}/empty.txt: the list names no video (expected one video name per line)'),
])
def test_the_command_line_prints_one_line_and_exits(args, status, message, tmp_path):
  workdir = tmp_path / 'run'
  (tmp_path / 'empty.txt').write_text('\n')
  args = [arg.replace('{tmp}', str(tmp_path)) for arg in args]
  message = message.replace('{tmp}', str(tmp_path))
  done = subprocess.run([sys.executable, '-m', 'affectjax.main', *args, f'--workdir={workdir}'],
                        cwd=REPO, capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert done.returncode == status, done.stderr
  assert 'Traceback' not in done.stderr
  assert done.stderr.startswith(message) and done.stderr.count('\n') == 1, done.stderr
  assert not workdir.exists()

def load_config(name, variant):
  return config_lib.load_config_file(os.path.join(REPO, 'configs', f'{name}.py:{variant}'))


@pytest.mark.parametrize('name', ['mtl', 'mtl_va', 'expr', 'au', 'va', 'mtl3'])  # image runs
def test_every_config_has_demo_and_test_variants(name):
  for variant in ('demo', 'test'):
    c = load_config(name, variant)
    assert c.data.root == '' and c.model.arch == 'resnet18'
  full = load_config(name, '')
  assert full.model.arch == 'resnet50' and full.data.image_size == 112


def test_temporal_statistical_frame_model_trains_its_last_stage():
  """methods.md, ABAW 2020: the face feature model has "all weights frozen except the last
  stage and the classifier", lr 1e-4 with no schedule named; its small variants start from
  random weights, so they train every stage."""
  for name, variant in (('mtl_va', ''), ('temporal_stat', 'model1'), ('temporal_stat', 'model2')):
    full = load_config(name, variant)
    assert (full.model.trainable, full.optim.schedule) == ('layer4', 'constant')
    assert full.optim.learning_rate == 1e-4 and full.optim.optimizer == 'adam'
  for variant in ('demo', 'test'):
    assert load_config('mtl_va', variant).model.trainable == 'all'


def test_unitask_config_variants():
  for task, tasks in (('va', 'va'), ('expr', 'expr'), ('au', 'au'), ('mtl', 'expr,au,va')):
    full = load_config('unitask', task)
    assert (full.tasks, full.model.arch, full.data.image_size) == (tasks, 'resnet18', 112)
    assert full.optim.plateau.enabled and full.optim.plateau.monitor == 'val_score'
    assert full.model.head_hidden == 0  # the fc replaced, no hidden layer
    assert (full.loss.expr, full.loss.au, full.loss.va) == (
        'ce', 'mse' if task == 'mtl' else 'bce', 'mse')
    assert full.loss.expr_class_weights == ('balanced' if task == 'expr' else None)
    assert full.optim.optimizer == ('sgd' if task == 'expr' else 'adam')
    for variant in ('demo', 'test'):
      small = load_config('unitask', f'{task},{variant}')
      assert small.tasks == tasks and small.data.root == '' and small.model.width < 64
  assert load_config('unitask', '').tasks == 'expr,au,va'
  with pytest.raises(ValueError, match="unknown variant 'vaa'"):
    load_config('unitask', 'vaa,demo')
