"""The training loop end to end on the synthetic Aff-Wild2: resume, preemption, NaN stop, eval, CLI.
(The inference modes on the same trained run: tests/test_inference_modes.py.)"""
import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from affectjax import checkpoint as ckpt_lib
from affectjax import kinds, parallel, train, trainer
from run_helpers import REPO, assert_same_params, load_config, params_of


def test_run_trains_evaluates_and_writes_its_records(uninterrupted, config):
  summary, workdir = uninterrupted
  assert summary['stop_reason'] == 'finished'
  assert summary['steps'] >= 4
  records = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  evals = [r for r in records if r['split'] == 'validation']
  trains = [r for r in records if r['split'] == 'train']
  assert evals and trains
  for key in ('expr_f1', 'au_f1', 'va_ccc', 'mtl_score', 'score'):
    assert np.isfinite(evals[-1][key])
  assert all(np.isfinite(r['loss']) for r in trains)
  assert all(0.0 <= r['input_wait_fraction'] <= 1.0 for r in trains)
  # The plateau rule saw each evaluation: patience 0, so every score not above the best so far
  # (by rtol) scaled the learning rate by the factor.
  best, expected = -np.inf, 1.0
  for r in evals:
    improved = r['score'] > best + config.optim.plateau.rtol
    expected, best = (expected, r['score']) if improved else (expected * 0.1, best)
  from affectjax import optim  # pylint: disable=import-outside-toplevel
  assert float(optim.plateau_scale(summary['state'].opt_state)) == pytest.approx(expected)
  # Reading counts from the first frame: every frame of every training batch, and of the
  # validation pass, none unreadable.
  assert summary['train_frames_read'] == summary['steps'] * config.global_batch_size
  assert summary['train_bad_frames'] == 0
  assert evals[-1]['train_frames_read'] == summary['train_frames_read']
  assert evals[-1]['eval_frames'] == len(kinds.load_index(config, 'validation'))
  assert evals[-1]['skipped_frames'] == 0
  assert not os.path.exists(workdir / 'run.lock')  # released at the end
  assert os.listdir(workdir / 'tensorboard')
  assert json.load(open(workdir / 'config.json'))['tasks'] == 'expr,au,va'
  checkpoints = ckpt_lib.Checkpoints(str(workdir / 'checkpoints'))
  assert checkpoints.latest_step() == summary['steps']
  assert checkpoints.best_step() is not None
  checkpoints.close()


def test_resumed_run_reproduces_the_uninterrupted_run_read_without_a_thread_from_decoded_frames(
    uninterrupted, config, tmp_path):
  summary, _ = uninterrupted
  c = config.copy_and_resolve_references()
  # Batches read ahead on a thread of their own (the default), as in the uninterrupted run:
  # the checkpoints hold the input state of the batch each one trained last.
  c.halt_after_steps = 8
  c.checkpoint_every_steps = 3  # saves at 3, 5 (evaluation), 6 and 8 (halt); keeps 6 and 8
  first = trainer.train_and_evaluate(c, str(tmp_path / 'run'))
  assert first['steps'] == 8 and first['stop_reason'].startswith('halted')
  # A resumed run's best score is the whole run's, also one from before the resume (Orbax
  # keeps it): a copy resumed for one step, with no evaluation after the resume.
  shutil.copytree(tmp_path / 'run', tmp_path / 'copy')
  c.halt_after_steps = 9
  one_step = trainer.train_and_evaluate(c, str(tmp_path / 'copy'))
  assert (one_step['steps'], first['best_step'], one_step['best_step']) == (9, 5, 5)
  assert one_step['best_score'] == first['best_score']
  # As if killed (SIGKILL) before the save of step 8: the latest checkpoint is step 6
  # (mid-epoch), and metrics.jsonl has a row of step 8 that the resumed run will redo.
  shutil.rmtree(tmp_path / 'run' / 'checkpoints' / '8')
  c.halt_after_steps = 0
  # Resumed reading decoded pixels (data.decoded_cache), by the thread that dispatches the
  # steps (prefetch_thread=False): the same batches, the same run.
  c.prefetch_thread = False
  c.data.decoded_cache, c.data.decoded_cache_dir = True, str(tmp_path / 'decoded')
  resumed = trainer.train_and_evaluate(c, str(tmp_path / 'run'))
  assert resumed['steps'] == summary['steps']
  assert_same_params(params_of(resumed), params_of(summary))
  built = sorted(f.split('-')[0] for f in os.listdir(tmp_path / 'decoded' / 'decoded')
                 if not f.endswith('.lock'))
  assert built == ['train', 'validation']
  # One row per step and split: the interrupted run's rows after step 6 gave way to the
  # resumed run's, with a marker row where it resumed.
  records = [json.loads(line) for line in open(tmp_path / 'run' / 'metrics.jsonl')]
  keys = [(r['step'], r['split']) for r in records]
  assert len(keys) == len(set(keys))
  assert [r['step'] for r in records if r['split'] == 'train'] == [2, 4, 6, 8, 10]
  assert [r['step'] for r in records if r['split'] == 'validation'] == [5, 10]
  marker = [r for r in records if r['split'] == 'resume']
  assert [(m['step'], m['superseded_rows']) for m in marker] == [(6, 1)]
  assert (resumed['best_score'], resumed['best_step']) == (summary['best_score'],
                                                           summary['best_step'])
  # A resume that is refused (another network) leaves the run's records as they were.
  kept = {n: (tmp_path / 'run' / n).read_bytes() for n in ('config.json', 'metrics.jsonl')}
  c.model.width *= 2
  c.num_epochs *= 2
  with pytest.raises(ValueError):
    trainer.train_and_evaluate(c, str(tmp_path / 'run'))
  assert {n: (tmp_path / 'run' / n).read_bytes() for n in kept} == kept


