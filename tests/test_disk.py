"""Runs that fail safely on disk: a full disk, leftovers of killed processes, concurrent cache
builds, interrupted writes (affectjax/files.py and its users). No real full disk is needed: the
reservation or the writer is patched to raise ENOSPC."""
import errno
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from affectjax import files
from affectjax import predictions
from affectjax.data import pack
from affectjax.data import sequences
from disk_worker import SIZE, Source, build, jpeg, tiny_index  # tests/ is on sys.path

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'disk_worker.py')


def _temporaries(folder):
  return [name for name in os.listdir(folder) if '.tmp-' in name or '.old-' in name]


def _leftovers(folder):  # everything but the lock files
  return [name for name in os.listdir(folder) if not name.endswith('.lock')]


def _raise_enospc(*args):
  raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_is_one_clear_error_before_any_pixel_and_leaves_nothing(tmp_path,
                                                                             monkeypatch):
  monkeypatch.setattr(os, 'posix_fallocate', _raise_enospc)
  with pytest.raises(files.DiskFullError) as caught:
    build(tmp_path, Source(fail=AssertionError('a pixel was decoded')))
  message = str(caught.value)
  assert caught.value.errno == errno.ENOSPC and isinstance(caught.value, OSError)
  assert '\n' not in message and str(pickle.loads(pickle.dumps(caught.value))) == message
  assert message.startswith('not enough disk space for the decoded cache of the train split: '
                            f'it needs 9.2 KB in {tmp_path}, which has ')
  assert message.endswith(' free; set data.decoded_cache_dir to a larger disk, or '
                          'data.decoded_cache=False')
  assert _leftovers(tmp_path) == []
  monkeypatch.undo()  # the disk has room again: the next build succeeds
  cache = build(tmp_path)
  assert cache.ok.all() and cache.images.shape == (12, SIZE, SIZE, 3)
  assert _temporaries(tmp_path) == []


def test_too_little_free_space_counts_the_leftovers_of_other_hosts(tmp_path, monkeypatch, capsys):
  other = tmp_path / f'validation-16px-0123.tmp-{socket.gethostname()}x-77'
  other.mkdir()
  (other / 'images.npy').write_bytes(b'\1' * 5000)
  monkeypatch.setattr(shutil, 'disk_usage', lambda path: shutil._ntuple_diskusage(10**6, 0, 3000))
  with pytest.raises(files.DiskFullError, match=(
      r'it needs 9\.2 KB in .*, which has 3\.0 KB free; [0-9.]+ KB of that disk are held by '
      r'unfinished writes there \(validation-16px-0123\.tmp-.*x-77: [0-9.]+ KB, pid 77 of '
      r'host .*x, which this host cannot check\): wait for those still running, remove those '
      r'whose process is gone; set data\.decoded_cache_dir')):
    build(tmp_path)
  assert f'Found {other} (' in capsys.readouterr().out and other.exists()


def test_the_next_build_removes_the_leftovers_of_dead_processes_of_this_host(tmp_path, capsys):
  dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                        capture_output=True, text=True, check=True)
  pid = int(dead.stdout)
  leftover = tmp_path / f'train-16px-abcd.tmp-{socket.gethostname()}-{pid}'
  leftover.mkdir()
  (leftover / 'images.npy').write_bytes(b'\1' * 20000)
  alive = tmp_path / f'train-16px-abcd.tmp-{socket.gethostname()}-{os.getppid()}'
  alive.mkdir()  # of a running process (pytest's parent): kept
  build(tmp_path)
  out = capsys.readouterr().out
  assert f'Removed {leftover} (20.5 KB), left by process {pid} of this host, which is no ' \
         'longer running' in out
  # (f'{alive} (': the parent's pid may be 1, a prefix of the dead pid in the message)
  assert not leftover.exists() and alive.exists() and f'{alive} (' not in out


@pytest.mark.parametrize('failure', [KeyboardInterrupt(), ValueError('a broken record')])
def test_an_interrupted_build_leaves_no_folder(tmp_path, failure):
  with pytest.raises(type(failure)):
    build(tmp_path, Source(fail=failure))
  assert _leftovers(tmp_path) == []


def test_a_filesystem_without_fallocate_falls_back_to_the_free_space_check(tmp_path,
                                                                           monkeypatch):
  def unsupported(*args):
    raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

  monkeypatch.setattr(os, 'posix_fallocate', unsupported)
  assert build(tmp_path).ok.all()


