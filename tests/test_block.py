"""Method 2 end to end: batches of frame blocks (a frame and its previous frames, by frame
number), one augmentation draw per block, frozen backbone stages (`model.trainable`), and the
block model trained from a frame run (`configs/temporal_stat.py:model6,end_to_end`)."""
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from affectjax import checkpoint, inference, kinds, labels, train, trainer
from affectjax.data import index as index_lib
from affectjax.data import pipeline, sampling
from affectjax.data.synthetic import generate
from affectjax.models import preprocess, resnet
from run_helpers import load_config

LENGTH = 4


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  root = generate.ensure_synthetic(tmp_path_factory.mktemp('blocks') / 'synthetic',
                                   progress=False, num_videos=4, frames_per_video=12, seed=2)
  return root, index_lib.build_index(root, 'validation', num_expr_classes=7, use_cache=False)


def _config():
  config = pipeline.default_data_config()
  config.read_threads = 0
  return config


def _pixels(index, row):
  return np.asarray(Image.open(index.image_path(row)).convert('RGB'))


def _frames(index, frame_numbers_of_row):
  """Frame number -> row of the frame's video, for a reference block built by hand."""
  video = index.video_id[frame_numbers_of_row]
  rows = np.flatnonzero(index.video_id == video)
  return dict(zip(index.frame[rows].tolist(), rows.tolist()))


def test_a_block_holds_its_frame_and_the_previous_frames_by_frame_number(dataset, tmp_path):
  root, index = dataset
  # Remove one crop: its frame has no row, and the block repeats the frame before it.
  copy = tmp_path / 'gap'
  shutil.copytree(root, copy)
  os.remove(index.image_path(6))
  index = index_lib.build_index(copy, 'validation', num_expr_classes=7, use_cache=False)
  it = pipeline.make_eval_iterator(index, _config(), global_batch_size=8, block_length=LENGTH)
  seen = 0
  for batch in it:
    assert batch['image'].shape == (8, LENGTH, 112, 112, 3)
    for b in np.flatnonzero(batch['valid']):
      row = int(batch['index'][b])
      frames = _frames(index, row)
      frame = int(index.frame[row])
      # The reference: frames f-3..f by number; a missing one repeats the nearest earlier
      # present frame; frames before the video's first crop are left out (left-aligned).
      wanted = []
      for f in range(frame - LENGTH + 1, frame + 1):
        earlier = [g for g in frames if g <= f]
        if earlier:
          wanted.append(frames[max(earlier)])
      assert batch['mask'][b].tolist() == [True] * len(wanted) + [False] * (LENGTH - len(wanted))
      for j, r in enumerate(wanted):
        np.testing.assert_array_equal(batch['image'][b, j], _pixels(index, r))
      for j in range(len(wanted), LENGTH):  # padding repeats the block's first frame
        np.testing.assert_array_equal(batch['image'][b, j], batch['image'][b, 0])
      for task in labels.TASKS:
        np.testing.assert_array_equal(batch[task][b], getattr(index, task)[row])
      seen += 1
  assert seen == int(sampling.labelled_rows(index, labels.TASKS).size)
  assert (sampling.block_rows(index, LENGTH)[:, 0] >= 0).all()


def test_a_bad_earlier_frame_repeats_the_one_before_and_a_bad_own_frame_is_substituted(
    dataset, tmp_path):
  root, index = dataset
  copy = tmp_path / 'corrupt'
  shutil.copytree(root, copy)
  blocks = sampling.block_rows(index, LENGTH)
  target = int(np.flatnonzero((blocks >= 0).all(axis=1))[0])  # a full block
  bad = int(blocks[target, 1])
  with open(os.path.join(copy, os.path.relpath(index.image_path(bad), root)), 'wb') as f:
    f.write(b'\xff\xd8 not a JPEG')
  copied = index_lib.build_index(copy, 'validation', num_expr_classes=7, use_cache=False)
  config = _config()
  config.max_bad_frame_fraction = 0.5
  it = pipeline.make_eval_iterator(copied, config, global_batch_size=8, block_length=LENGTH)
  batches = list(it)
  rows = np.concatenate([b['index'][b['valid']] for b in batches])
  assert bad not in rows.tolist()  # its own block is a bad frame: left out of evaluation
  assert it.bad_frames['bad'] >= 2  # its own block and every block it sits in
  for batch in batches:
    for b in np.flatnonzero(batch['index'] == target):
      np.testing.assert_array_equal(batch['image'][b, 1], batch['image'][b, 0])
      np.testing.assert_array_equal(batch['image'][b, 2], _pixels(index, int(blocks[target, 2])))
  # Training substitutes a block whose own frame is bad: every row valid, the bad row absent.
  train_it = pipeline.make_train_iterator(copied, config, global_batch_size=8, seed=0,
                                          num_epochs=2, block_length=LENGTH)
  trained = list(train_it)
  assert all(b['valid'].all() and b['mask'][:, 0].all() for b in trained)
  assert bad not in np.concatenate([b['index'] for b in trained]).tolist()


