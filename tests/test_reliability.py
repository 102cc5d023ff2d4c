"""Runs that fail safely (docs/reliability.md): the workdir lock, checkpoint saves that cannot be
written, the bad-frame report. Each probe checks the message and that nothing is lost."""
import errno
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from affectjax import checkpoint as ckpt_lib
from affectjax import evaluation, trainer, workdir as workdir_lib
from affectjax.data import pipeline, sources
# tests/ is on sys.path: the helpers of the index and pipeline tests
from test_index import build_index, images, per_task
from test_pipeline import BATCH, _config, _copy_with_corrupt_frames, _take
from test_pipeline import dataset_root, train_index  # pylint: disable=unused-import (fixtures)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_HOLD = ('import sys, time; from affectjax import workdir; '
         'lock = workdir.WorkdirLock(sys.argv[1]); lock.acquire(); print("held", flush=True); '
         'time.sleep(600)')


@pytest.fixture(scope='module')
def config(tmp_path_factory):
  from affectjax import config as config_lib
  c = config_lib.load_config_file(os.path.join(REPO, 'configs', 'mtl3.py:test'))
  c.data.cache_dir = str(tmp_path_factory.mktemp('data_cache'))
  c.num_devices = 1
  return c


def _hold_lock(path):
  """A second process holding the workdir lock (as a training run does)."""
  holder = subprocess.Popen([sys.executable, '-c', _HOLD, str(path)], stdout=subprocess.PIPE,
                            text=True, cwd=REPO)
  assert holder.stdout.readline().strip() == 'held'
  return holder


