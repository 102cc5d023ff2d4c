"""One process of a multi-process CPU run (used by test_multiprocess.py; not a test itself).

argv: process_id num_processes port devices_per_process workdir cache_dir
"""
import json
import os
import sys


def main():
  pid, n, port, per_process = (int(a) for a in sys.argv[1:5])
  workdir, cache_dir = sys.argv[5], sys.argv[6]
  os.environ['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={per_process}'
  import jax
  import numpy as np
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if n > 1:
    jax.distributed.initialize(f'localhost:{port}', num_processes=n, process_id=pid)
  from affectjax import trainer
  import run_helpers
  # The session's trained run (conftest.py: run_helpers.run_config, 2 devices) in 2 processes.
  c = run_helpers.run_config(cache_dir)
  summary = trainer.train_and_evaluate(c, workdir)
  params = jax.tree_util.tree_leaves_with_path(summary['state'].params)
  if pid == 0:
    np.savez(os.path.join(workdir, 'params.npz'),
             **{jax.tree_util.keystr(p): np.asarray(x.addressable_data(0)) for p, x in params})
    metrics = {k: v for k, v in summary['final_metrics'].items() if isinstance(v, (int, float))}
    with open(os.path.join(workdir, 'result.json'), 'w') as f:
      json.dump({'steps': summary['steps'], 'metrics': metrics}, f)


if __name__ == '__main__':
  main()