def test_sigterm_saves_a_checkpoint_and_stops(config, tmp_path, monkeypatch):
  real_prefetch = parallel.prefetch_to_mesh

  def prefetch_then_preempt(*args, **kwargs):
    for i, item in enumerate(real_prefetch(*args, **kwargs)):
      if i == 2:
        os.kill(os.getpid(), signal.SIGTERM)  # a real signal, as a scheduler would send
      yield item

  monkeypatch.setattr(parallel, 'prefetch_to_mesh', prefetch_then_preempt)
  summary = trainer.train_and_evaluate(config, str(tmp_path))
  assert summary['stop_reason'].startswith('preempted')
  assert summary['steps'] == 3
  checkpoints = ckpt_lib.Checkpoints(str(tmp_path / 'checkpoints'))
  assert checkpoints.latest_step() == 3
  checkpoints.close()


def test_several_processes_stop_together_at_a_logging_step(monkeypatch):
  """A SIGTERM reaches each process at its own step; the save that follows is a collective, so
  with several processes the stop is decided jointly, at the logging steps, which every
  process reaches in turn (one signalled process stops them all there)."""
  gathered = []

  def allgather(flag):  # this process's flag and another's, which was not signalled
    gathered.append(int(flag))
    return np.array([int(flag), 0])

  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(trainer.multihost_utils, 'process_allgather', allgather)
  with trainer._Preemption() as preemption:  # pylint: disable=protected-access
    assert not preemption.agreed(at_sync=True)
    os.kill(os.getpid(), signal.SIGTERM)
    assert preemption.requested and not preemption.agreed(at_sync=False)
    assert preemption.agreed(at_sync=True)
  assert gathered == [0, 1]  # gathered at the logging steps only
  monkeypatch.setattr(jax, 'process_count', lambda: 1)
  with trainer._Preemption() as preemption:  # pylint: disable=protected-access
    os.kill(os.getpid(), signal.SIGTERM)
    assert preemption.agreed(at_sync=False)  # one process: at once


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(config, tmp_path, monkeypatch):
  real_step = train.train_step

  def poisoned_step(state, batch, **kwargs):
    new_state, metrics = real_step(state, batch, **kwargs)
    # From the 5th step on, report a non-finite loss (as an exploding model would).
    return new_state, train.StepMetrics.pack(dict(metrics, finite=state.step < 4))

  monkeypatch.setattr(train, 'train_step', poisoned_step)
  c = config.copy_and_resolve_references()
  c.checkpoint_every_steps = 2
  c.log_every_steps = 1
  with pytest.raises(FloatingPointError, match='non-finite loss.*last good checkpoint is step 4'):
    trainer.train_and_evaluate(c, str(tmp_path))
  checkpoints = ckpt_lib.Checkpoints(str(tmp_path / 'checkpoints'))
  assert checkpoints.latest_step() == 4
  checkpoints.close()


