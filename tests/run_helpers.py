"""What the run tests share: the test-scale multi-task config and comparisons of states. The
trained run itself (`config`, `uninterrupted`) is a session fixture of conftest.py, so that
tests/test_trainer.py and tests/test_inference_modes.py train it once."""
import os

import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name='mtl3', variant='test'):
  from affectjax import config as config_lib  # pylint: disable=import-outside-toplevel
  return config_lib.load_config_file(os.path.join(REPO, 'configs', f'{name}.py:{variant}'))


def run_config(cache_dir: str):
  """The trained run's config: mtl3:test on 2 devices, with the plateau rule on the validation
  score (method 3's), whose state lives in the optimiser state so the resume tests cover it."""
  c = load_config()
  c.data.cache_dir = cache_dir
  c.num_devices = 2  # data-parallel, and cheaper to compile than 8 devices
  c.eval_batch_size = 32
  c.optim.plateau.enabled, c.optim.plateau.monitor = True, 'val_score'
  c.optim.plateau.patience = 0
  return c


def params_of(summary_or_state):
  state = summary_or_state['state'] if isinstance(summary_or_state, dict) else summary_or_state
  return jax.device_get(state.params)


def assert_same_params(a, b):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))
