"""The base training config and the shared `demo` / `test` variants of `configs/*.py`.

Each file in `configs/` builds on `base_config()`, sets the fields of its published system and
finishes with `apply_variant(config, arg)`, so `--config=configs/mtl.py:demo` works for all.
`check_config` rejects, before anything is loaded, a config no run can use (`ConfigError`, one
line naming the field and what it allows); `config_flag_problem` says why `--config=file.py:variant`
and its `--config.a.b=v` overrides make no config."""
import os

import ml_collections

from affectjax import checkpoint, labels, losses, metrics, optim, predictions
from affectjax.data import layout, pipeline, sampling, sources
from affectjax.models import affect, preprocess, resnet, temporal

MODES = ('train', 'eval', 'predict', 'features', 'ensemble', 'oof')  # main.py's mode table
KINDS = ('image', 'block', 'temporal')  # kinds.KINDS


class ConfigError(ValueError):
  """A config (or config file) no run can use; the message is one line naming the field and the
  values it allows."""


def base_config() -> ml_collections.ConfigDict:
  """Every knob of a run, with defaults; configs/*.py change a few of them."""
  c = ml_collections.ConfigDict()
  c.mode = 'train'  # 'train' | 'eval' | 'predict' | 'features' | 'ensemble' | 'oof'
  c.tasks = 'expr,au,va'  # comma-separated subset of expr, au, va
  c.num_expr_classes = 7  # 7 (ABAW1/2) or 8 (ABAW3+, with Other)
  c.edition = 'abaw2'  # metric definitions for the validation score: 'abaw2' | 'abaw3'
  c.seed = 0
  c.global_batch_size = 256
  c.eval_batch_size = 256
  c.num_epochs = 10.0
  c.dtype = 'auto'  # compute dtype: 'auto' = bfloat16 on GPU/TPU, float32 on CPU
  c.num_devices = 0  # 0 = all devices; n restricts a single-process run to n devices
  c.init_from = ''  # converted weights (python -m affectjax.convert) or another run
  # The weights the config's paper starts from ('' = none): a run started without init_from
  # says loudly that it trains from scratch instead (trainer.init_warning).
  c.paper_init = ''
  # Input normalisation: 'auto' follows the init_from weights, else 'unit' (scratch).
  c.preprocessing = 'auto'  # 'auto' | 'unit' | 'imagenet' | 'vggface2'

  c.kind = 'image'  # 'image' (crops) | 'block' (blocks of crops, end to end) | 'temporal'
  # Temporal models over per-frame features extracted from an image run (mode=features).
  c.temporal = temporal.default_temporal_config()
  c.temporal.features_dir = ''  # the image run's WORKDIR/features; several (a,b): concatenated
  # 'segment': `length` consecutive frames, a prediction per frame (method 4); 'block': a frame
  # and its `length - 1` previous frames, a prediction for that frame (method 2)
  c.temporal.window = 'segment'
  c.temporal.length = 250
  c.features_out = ''  # mode=features: output folder ('' = WORKDIR/features)

  c.data = pipeline.default_data_config()
  # One setting each: the data pipeline follows the top-level fields.
  c.data.tasks = c.get_ref('tasks')
  c.data.num_expr_classes = c.get_ref('num_expr_classes')
  c.data.synthetic = ml_collections.ConfigDict({  # preset 'hard': data/synthetic/hard.py
      'num_videos': 40, 'frames_per_video': 150, 'seed': 0, 'preset': 'default'})
  c.model = affect.default_model_config()
  c.model.sync_bn = False  # synchronise BatchNorm statistics across devices
  c.loss = losses.default_loss_config()
  c.optim = optim.default_optim_config()
  c.device_augment = ml_collections.ConfigDict({
      'flip': False, 'rotate_deg': 0.0, 'scale': 0.0, 'translate': 0.0})

  # Batches put on the devices ahead of the step (their transfers overlap its compute).
  c.prefetch_to_device = 2
  c.prefetch_thread = True  # read and put on a thread of their own, one more (BUILD.md)
  c.log_every_steps = 50
  c.eval_every_epochs = 1.0  # also evaluates at the end
  c.eval_split = 'validation'
  c.checkpoint_every_steps = 1000
  # Also every this many epochs (0 = only every checkpoint_every_steps). Runs also save
  # after each evaluation, at the end, on SIGTERM and at halt_after_steps.
  c.checkpoint_every_epochs = 1.0
  c.keep_checkpoints = 2
  c.keep_best_checkpoints = 1
  c.halt_after_steps = 0  # stop early as if interrupted (tests, debugging); 0 = never
  c.progress_bar = True
  c.eval_checkpoint = 'best'  # mode=eval: 'best' | 'latest' | a step number
  c.write_predictions = True  # mode=eval: per-frame prediction CSV next to the metrics
  # mode=eval: folder for the metrics JSON and the predictions CSV ('' = WORKDIR; set it to
  # evaluate a run whose folder is read-only)
  c.eval_out = ''
  # mode=predict: a checkpoint's predictions for an unlabelled test list (affectjax.predictions)
  c.predict = ml_collections.ConfigDict({
      'videos': '',  # file: one test video per line (every crop of each is predicted)
      'images': '',  # or file: one <video>/<frame>.jpg per line (the ABAW3/4 MTL test list)
      'root': '',  # Aff-Wild2 root holding the test crops ('' = data.root / the synthetic set)
      # 'auto' (images -> mtl, videos -> per_video) | 'mtl' (ABAW3/4) | 'per_task' (ABAW5+) |
      # 'per_video' (ABAW1/2: one txt per video and task, a line for every frame)
      'format': 'auto',
      # per_video / per_task of a video list: file of <video>,<frames> lines (default: last crop)
      'frame_counts': '',
      'out': '',  # output file / folder ('' = WORKDIR/predictions_<list name>_step<N>)
      # AU decision thresholds: '' = 0.5; or the eval JSON of mode=eval (per-AU thresholds
      # tuned on the validation split) or a file of 12 comma-separated numbers
      'au_thresholds': '',
      # VA: centred moving average over this many frames of each video (1 = none); mode=eval
      # reports the window that does best on the validation split (method 4's post-processing)
      'va_window': 1,
  })

  # mode=ensemble: 'DIR[@CHECKPOINT],...' finished runs whose predictions are averaged
  # (affectjax.ensemble); evaluated on eval_split, and a test list predicted with `predict`.
  c.ensemble = ml_collections.ConfigDict({'members': ''})

  c.distributed = ml_collections.ConfigDict({
      'initialize': 'auto',  # 'auto' (cluster detected) | 'yes' | 'no'
      'coordinator_address': '', 'num_processes': 0, 'process_id': -1})
  return c