def test_eval_mode_and_unknown_config_field_through_the_command_line(uninterrupted, config):
  _, workdir = uninterrupted
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2')
  base = [sys.executable, '-m', 'affectjax.main', '--config=configs/mtl3.py:test',
          f'--workdir={workdir}', f'--config.data.cache_dir={config.data.cache_dir}']
  bad = subprocess.run(base + ['--config.optim.learning_rat=0.1'], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0
  assert "config.optim has no field 'learning_rat'" in bad.stderr
  assert 'learning_rate' in bad.stderr  # the valid fields are listed
  done = subprocess.run(base + ['--config.mode=eval', '--config.eval_checkpoint=latest'],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'Evaluated checkpoint step' in done.stdout
  out = [f for f in os.listdir(workdir) if f.startswith('eval_validation_step')]
  metrics = json.load(open(workdir / out[0]))
  # The same checkpoint evaluated in-process during training gives the same numbers.
  records = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  last_eval = [r for r in records if r['split'] == 'validation'][-1]
  for key in ('expr_f1', 'au_f1', 'va_ccc'):
    np.testing.assert_allclose(metrics[key], last_eval[key], rtol=1e-5)
  predictions = [f for f in os.listdir(workdir) if f.startswith('predictions_validation')]
  lines = open(workdir / predictions[0]).read().splitlines()
  assert lines[0] == 'image,valence,arousal,expression,aus'
  # One row per validation frame (the padding rows of the last batch are not written).
  index = kinds.load_index(config, 'validation', ('expr', 'au', 'va'))
  assert len(lines) - 1 == len(index)
  names = {f'{index.video_names[v]}/{f:05d}.jpg' for v, f in zip(index.video_id, index.frame)}
  assert {line.split(',')[0] for line in lines[1:]} == names
  assert metrics['skipped_frames'] == 0
  # Per-AU thresholds tuned on the evaluated split: at least the F1 at 0.5 (0.5 is a candidate).
  assert len(metrics['au_thresholds']) == 12
  assert metrics['au_f1_tuned'] >= metrics['au_f1'] - 1e-12
  assert metrics['va_window'] >= 1 and metrics['va_ccc_smoothed'] >= metrics['va_ccc'] - 1e-9


def test_packed_shards_alone_serve_the_index(config, tmp_path):
  from affectjax.data import pack
  tasks = ('expr', 'au', 'va')
  from_tree = kinds.load_index(config, 'validation', tasks)
  pack.pack_split(from_tree, str(tmp_path), threads=1)
  c = config.copy_and_resolve_references()
  c.data.root = ''
  c.data.source = 'arrayrecord'
  c.data.packed_dir = str(tmp_path)
  from_pack = kinds.load_index(c, 'validation', tasks)
  assert len(from_pack) == len(from_tree)
  for key in ('video_id', 'frame', 'expr', 'au', 'va'):
    np.testing.assert_array_equal(getattr(from_pack, key), getattr(from_tree, key))


@pytest.mark.parametrize('variant', ['mtl,test', 'va,test'])
def test_unitask_study_trains_with_weights_from_the_training_labels(variant, config, tmp_path):
  from sklearn.utils.class_weight import compute_class_weight
  c = load_config('unitask', variant)
  c.data.cache_dir = config.data.cache_dir
  c.data.synthetic.num_videos = 60  # enough expression segments for all 8 classes
  c.num_devices = 2
  c.halt_after_steps = 3
  if variant == 'mtl,test':  # the naive model's plain losses, with the uni-task weights added
    c.loss.expr_class_weights, c.loss.au_pos_weight = 'balanced', 'neg_pos_ratio'
  summary = trainer.train_and_evaluate(c, str(tmp_path))
  assert summary['steps'] == 3
  saved = json.load(open(tmp_path / 'config.json'))['loss']
  records = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  train_records = [r for r in records if r['split'] == 'train']
  assert train_records and all(np.isfinite(r['loss']) for r in train_records)
  if variant == 'va,test':
    assert saved['expr_class_weights'] is None and saved['au_pos_weight'] is None
    assert saved['va'] == 'mse' and 'loss_va' in train_records[0]
    return
  index = kinds.load_index(c, 'train', ('expr', 'au', 'va'))
  expr = index.expr[index.expr >= 0]
  np.testing.assert_allclose(saved['expr_class_weights'], compute_class_weight(
      'balanced', classes=np.arange(8), y=expr), rtol=1e-6)
  au = index.au
  np.testing.assert_allclose(saved['au_pos_weight'], (au == 0).sum(0) / (au == 1).sum(0),
                             rtol=1e-6)


# configs/mtl.py (alternating sampling) trains in test_docs.py, from the README's commands.
@pytest.mark.parametrize('name,sampling', [('mtl_va', 'balanced')])
def test_published_system_configs_train(name, sampling, config, tmp_path):
  c = load_config(name, 'test')
  assert c.data.sampling == sampling
  c.data.cache_dir = config.data.cache_dir
  c.num_devices = 2
  c.halt_after_steps = 4
  summary = trainer.train_and_evaluate(c, str(tmp_path))
  assert summary['steps'] == 4
  records = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  train_records = [r for r in records if r['split'] == 'train']
  assert train_records and all(np.isfinite(r['loss']) for r in train_records)
  if name == 'mtl_va':
    assert all('loss_va5' in r for r in train_records)


def test_checkpoint_policy_saves_every_n_steps_every_epoch_and_at_the_end(config, tmp_path):
  c = config.copy_and_resolve_references()
  c.checkpoint_every_steps, c.checkpoint_every_epochs = 3, 1.0
  c.eval_every_epochs = 100.0  # only the final evaluation (which also saves)
  c.keep_checkpoints, c.keep_best_checkpoints = 100, 0
  summary = trainer.train_and_evaluate(c, str(tmp_path))
  total = summary['steps']
  records = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  train_record = next(r for r in records if r['split'] == 'train')
  steps_per_epoch = int(round(train_record['step'] / train_record['epoch']))
  assert steps_per_epoch % 3 and total > steps_per_epoch  # the two rules differ here
  expected = {s for s in range(1, total + 1) if s % 3 == 0 or s % steps_per_epoch == 0}
  checkpoints = ckpt_lib.Checkpoints(str(tmp_path / 'checkpoints'))
  assert set(checkpoints.manager.all_steps()) == expected | {total}
  checkpoints.close()
