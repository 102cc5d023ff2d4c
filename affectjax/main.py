"""affectjax command line: `python -m affectjax.main --config=configs/mtl.py --workdir=DIR`.

Modes (`--config.mode`): `train` (default; evaluates periodically, resumes from WORKDIR's
checkpoints), `eval` (restores a checkpoint of WORKDIR and evaluates `config.eval_split`) and
`predict` (restores a checkpoint and writes ABAW submission files for the unlabelled test list
`config.predict.videos` or `config.predict.images`) and `features` (writes a checkpoint's
per-frame features for the temporal models of configs/temporal.py) and `ensemble` (averages
the predictions of finished runs, `config.ensemble.members`, and evaluates and predicts with the
average) and `oof` (out-of-fold features: `config.data.folds` image runs, each predicting the
training videos it left out, and a full run for the evaluation frames).
Any config field can be overridden: `--config.optim.learning_rate=3e-4`.
A config no run can use (also `init_from` naming nothing usable) ends the run before anything
is loaded, with `error: ...` on stderr and exit status 2 (as does a config file that cannot be
loaded); errors whose message says what to do (a locked workdir, a full disk, bad data or
annotations, a checkpoint that cannot be saved) end it with the message and status 1, without
a traceback unless --verbosity is given (docs/reliability.md).
"""
import errno
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Training config file (path[:variant]).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and TensorBoard logs.')
flags.mark_flags_as_required(['config', 'workdir'])

# Cluster launchers that jax.distributed.initialize() detects by itself.
_CLUSTER_ENV = ('SLURM_JOB_ID', 'OMPI_COMM_WORLD_SIZE', 'JAX_COORDINATOR_ADDRESS')


def _maybe_initialize_distributed(config) -> None:
  d = config.distributed
  multi_task_slurm = int(os.environ.get('SLURM_NTASKS', '1')) > 1
  wanted = d.initialize == 'yes' or (d.initialize == 'auto' and (
      d.coordinator_address or multi_task_slurm or
      any(k in os.environ for k in _CLUSTER_ENV[1:])))
  if not wanted:
    return
  import jax
  kwargs = {}
  if d.coordinator_address:
    kwargs = dict(coordinator_address=d.coordinator_address, num_processes=d.num_processes,
                  process_id=d.process_id)
  jax.distributed.initialize(**kwargs)
  logging.info('jax.distributed: process %d of %d', jax.process_index(), jax.process_count())


def _fail(message, status: int):
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(status)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  if not FLAGS['verbosity'].present:
    # Orbax and grain log every save and worker event at INFO; progress has its own output.
    logging.set_verbosity(logging.WARNING)
  # After flags are parsed (grain workers read absl flags).
  from affectjax import checkpoint, config as config_lib
  config = FLAGS.config
  verbose = FLAGS['verbosity'].present
  if not verbose:
    checkpoint.quiet_orbax_errors()
  try:
    config_lib.check_config(config)
    _maybe_initialize_distributed(config)
    from affectjax import ensemble, inference, oof, trainer
    modes = {'train': trainer.train_and_evaluate, 'eval': inference.evaluate_checkpoint,
             'predict': inference.predict_checkpoint, 'features': inference.extract_features,
             'ensemble': ensemble.run_ensemble, 'oof': oof.run_oof}
    modes[config.mode](config, FLAGS.workdir)
  except config_lib.ConfigError as e:
    _fail(e, 2)
  except Exception as e:  # pylint: disable=broad-except
    if verbose or not _is_user_error(e):
      raise
    if isinstance(e, OSError) and e.strerror:  # not "[Errno 28] ..."
      e = f'{e.strerror}: {e.filename}' if e.filename else e.strerror
    _fail(e, 1)


def _is_user_error(error: Exception) -> bool:
  """Errors whose message says all (what, where, what to do): shown in one line without a
  traceback (docs/reliability.md); with --verbosity the traceback is shown too."""
  from affectjax import checkpoint, workdir
  from affectjax.data import annotations, layout, sources, unlabelled
  if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
    return True
  return isinstance(error, (workdir.WorkdirLocked, checkpoint.CheckpointSaveError,
                            checkpoint.CheckpointError, sources.DataError,
                            annotations.AnnotationError, layout.DatasetLayoutError,
                            unlabelled.FrameListError, FloatingPointError))


def _parse_flags(argv):
  """absl flag parsing; a config file that is missing, a variant it does not know, an unknown
  --config.field (the valid ones listed) or another flag error is one line `error: ...` and
  exit status 2."""
  try:
    rest = FLAGS(argv)
    if FLAGS.config is not None:
      FLAGS.config.get('mode')  # a config file that failed to load raises on first use
    return rest
  except Exception as e:  # pylint: disable=broad-except  (re-raised unless diagnosed)
    from affectjax import config as config_lib
    problem = config_lib.config_flag_problem(argv)
    if problem is None and isinstance(e, flags.Error):
      problem = '; '.join(str(e).splitlines()) + ' (--helpfull lists the flags)'
    if problem is None:
      raise
  _fail(problem, 2)


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