def apply_variant(config: ml_collections.ConfigDict, arg: str | None
                  ) -> ml_collections.ConfigDict:
  """The `demo` (minutes on a 2-core CPU) and `test` (seconds) variants of any config."""
  if not arg:
    return config
  c = config
  if arg not in ('demo', 'test'):
    raise ConfigError(f'unknown variant {arg!r}: expected demo or test (or no variant)')
  c.data.root = ''  # the built-in synthetic Aff-Wild2
  c.init_from = ''
  c.preprocessing = 'unit'
  c.data.image_size = 64 if arg == 'demo' else 32
  c.model.arch = 'resnet18'
  c.model.width = 16 if arg == 'demo' else 4
  c.model.head_hidden = 128 if arg == 'demo' else 16
  c.optim.warmup_epochs = 0.5 if arg == 'demo' else 0.0
  if arg == 'demo':
    # Many short videos (many identities) and light augmentation: the demo model must
    # generalise to unseen synthetic faces, not memorise a few. With 240 videos the final
    # EXPR F1 depended on the seed (0.56 to 0.82 over seeds 0-2); 480 videos: 0.87-0.89.
    c.data.synthetic.num_videos = 480
    c.data.synthetic.frames_per_video = 25
    c.device_augment.flip = True
    c.device_augment.rotate_deg = 10.0
    c.device_augment.scale = 0.1
    c.device_augment.translate = 0.08
    c.model.dropout = 0.2
    # The demo's frames take 0.14 GB decoded: decode them once (batches are the same).
    c.data.decoded_cache = True
    c.global_batch_size = c.eval_batch_size = 64
    c.num_epochs = 10.0
    c.log_every_steps = 20
    c.checkpoint_every_steps = 200
  else:
    c.data.synthetic.num_videos = 6
    c.data.synthetic.frames_per_video = 24
    c.global_batch_size = c.eval_batch_size = 16
    c.num_epochs = 2.0
    c.log_every_steps = 2
    c.checkpoint_every_steps = 4
    c.progress_bar = False
  return c


