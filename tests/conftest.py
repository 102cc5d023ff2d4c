"""Test setup: eight simulated CPU devices, so data-parallel code is tested on one machine, and
a JAX compilation cache for this session (in a fresh temporary folder, removed at the end)."""
import os
import shutil
import tempfile

import pytest

# Must happen before JAX initialises its backends.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Many tests (and the command-line runs they start, which inherit the environment) compile the
# same test-scale programs; the persistent cache compiles each once per session. It starts
# empty, so nothing from an earlier session or another checkout is reused. Under pytest-xdist
# (`-n auto`) the main process sets it before it starts the workers, which inherit it: they
# share one cache, and only the main process removes it.
_CACHE = None
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix='affectjax-tests-jax-cache-')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _CACHE
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')


def pytest_sessionfinish(session, exitstatus):
  if _CACHE is not None:
    shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture(scope='session')
def config(tmp_path_factory):
  """The trained run's config (run_helpers.run_config); modules may define their own."""
  import run_helpers  # pylint: disable=import-outside-toplevel
  return run_helpers.run_config(str(tmp_path_factory.mktemp('data_cache')))


@pytest.fixture(scope='session')
def uninterrupted(config, tmp_path_factory):
  """(summary, workdir) of the test run trained once for the session, uninterrupted."""
  from affectjax import trainer  # pylint: disable=import-outside-toplevel
  workdir = tmp_path_factory.mktemp('uninterrupted')
  return trainer.train_and_evaluate(config, str(workdir)), workdir