def test_two_processes_building_one_cache_decode_it_once(tmp_path):
  barrier = tmp_path / 'barrier'
  barrier.mkdir()
  folder = tmp_path / 'cache'
  env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  procs = [subprocess.Popen([sys.executable, WORKER, str(folder), str(barrier), str(i)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
           for i in range(2)]
  outs = [p.communicate(timeout=60)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs
  joined = ''.join(outs)
  assert joined.count('Decoding the train split') == 1 and joined.count('inode') == 2, outs
  builder = 0 if 'Decoding' in outs[0] else 1
  waiter = outs[1 - builder]
  assert f'Waiting for host {socket.gethostname()} pid {procs[builder].pid} to finish ' \
         'building the decoded cache of the train split' in waiter, outs
  assert 'Opened the decoded cache of the train split built meanwhile' in waiter
  assert len({line for line in joined.splitlines() if line.startswith('inode')}) == 1
  assert _temporaries(folder) == []


def test_an_interrupted_atomic_write_keeps_the_previous_file(tmp_path):
  path = tmp_path / 'eval_validation_step10.json'
  path.write_text('{"score": 1}')
  with pytest.raises(KeyboardInterrupt):
    with files.atomic_write(str(path)) as f:
      f.write('{"score": 2, "trunc')
      raise KeyboardInterrupt
  assert path.read_text() == '{"score": 1}' and os.listdir(tmp_path) == [path.name]
  with files.atomic_write(str(path)) as f:
    json.dump({'score': 2}, f)
  assert json.loads(path.read_text()) == {'score': 2} and os.listdir(tmp_path) == [path.name]


def test_a_failed_feature_write_keeps_the_previous_features(tmp_path, monkeypatch):
  index = tiny_index(tmp_path)
  features = np.ones((len(index), 4), np.float32)
  ok = np.ones(len(index), bool)
  sequences.write_feature_set(str(tmp_path), 'train', index, features, ok, {'step': 1})
  saves, save = [], np.save

  def full_on_second_save(path, array, **kwargs):
    saves.append(path)
    if len(saves) == 2:
      _raise_enospc()
    save(path, array, **kwargs)

  monkeypatch.setattr(np, 'save', full_on_second_save)
  with pytest.raises(OSError, match='No space left'):
    sequences.write_feature_set(str(tmp_path), 'train', index, 2 * features, ok, {'step': 2})
  monkeypatch.undo()
  assert sorted(os.listdir(tmp_path)) == ['train']
  kept = sequences.FeatureSet(str(tmp_path), 'train')
  assert kept.meta['step'] == 1 and np.all(kept.features == 1)
  sequences.write_feature_set(str(tmp_path), 'train', index, 2 * features, ok, {'step': 2})
  replaced = sequences.FeatureSet(str(tmp_path), 'train')
  assert replaced.meta['step'] == 2 and np.all(replaced.features == 2)
  assert sorted(os.listdir(tmp_path)) == ['train']


def test_per_video_submission_folders_are_replaced_whole(tmp_path):
  index = tiny_index(tmp_path)
  decided = {'expr': np.arange(len(index)) % 7, 'au': np.zeros((len(index), 12), np.int64),
             'va': np.zeros((len(index), 2))}
  predicted = np.ones(len(index), bool)
  stale = tmp_path / 'out' / 'EXPR' / 'old_video.txt'
  stale.parent.mkdir(parents=True)
  stale.write_text('a file of an earlier submission\n')
  written = predictions.write_submission('per_video', str(tmp_path / 'out'), index, decided,
                                         predicted, ('expr',), 7)
  assert sorted(os.listdir(tmp_path / 'out' / 'EXPR')) == ['video0.txt', 'video1.txt']
  assert len(written) == 2 and sorted(os.listdir(tmp_path / 'out')) == ['EXPR']
  assert open(written[1]).read().splitlines()[1:] == [str(i % 7) for i in range(6, 12)]


class _FullWriter:
  """An ArrayRecordWriter whose disk fills after `room` records of all shards (raised as the
  real one does)."""
  room = written = 0

  def __init__(self, path, options):
    del options
    self.path = path
    open(path, 'wb').close()

  def write(self, data):
    _FullWriter.written += 1
    if _FullWriter.written > self.room:
      raise RuntimeError(f'write() failed: No space left on device; writing {self.path}')
    with open(self.path, 'ab') as f:
      f.write(data)

  def close(self):
    pass


def test_a_failed_pack_leaves_no_shard_and_no_temporary(tmp_path, monkeypatch):
  from array_record.python import array_record_module
  index = tiny_index(tmp_path / 'data')
  for row in range(len(index)):
    os.makedirs(os.path.dirname(index.image_path(row)), exist_ok=True)
    with open(index.image_path(row), 'wb') as f:
      f.write(jpeg())
  out = tmp_path / 'packed'
  monkeypatch.setattr(array_record_module, 'ArrayRecordWriter', _FullWriter)
  _FullWriter.room, _FullWriter.written = 100, 0  # the first pack completes
  pack.pack_split(index, str(out), num_shards=3, progress=False)
  assert len(os.listdir(out)) == 5  # 3 shards, index, manifest
  _FullWriter.room, _FullWriter.written = 5, 0  # the second shard of the next pack fills it
  with pytest.raises(files.DiskFullError, match=(
      r'^not enough disk space for the packed train split: .*packed has [0-9.]+ [KMGT]?B free; '
      r'pack to a larger disk \(--out\), or free space there$')):
    pack.pack_split(index, str(out), num_shards=3, progress=False)
  assert os.listdir(out) == ['train_index.npz']  # no shard, no temporary, no manifest



def test_a_dead_writers_copy_is_removed_by_the_next_write(tmp_path, capsys):
  dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                        capture_output=True, text=True, check=True)
  target = tmp_path / 'predictions.csv'
  leftover = tmp_path / f'predictions.csv.tmp-{socket.gethostname()}-{int(dead.stdout)}'
  leftover.write_text('half a file')
  other = tmp_path / 'other.csv.tmp-elsewhere-1'  # another target, another host: kept
  other.write_text('x')
  with files.atomic_write(str(target)) as f:
    f.write('whole\n')
  assert target.read_text() == 'whole\n'
  assert not leftover.exists() and other.exists()
  assert f'Removed {leftover}' in capsys.readouterr().out


def test_numpys_short_write_in_an_atomic_write_is_one_disk_full_line(tmp_path):
  target = tmp_path / 'features.npy'
  with pytest.raises(files.DiskFullError, match=rf'not enough disk space for features.npy: '
                     rf'{tmp_path} has [\d.]+ [KMGT]?B free; write it to a larger disk'):
    with files.atomic_write(str(target), 'wb') as f:
      f.write(b'partial')
      raise OSError('5120000 requested and 389056 written')  # what np.save raises
  assert os.listdir(tmp_path) == []