def temporal_statistical_loss(c: ml_collections.ConfigDict) -> None:
  """The temporal statistical model's (ABAW 2020) loss and optimiser, for its frame model
  (configs/mtl_va.py) and its temporal model (configs/temporal_stat.py): 1.0 CE(EXPR) +
  0.4 (1 - CCC arousal) + 0.4 (1 - CCC valence) + 0.2 MSE(VA 5-vector); Adam, lr 1e-4."""
  c.loss.expr = 'ce'
  c.loss.va = 'ccc'
  c.loss.weights.expr = 1.0
  c.loss.weights.va = 0.4
  c.loss.weights.va5 = 0.2
  c.optim.optimizer = 'adam'
  c.optim.learning_rate = 1e-4


def parse_variant(arg, choices: tuple, default: str, where: str) -> tuple:
  """(choice, 'demo' | 'test' | '') from a `file.py:<choice>[,demo|,test]` argument."""
  words = [w for w in (arg or '').split(',') if w]
  unknown = [w for w in words if w not in choices and w not in ('demo', 'test')]
  if unknown:
    raise ConfigError(f'{where}: unknown variant {unknown[0]!r}: expected one of '
                      f'{", ".join(choices)}, optionally with demo or test (e.g. '
                      f'{where}:{choices[0]},demo)')
  choice = next((w for w in words if w in choices), default)
  return choice, next((w for w in words if w in ('demo', 'test')), '')