def test_a_second_run_on_a_locked_workdir_stops_at_once_naming_the_first(config, tmp_path):
  holder = _hold_lock(tmp_path)
  try:
    with pytest.raises(workdir_lib.WorkdirLocked, match=rf'in use by another training run '
                       rf'\(pid {holder.pid} on host .*Wait for it to finish'):
      trainer.train_and_evaluate(config, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ['run.lock']  # nothing of the run was touched
    # The command line says it in one line, without a traceback.
    cli = subprocess.run(
        [sys.executable, '-m', 'affectjax.main', '--config=configs/mtl3.py:test',
         f'--workdir={tmp_path}'], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert cli.returncode == 1
    assert 'Traceback' not in cli.stderr
    assert f'in use by another training run (pid {holder.pid}' in cli.stderr
  finally:
    holder.kill()
    holder.wait()
  # The holder died without releasing the lock (SIGKILL): the lock is stale, the next run
  # takes it over and says whose it was.
  lock = workdir_lib.WorkdirLock(str(tmp_path))
  lock.acquire()
  try:
    assert json.load(open(tmp_path / 'run.lock'))['pid'] == os.getpid()
  finally:
    lock.release()
  assert not os.path.exists(tmp_path / 'run.lock')


def test_lock_without_flock_judges_by_the_content(tmp_path, monkeypatch):
  def no_flock(*args):
    raise OSError(errno.ENOLCK, 'No locks available')
  monkeypatch.setattr(workdir_lib.fcntl, 'flock', no_flock)
  dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                        capture_output=True, text=True, check=True)
  (tmp_path / 'run.lock').write_text(json.dumps(
      {'host': workdir_lib.socket.gethostname(), 'pid': int(dead.stdout), 'time': time.time()}))
  with workdir_lib.WorkdirLock(str(tmp_path)):  # a dead process's lock: taken over
    pass
  (tmp_path / 'run.lock').write_text(json.dumps({'host': 'elsewhere', 'pid': 1, 'time': 0}))
  with pytest.raises(workdir_lib.WorkdirLocked, match='cannot lock files: if that run has '
                     'ended, delete the file'):
    workdir_lib.WorkdirLock(str(tmp_path)).acquire()


@pytest.fixture(scope='module')
def disk_full_run(config, tmp_path_factory):
  """A run whose disk is full from its third save on: (workdir, the error it stopped with)."""
  workdir = tmp_path_factory.mktemp('disk_full')
  c = config.copy_and_resolve_references()
  c.checkpoint_every_steps = 2
  real_usage = shutil.disk_usage

  def usage(path):
    total, used, free = real_usage(path)
    full = len([d for d in os.listdir(workdir / 'checkpoints') if d.isdigit()]) >= 2
    return type(real_usage(path))(total, used, 1000 if full else free)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(ckpt_lib.shutil, 'disk_usage', usage)
    with pytest.raises(ckpt_lib.CheckpointSaveError) as error:
      trainer.train_and_evaluate(c, str(workdir))
  return workdir, error.value


def test_a_full_disk_at_a_checkpoint_stops_with_one_message_and_keeps_the_last(disk_full_run):
  workdir, error = disk_full_run
  assert re.fullmatch(
      r'cannot save checkpoint step 5 in .*checkpoints: it needs about [\d.]+ [KM]B, the disk '
      r'has 1.0 KB free\. The latest complete checkpoint, step 4, is intact: free some space and '
      r'run the same command again to resume from it\.', str(error))
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4']  # no temporary folder
  checkpoints = ckpt_lib.Checkpoints(str(workdir / 'checkpoints'), read_only=True)
  assert checkpoints.latest_step() == 4
  checkpoints.close()
  assert not os.path.exists(workdir / 'run.lock')


def test_a_failed_asynchronous_save_is_one_line_and_leaves_no_temporary_folder(tmp_path):
  os.makedirs(tmp_path / '3.orbax-checkpoint-tmp')  # of an earlier run: Orbax removes it
  checkpoints = ckpt_lib.Checkpoints(str(tmp_path))
  for _ in range(100):  # in a background thread: wait for it, then make the failed save's
    if not os.path.exists(tmp_path / '3.orbax-checkpoint-tmp'):
      break
    time.sleep(0.05)
  os.makedirs(tmp_path / '7.orbax-checkpoint-tmp' / 'state')
  try:  # what Orbax raises for a full disk, under layers of asyncio and futures
    try:
      raise OSError(errno.ENOSPC, 'No space left on device')
    except OSError as cause:
      raise ValueError('RESOURCE_EXHAUSTED: Error writing "params.kernel" in OCDBT database '
                       f'at local file "{tmp_path}/7.orbax-checkpoint-tmp/state": Failed to '
                       'write 1287 bytes to file 7: No space left on device') from cause
  except ValueError as orbax_error:
    error = checkpoints._failed(orbax_error)
  assert str(error) == (f'could not save checkpoint step 7 in {tmp_path}: No space left on '
                        'device. No checkpoint of this run is complete yet.')
  assert os.listdir(tmp_path) == []
  checkpoints.close()


def test_evaluation_line_names_unreadable_frames():
  text = evaluation.format_frame_counts({'train_frames_read': 12000, 'train_bad_frames': 3,
                                         'skipped_frames': 2, 'eval_frames': 1500})
  assert text == ('unreadable frames: training 3 of 12,000 read (substituted), evaluation 2 of '
                  '1,500 (left out of the score)')
  assert evaluation.format_frame_counts({'skipped_frames': 0, 'eval_frames': 10}) == (
      'unreadable frames: evaluation 0 of 10')


def _tree(folder):
  """Every file under `folder` with its size and modification time."""
  return {os.path.join(d, n): (os.path.getsize(os.path.join(d, n)),
                               os.path.getmtime(os.path.join(d, n)))
          for d, _, names in os.walk(folder) for n in names}


def test_eval_of_a_read_only_run_writes_nothing_there(config, disk_full_run, monkeypatch,
                                                      capsys):
  from affectjax import files, inference
  finished_run = disk_full_run[0]
  before = _tree(finished_run)
  real = files.is_writable
  monkeypatch.setattr(files, 'is_writable',  # as on a read-only mount (root ignores chmod)
                      lambda folder: False if str(folder) == str(finished_run) else real(folder))
  c = config.copy_and_resolve_references()
  c.mode = 'eval'
  metrics = inference.evaluate_checkpoint(c, str(finished_run))
  out = capsys.readouterr().out
  assert f'{finished_run} is not writable: the results are printed, not written' in out
  assert 'Evaluated checkpoint step 4 on validation' in out and 'score' in metrics
  assert _tree(finished_run) == before  # no TensorBoard file, no metrics row, no lock


def test_eval_of_a_mistyped_workdir_says_so_and_creates_nothing(config, tmp_path):
  from affectjax import inference
  c = config.copy_and_resolve_references()
  c.mode = 'eval'
  with pytest.raises(ckpt_lib.CheckpointError, match='no checkpoint there'):
    inference.evaluate_checkpoint(c, str(tmp_path / 'typo'))
  assert not os.path.exists(tmp_path / 'typo')


def test_metrics_rows_of_a_run_killed_before_its_first_checkpoint_give_way(tmp_path):
  from affectjax import logs
  path = tmp_path / 'metrics.jsonl'
  rows = [{'step': 2, 'split': 'train', 'loss': 1.0}, {'step': 4, 'split': 'train', 'loss': 0.9}]
  # A row cut short (a full disk), then appended to by a later run: left out, with a warning.
  path.write_text(json.dumps(rows[0]) + '\n{"step": 3, "spl' + json.dumps(rows[1]) + '\n')
  assert [r['step'] for r in logs.read_records(str(path))] == [2]
  logs.RunWriter(str(tmp_path), resume_step=None).close()  # killed before any checkpoint
  assert logs.read_records(str(path))[0] == dict(
      logs.read_records(str(path))[0], step=0, split='resume', superseded_rows=1)
  assert len(logs.read_records(str(path))) == 1
  assert [f for f in os.listdir(tmp_path) if '.tmp-' in f] == []


def test_only_storage_failures_become_a_save_error(tmp_path):
  checkpoints = ckpt_lib.Checkpoints(str(tmp_path))
  assert checkpoints._failed(TypeError('unsupported leaf')) is None  # raised as it is
  read_only = checkpoints._failed(OSError(errno.EROFS, 'Read-only file system'))
  assert 'Read-only file system.' in str(read_only)
  checkpoints.close()


def test_nothing_to_say_about_frames_when_none_were_read():
  assert evaluation.format_frame_counts({'train_frames_read': 0, 'train_bad_frames': 0,
                                         'eval_frames': 0, 'skipped_frames': 0}) == ''


# Data: annotation files cut short, corrupt crops (helpers of test_index / test_pipeline).

def test_crops_after_the_last_annotated_frame_are_counted(tmp_path):
  root = str(tmp_path / 'data')
  per_task(root, 'expr', 'a', [0, 3])
  images(root, 'a', range(1, 6))
  s = build_index(root, 'train', tasks=('expr',), use_cache=False).summary
  assert s['annotation_gaps']['crops_beyond'] == 3
  assert 'a: 3 crops after line 2' in s['annotation_gaps']['examples'][0]


@pytest.mark.parametrize('content, message', [
    (b'', r'the file is empty \(0 bytes\)'),
    (b'\n\n', r'the file is empty'),
    (b'Valence,Arousal\n', r'line 2: no annotation line after the header'),
    (b'Valence,Arousal\n0.5,0.5\n-5,0.3\n', r'line 3: valence and arousal must both be'),
])
def test_empty_half_filled_and_half_labelled_files_are_errors(tmp_path, content, message):
  from affectjax.data import annotations
  root = str(tmp_path / 'data')
  per_task(root, 'expr', 'a', [0, 3])
  path = os.path.join(root, 'Annotations', 'VA_Set', 'Train_Set', 'a.txt')
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(content)
  images(root, 'a', [1, 2])
  with pytest.raises(annotations.AnnotationError, match=message) as error:
    build_index(root, 'train', tasks=('expr', 'va'), use_cache=False)
  assert path in str(error.value)


def test_bad_frame_tolerance_floor_and_counts_resume():
  counter = sources.BadFrameCounter(0.001)
  counter.add(20, [f'f{i}' for i in range(sources.BAD_FRAME_FLOOR)])  # the floor: tolerated
  with pytest.raises(sources.DataError, match=r'11 of 21 frames.*latest: f10'):
    counter.add(1, ['f10'])
  assert sources.allowed_bad_frames(100_000, 0.001) == 100
  with pytest.raises(sources.DataError, match=r'max_bad_frame_fraction=0.0\); latest: x'):
    sources.BadFrameCounter(0.0).add(1, ['x'])  # 0 tolerates none


def test_bad_frame_counts_are_part_of_the_resumable_state(dataset_root, train_index, tmp_path):
  index = _copy_with_corrupt_frames(dataset_root, tmp_path, list(range(0, len(train_index), 5)),
                                    train_index)
  config = _config()
  config.max_bad_frame_fraction = 0.5
  whole = pipeline.make_train_iterator(index, config, global_batch_size=BATCH, seed=0)
  _take(whole, 6)
  first = pipeline.make_train_iterator(index, config, global_batch_size=BATCH, seed=0)
  _take(first, 3)
  resumed = pipeline.make_train_iterator(index, config, global_batch_size=BATCH, seed=0)
  resumed.set_state(first.get_state())
  _take(resumed, 3)
  assert whole.bad_frames['bad'] >= 2
  assert (resumed.bad_frames['read'], resumed.bad_frames['bad']) == (
      whole.bad_frames['read'], whole.bad_frames['bad'])
  # Several processes: the checkpoint holds every process's counts, each takes its own.
  second = pipeline.make_train_iterator(index, config, global_batch_size=BATCH, seed=0,
                                        process_index=1, process_count=2)
  second.set_state(dict(first.get_state(), frames_read=[40, 41], bad_frames=[3, 4]))
  assert (second.bad_frames['read'], second.bad_frames['bad']) == (41, 4)
  # Resumed on another number of processes: the run's total, all of it on process 0.
  for process, count, expected in ((0, 4, (81, 7)), (3, 4, (0, 0)), (0, 1, (81, 7))):
    other = pipeline.make_train_iterator(index, config, global_batch_size=BATCH, seed=0,
                                         process_index=process, process_count=count)
    other.set_state(dict(first.get_state(), frames_read=[40, 41], bad_frames=[3, 4]))
    assert (other.bad_frames['read'], other.bad_frames['bad']) == expected
  one = pipeline.make_train_iterator(index, config, global_batch_size=BATCH, seed=0,
                                     process_index=1, process_count=2)
  one.set_state(dict(first.get_state(), frames_read=112, bad_frames=5))  # saved by 1 process
  assert (one.bad_frames['read'], one.bad_frames['bad']) == (0, 0)