def test_one_augmentation_draw_per_block():
  config = ml_collections.ConfigDict({
      'input_preprocessing': preprocess.UNIT,
      'device_augment': {'flip': True, 'rotate_deg': 20.0, 'scale': 0.1, 'translate': 0.1}})
  frame = np.random.default_rng(0).integers(0, 255, (4, 1, 16, 16, 3), np.uint8)
  batch = {'image': jnp.asarray(np.repeat(frame, 3, axis=1)), 'mask': jnp.ones((4, 3), bool)}
  out = train.block_inputs(batch, config, jax.random.key(0))['image']
  plain = train.block_inputs(batch, config, None)['image']
  assert out.shape == (4, 3, 16, 16, 3)
  assert float(jnp.abs(out - plain).max()) > 0.1  # augmented
  for j in (1, 2):  # the same draw for every frame of a block
    np.testing.assert_array_equal(out[:, j], out[:, 0])
  assert float(jnp.abs(out[0, 0] - out[1, 0]).max()) > 0  # different draws across blocks


def test_frozen_parts_name_the_parameters_before_the_first_trained_part():
  params = {'backbone': {'conv1': 1, 'bn1': 1, 'layer1_0': 1, 'layer3_1': 1, 'layer4_0': 1},
            'head': {'expr': 1}}
  frozen = resnet.frozen_parameters(params, resnet.frozen_parts('layer4'))
  assert frozen == {'backbone': {'conv1': True, 'bn1': True, 'layer1_0': True, 'layer3_1': True,
                                 'layer4_0': False}, 'head': {'expr': False}}
  assert resnet.frozen_parts('all') == 0 and resnet.frozen_parts('head') == 5
  with pytest.raises(ValueError, match='model.trainable'):
    resnet.frozen_parts('layer5')


def test_end_to_end_block_model_trains_the_last_stage_from_a_frame_run(uninterrupted, config,
                                                                       tmp_path):
  """configs/temporal_stat.py:model6,end_to_end from the session's trained image run: the
  frozen stages' parameters and BatchNorm statistics stay those of the frame run, bit for bit;
  layer4, the frame head's hidden layer and the block model train; mode=eval scores each
  labelled frame once."""
  _, frames_dir = uninterrupted
  c = load_config('temporal_stat', 'model6,end_to_end,test')
  assert c.kind == 'block' and c.model.trainable == 'layer4'
  c.init_from = str(frames_dir)
  c.data.cache_dir = config.data.cache_dir
  c.num_devices = 2
  workdir = tmp_path / 'e2e'
  summary = trainer.train_and_evaluate(c, str(workdir))
  assert summary['stop_reason'] == 'finished'
  start = checkpoint.read_variables(str(frames_dir))
  end = jax.device_get(summary['state'])
  for collection, trained in (('params', end.params), ('batch_stats', end.batch_stats)):
    before, after = start[collection]['backbone'], trained['backbone']
    for name in after:
      same = jax.tree_util.tree_all(jax.tree_util.tree_map(
          lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), before[name], after[name]))
      assert same == (not name.startswith('layer4')), (collection, name)
  hidden = start['params']['head']['hidden']['kernel']
  assert not np.array_equal(hidden, end.params['head']['hidden']['kernel'])
  assert 'temporal' in end.params and 'expr' in end.params['head']
  # mode=eval restores it: every labelled validation frame scored once, from its block.
  c.mode, c.eval_checkpoint = 'eval', 'latest'
  evaluated = inference.evaluate_checkpoint(c, str(workdir))
  index = kinds.load_index(c.copy_and_resolve_references(), 'validation')
  assert evaluated['count_expr'] == int((index.expr >= 0).sum())
  assert evaluated['count_va'] == int((index.va[:, 0] > -5).sum())
  assert evaluated['expr_f1'] == pytest.approx(summary['final_metrics']['expr_f1'])