def load_config_file(spec: str, function: str = 'get_config'):
  """Loads `path.py[:variant]` as `--config` does (or its `function`, e.g. a table's)."""
  import importlib.util
  path, _, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('affectjax_config_file', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return getattr(module, function)(arg) if arg else getattr(module, function)()


def _config_spec(argv: list) -> str | None:
  """The value of `--config=spec` or `--config spec` in `argv`."""
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      return arg.split('=', 1)[1]
    if arg == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def config_flag_problem(argv: list) -> str | None:
  """Why `--config=path.py[:variant]` and the `--config.a.b=v` overrides of `argv` make no config:
  no such file, a variant the file does not know, or an override naming no field (the valid ones
  listed). None when they make one; an error of the file's own code propagates."""
  spec = _config_spec(argv)
  if spec is None:
    return None
  path = spec.partition(':')[0]
  if not os.path.isfile(path):
    folder = os.path.dirname(path) or '.'
    files = sorted(f for f in os.listdir(folder) if f.endswith('.py')) if os.path.isdir(
        folder) else []
    listed = f' (config files in {folder}: {", ".join(files)})' if files else ''
    return f'--config={spec}: no such config file {path}{listed}'
  try:
    config = load_config_file(spec)
  except ConfigError as e:
    return str(e) if str(e).startswith(path) else f'{path}: {e}'
  for arg in argv:
    if not arg.startswith('--config.'):
      continue
    node, walked = config, []
    for part in arg[len('--config.'):].split('=', 1)[0].split('.'):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        where = 'config' + ''.join(f'.{w}' for w in walked)
        valid = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        return (f'{arg.split("=", 1)[0]}: {where} has no field {part!r}. Valid fields of '
                f'{where}: {", ".join(valid)}')
      node = node[part]
      walked.append(part)
  return None


def _value(config, field: str):
  for part in field.split('.'):
    config = config[part]
  return config


def _one_of(config, field: str, allowed) -> None:
  value = _value(config, field)
  if value not in allowed:
    raise ConfigError(f'config.{field}={value!r}: must be one of '
                      f'{", ".join(str(a) for a in allowed)}')


def _at_least(config, field: str, low, *, strict: bool = False, whole: bool = False,
              why: str = '') -> None:
  """`field` >= low (> low when strict), a number (a whole number when `whole`)."""
  value = _value(config, field)
  if isinstance(value, bool) or not isinstance(value, (int,) if whole else (int, float)):
    raise ConfigError(f'config.{field}={value!r}: must be a {"whole " if whole else ""}number')
  if not (value > low if strict else value >= low):
    raise ConfigError(f'config.{field}={value!r}: must be {">" if strict else ">="} {low}{why}')


def _existing(config, field: str, folder: bool, why: str = '') -> None:
  """A set path must name an existing folder (or file)."""
  path = _value(config, field)
  if path and not (os.path.isdir(path) if folder else os.path.isfile(path)):
    what = 'folder' if folder else 'file'
    problem = 'a file, not a folder' if folder and os.path.exists(path) else (
        'a folder, not a file' if os.path.isdir(path) else f'no such {what}')
    raise ConfigError(f'config.{field}={path}: {problem}{why}')


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises `ConfigError` for the first field no run can use. Cheap checks only (values,
  ranges, the paths the config names); no data is read."""
  for field, allowed in (
      ('mode', MODES), ('kind', KINDS), ('num_expr_classes', (7, 8)),
      ('edition', metrics.EDITIONS), ('dtype', ('auto', 'float32', 'bfloat16')),
      ('preprocessing', ('auto', *preprocess.PRESETS)), ('optim.optimizer', optim.OPTIMIZERS),
      ('optim.schedule', optim.SCHEDULES), ('optim.plateau.monitor', optim.PLATEAU_MONITORS),
      ('loss.au', ('bce', 'mse')), ('data.layout', layout.LAYOUTS),
      ('data.sampling', sampling.SAMPLING_SCHEMES), ('data.source', sources.SOURCES),
      ('temporal.encoder', (*temporal.ENCODERS, 'stat')), ('model.trainable', resnet.TRAINABLE),
      ('temporal.window', ('segment', 'block')), ('temporal.framework', temporal.FRAMEWORKS),
      ('temporal.va_heads', ('tanh', 'linear')), ('temporal.inputs', temporal.INPUTS),
      ('distributed.initialize', ('auto', 'yes', 'no')), ('data.oof_eval', ('full', 'folds')),
      ('model.kernel_layout', tuple(resnet.KERNEL_LAYOUTS))):
    _one_of(config, field, allowed)
  try:
    tasks = labels.parse_tasks(config.tasks)
  except ValueError as e:
    raise ConfigError(f'config.{e}') from None
  if config.kind == 'temporal' and config.temporal.encoder != 'stat':
    try:
      temporal.check_framework(config.temporal.framework,
                               temporal.parse_feedback(config.temporal.feedback), tasks)
    except ValueError as e:
      raise ConfigError(f'config.{e}') from None
  t = config.temporal
  if config.kind == 'block' and (t.encoder, t.window) != ('stat', 'block'):
    raise ConfigError(f'config.kind=block (method 2 end to end) needs temporal.encoder=stat and '
                      f'temporal.window=block, got {t.encoder} and {t.window}')
  if config.data.sampling == 'alternating' and not {'expr', 'au'} <= set(tasks):
    raise ConfigError(f'config.data.sampling=alternating: needs tasks expr and au, got '
                      f'config.tasks={config.tasks}')
  if config.data.sampling == 'balanced' and 'expr' not in tasks:
    raise ConfigError(f'config.data.sampling=balanced: needs the expr task, got '
                      f'config.tasks={config.tasks}')
  _check_numbers(config)
  _check_paths(config)


def _check_numbers(config: ml_collections.ConfigDict) -> None:
  for field in ('num_epochs', 'optim.learning_rate', 'eval_every_epochs', 'data.image_size'):
    _at_least(config, field, 0, strict=True, whole=field == 'data.image_size')
  for field in ('global_batch_size', 'eval_batch_size', 'log_every_steps',
                'checkpoint_every_steps', 'temporal.length'):
    _at_least(config, field, 1, whole=True)
  for field in ('optim.weight_decay', 'optim.warmup_epochs', 'optim.end_lr_factor',
                'optim.grad_clip_norm', 'optim.plateau.min_scale', 'checkpoint_every_epochs'):
    _at_least(config, field, 0)
  for field in ('keep_best_checkpoints', 'halt_after_steps', 'num_devices', 'data.read_threads'):
    _at_least(config, field, 0, whole=True)
  _at_least(config, 'data.worker_count', -1, whole=True, why=' (-1: auto)')
  _at_least(config, 'prefetch_to_device', 1, whole=True)
  if config.mode == 'train':
    _at_least(config, 'keep_checkpoints', 1, whole=True, why=(
        ' (training keeps the latest checkpoint to resume from; keep_best_checkpoints adds the '
        'best ones)'))
  if config.optim.plateau.enabled and not 0 < config.optim.plateau.factor <= 1:
    raise ConfigError(f'config.optim.plateau.factor={config.optim.plateau.factor!r}: must be in '
                      '(0, 1]')
  fraction = config.data.max_bad_frame_fraction
  if not (isinstance(fraction, (int, float)) and 0 <= fraction <= 1):
    raise ConfigError(f'config.data.max_bad_frame_fraction={fraction!r}: must be in [0, 1]')
  which = str(config.eval_checkpoint)
  if which not in ('best', 'latest') and not which.isdigit():
    raise ConfigError(f'config.eval_checkpoint={config.eval_checkpoint!r}: must be best, latest '
                      'or a step number')


def _check_paths(config: ml_collections.ConfigDict) -> None:
  _existing(config, 'data.root', folder=True, why=' (unset: the built-in synthetic Aff-Wild2)')
  if config.data.source in ('arrayrecord', 'tfds'):
    if not config.data.packed_dir:
      raise ConfigError(f'config.data.packed_dir is unset: data.source={config.data.source} '
                        'reads packed data from it (affectjax.data.pack --out, or the TFDS '
                        'data_dir)')
    _existing(config, 'data.packed_dir', folder=True)
  if config.init_from:
    try:
      checkpoint.locate_variables(config.init_from)
    except checkpoint.CheckpointError as e:
      raise ConfigError(f'config.{e}') from None
  if config.kind == 'temporal':
    if not config.temporal.features_dir:
      raise ConfigError("config.temporal.features_dir is unset: kind=temporal reads the "
                        "per-frame features of an image run's mode=features (WORKDIR/features)")
    for folder in config.temporal.features_dir.split(','):  # several: concatenated per frame
      if not os.path.isdir(folder.strip()):
        raise ConfigError(f'config.temporal.features_dir={folder.strip()}: no such folder')
  t = config.temporal
  if t.carry_state and (t.encoder not in ('gru', 'lstm') or t.window != 'segment'):
    raise ConfigError(f'config.temporal.carry_state: carries a GRU or LSTM state across '
                      f'segments (window segment), not encoder={t.encoder} window={t.window}')
  if config.mode == 'ensemble':
    _check_ensemble(config)
  if config.mode == 'oof' and (config.kind != 'image' or config.data.folds < 2):
    raise ConfigError(f'config.data.folds={config.data.folds}: mode=oof trains K >= 2 fold runs '
                      f'of an image config (kind={config.kind})')
  if config.mode == 'features' and config.kind != 'image':
    raise ConfigError(f'config.kind={config.kind}: mode=features extracts features with an '
                      'image run')
  p = config.predict
  if config.mode == 'predict' and bool(p.videos) == bool(p.images):
    raise ConfigError('config.predict.videos and config.predict.images: mode=predict needs '
                      'exactly one of them (a file of test videos, one a line, or of '
                      '<video>/<frame>.jpg lines)')
  if config.mode in ('predict', 'features'):
    _existing(config, 'predict.videos', folder=False)
    _existing(config, 'predict.images', folder=False)
    _existing(config, 'predict.root', folder=True)
  if config.mode == 'predict':
    _one_of(config, 'predict.format', ('auto', *predictions.FORMATS))
    _existing(config, 'predict.au_thresholds', folder=False)
    _existing(config, 'predict.frame_counts', folder=False)
    _at_least(config, 'predict.va_window', 1, whole=True)


def _check_ensemble(config: ml_collections.ConfigDict) -> None:
  members = [m.strip() for m in config.ensemble.members.split(',') if m.strip()]
  if not members:
    raise ConfigError("config.ensemble.members is unset: mode=ensemble averages finished runs, "
                      "'DIR[@CHECKPOINT],...'")
  for member in members:
    folder, _, which = member.partition('@')
    if not os.path.isfile(os.path.join(folder, 'config.json')):
      raise ConfigError(f'config.ensemble.members: {folder} is not a run folder (no config.json '
                        'there: a folder a training run wrote)')
    if which and which not in ('best', 'latest') and not which.isdigit():
      raise ConfigError(f'config.ensemble.members: {member}: the checkpoint after @ must be '
                        'best, latest or a step number')
