"""Every shell command of README.md and BUILD.md works as written, at test scale.

The commands are read from the Markdown itself: every line of a ```bash block (backslash
continuations joined) and every inline code span that starts with a command word (`python`,
`pip`, `tensorboard`, ...). Each must have an entry in `COMMANDS`, which says how it is checked:

- `Run`: run with bash, in document order, in one scratch folder that links `configs/`, after
  the substitutions of `SUBSTITUTIONS` (the `test` variant of every config, a tiny synthetic
  Aff-Wild2 for `/data/affwild2`, tiny weights for `/weights/`, scratch paths), with
  `--config.data.cache_dir` added to training commands so nothing lands in `~/.cache`, and one
  CPU device. It must exit with status 0 and write the files the text promises.
- `Installed`: a pip or virtualenv line. The extras it names exist in pyproject.toml, and
  `.ci/run` runs the README's virtualenv, install and test commands on every clean clone.
- `NotHere`: needs something this machine lacks (a GPU, a TPU, a viewer that is not a
  dependency): syntax-checked with `bash -n`, its extras and modules checked to exist.

A command added to the docs without an entry fails `test_every_documented_command_is_covered`;
an entry whose command left the docs fails it too. The TFDS preparation needs no TensorFlow
(tensorflow-datasets 4.9.10 prepares without it), so it runs here too: the test extra installs
what the `tfds` extra does.
"""
import dataclasses
import glob
import importlib.util
import os
import pickle
import re
import shlex
import subprocess
import sys
import tomllib

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ('README.md', 'BUILD.md')
COMMAND_WORDS = ('python', 'python3', 'pip', 'tensorboard', 'tfds', 'bash', 'sbatch', 'srun')

# (pattern, replacement) applied in order to every `Run` command; {tmp} is the scratch folder.
SUBSTITUTIONS = (
    (r'(--config=configs/\w+\.py:(?:\w+,)*)demo\b', r'\1test'),  # :demo, :gru,demo -> test
    (r'(--config=configs/\w+\.py)(?=\s|$)', r'\1:test'),  # a full-scale config -> its test
    (r'/data/affwild2_packed\b', '{tmp}/affwild2_packed'),
    (r'/data/affwild2\b', '{tmp}/affwild2'),  # the synthetic set at test size, both layouts
    (r'/data/tfds\b', '{tmp}/tfds'),
    (r'/weights/', '{tmp}/weights/'),
    (r'/data/stills', '{tmp}/stills'),
    (r'(--table=configs/ablations/\w+\.py:)demo\b', r'\1test'),
    (r'(affectjax\.ablate .*)$', r'\1 --rows=va --seeds=0'),  # one row of the table  # the stand-ins of AffectNet and RAF-DB, and their tree
    (r'(affectjax\.data\.synthetic\.stills --out \S+)', r'\1 --images 40'),  # a VGGFace2-format pickle of the test-scale network
    (r'--config\.data\.worker_count=8\b', '--config.data.worker_count=2'),  # 2 cores here
)
TRAINING = 'python -m affectjax.main '
CACHE_FLAG = ' --config.data.cache_dir={tmp}/cache'


@dataclasses.dataclass(frozen=True)
class Run:
  expect: tuple = ()  # globs under the scratch folder that must match after the command
  stdout: tuple = ()  # text the command must print
  before: str = ''  # name of a setup function below, run first


@dataclasses.dataclass(frozen=True)
class Installed:
  why: str


@dataclasses.dataclass(frozen=True)
class NotHere:
  why: str


CI = '.ci/run runs it on a fresh virtualenv of every clean clone'
DEMO = 'python -m affectjax.main --config=configs/mtl3.py:demo --workdir=runs/demo'
COMMANDS = {
    'python3 -m venv .venv && . .venv/bin/activate': Installed(CI),
    'pip install -e .': Installed('the core of the test extra, which .ci/run installs'),
    DEMO: Run(expect=('runs/demo/checkpoints/*', 'runs/demo/metrics.jsonl',
                      'runs/demo/config.json', 'runs/demo/tensorboard/events.out.tfevents.*'),
              stdout=('validation: score', 'mtl_score', 'Run finished')),
    "pip install -e '.[test]'": Installed(CI),
    'python -m pytest -q -n auto tests': Installed(CI + ' (this suite)'),
    'tensorboard --logdir runs/demo': NotHere(
        'the TensorBoard viewer is not a dependency (event files are written with '
        'tensorboardX); the demo entry checks that runs/demo/tensorboard holds event files'),
    DEMO + ' --config.mode=predict --config.predict.videos=test_videos.txt': Run(
        before='write_test_list', stdout=('Predicted',),
        expect=('runs/demo/predictions_test_videos_step*/VA/*.txt',
                'runs/demo/predictions_test_videos_step*/EXPR/*.txt',
                'runs/demo/predictions_test_videos_step*/AU/*.txt')),
    'python -m affectjax.main --config=configs/mtl3.py:demo --workdir=runs/ensemble '
    '--config.mode=ensemble --config.ensemble.members=runs/demo@best,runs/demo@latest': Run(
        stdout=('Evaluated the ensemble of 2 members', '[ensemble] 2 members'),
        expect=('runs/ensemble/eval_validation_ensemble.json', 'runs/ensemble/ensemble.json',
                'runs/ensemble/predictions_validation_ensemble.csv')),
    'python -m affectjax.main --config=configs/mtl.py --workdir=runs/mtl '
    '--config.data.root=/data/affwild2 --config.data.worker_count=8': Run(
        before='make_dataset', expect=('runs/mtl/checkpoints/*',),
        stdout=('train (alternating)', 'Run finished')),  # the paper's scheme, losses finite
    'python -m affectjax.data.pack --root /data/affwild2 --out /data/affwild2_packed': Run(
        expect=('affwild2_packed/train_manifest.json', 'affwild2_packed/validation_manifest.json',
                'affwild2_packed/train.array_record-00000-of-00001'), stdout=('packed',)),
    'python -m affectjax.main --config=configs/mtl.py --workdir=runs/mtl_packed '
    '--config.data.root=/data/affwild2 --config.data.source=arrayrecord '
    '--config.data.packed_dir=/data/affwild2_packed': Run(
        expect=('runs/mtl_packed/checkpoints/*',), stdout=('Run finished',)),
    "pip install -e '.[tfds]'": Installed('the test extra installs the same packages'),
    'python -m affectjax.data.tfds_builder --root /data/affwild2 --config per_task_7 '
    '--data_dir /data/tfds': Run(stdout=('prepared affwild2/per_task_7',),
                                 expect=('tfds/affwild2/per_task_7/1.0.0/dataset_info.json',)),
    'python -m affectjax.main --config=configs/mtl.py --workdir=runs/mtl_tfds '
    '--config.data.root=/data/affwild2 --config.data.source=tfds '
    '--config.data.packed_dir=/data/tfds': Run(
        expect=('runs/mtl_tfds/checkpoints/*',), stdout=('Run finished',)),
    DEMO + ' --config.mode=features': Run(
        expect=('runs/demo/features/train*', 'runs/demo/features/validation*'),
        stdout=('Extracted features',)),
    'python -m affectjax.main --config=configs/temporal.py:gru,demo --workdir=runs/temporal '
    '--config.temporal.features_dir=runs/demo/features': Run(
        expect=('runs/temporal/checkpoints/*', 'runs/temporal/metrics.jsonl'),
        stdout=('Run finished',)),
    'python -m affectjax.main --config=configs/temporal_stat.py:model6,end_to_end,demo '
    '--workdir=runs/e2e --config.init_from=runs/frames': Run(
        before='link_frame_run', expect=('runs/e2e/checkpoints/*',),
        stdout=('init_from runs/frames:', 'Run finished')),
    'python -m affectjax.data.synthetic.stills --out /data/stills_src': Run(
        expect=('stills_src/AffectNet/Manually_Annotated_file_lists/training.csv',
                'stills_src/RAF-DB/basic/EmoLabel/list_patition_label.txt'),
        stdout=('synthetic AffectNet', 'synthetic RAF-DB')),
    'python -m affectjax.data.stills --affectnet /data/stills_src/AffectNet '
    '--rafdb /data/stills_src/RAF-DB --out /data/stills': Run(
        expect=('stills/sources.csv', 'stills/cropped_aligned/rafdb_train_0001/00001.jpg',
                'stills/Annotations/VA_Set/Train_Set/affectnet_train_0001.txt'),
        stdout=('wrote', '0 did not decode')),
    'python -m affectjax.ablate --table=configs/ablations/method3.py:demo '
    '--workdir=runs/method3': Run(
        expect=('runs/method3/table.md', 'runs/method3/results.json',
                'runs/method3/va/seed0/result.json',
                'runs/method3/va/seed0/report_validation_step*/va_density.png'),
        stdout=('1 runs finished', '| va | ')),
    'python -m affectjax.convert --source /weights/resnet50_ft_weight.pkl '
    '--out /weights/vggface2_r50': Run(
        before='make_vggface2_pickle', expect=('weights/vggface2_r50/affectjax_weights.json',),
        stdout=('wrote resnet18 (width 4, stride on 1x1, stem pool ceil, vggface2',)),
    'python -m affectjax.main --config=configs/mtl.py --workdir=runs/mtl_vggface2 '
    '--config.data.root=/data/affwild2 --config.init_from=/weights/vggface2_r50': Run(
        expect=('runs/mtl_vggface2/checkpoints/*',), stdout=('Run finished',)),
    "pip install -e '.[cuda]'": NotHere('needs an NVIDIA GPU'),
    "pip install -e . 'jax[tpu]'": NotHere('needs a TPU VM'),
    'pip install "jax[cuda13]==<jax version>" -e .': NotHere(
        'about 5 GB of CUDA wheels, for benchmarks/deviceless.py (tests/test_deviceless.py '
        'tests its readers of XLA\'s dumps on excerpts of real ones)'),
    "pip install -e '.[torch]'": Installed('torch is part of the test extra'),
    "pip install -e '.[report]'": Installed('matplotlib is part of the test extra'),
    'python -c "import jax; print(jax.devices())"': Run(stdout=('CpuDevice(id=0)',)),
    "pip install -e '.[video,report]'": Installed('PyAV, mtcnn, lz4 and matplotlib are part of '
                                                  'the test extra'),
    'python -m affectjax.analyze --video clip.mp4 --run runs/demo --out out/clip': Run(
        before='make_videos', stdout=('Analysed 1 of 1 videos',),
        expect=('out/clip/clip.csv', 'out/clip/clip_valence_arousal.png',
                'out/clip/clip_contact_sheet.png', 'out/clip/cropped_aligned/clip/00001.jpg',
                'out/clip/summary.json')),
    'python -m affectjax.analyze --video-dir videos/ --run runs/demo --out out/videos': Run(
        stdout=('Analysed 2 of 2 videos',),
        expect=('out/videos/a/a.csv', 'out/videos/b/b_action_units.png')),
    'python -m affectjax.data.crop --videos videos/ --out my_dataset/': Run(
        stdout=('Cropped 2 of 2 videos',),
        expect=('my_dataset/crop_summary.json', 'my_dataset/cropped_aligned/a/00001.jpg',
                'my_dataset/cropped_aligned/b/00006.jpg')),
}


def documented_commands() -> list:
  """(file:line, command) of every shell command in the docs, in document order."""
  found = []
  for name in DOCS:
    text = open(os.path.join(REPO, name), encoding='utf-8').read()
    in_block, pending = False, ''
    for number, line in enumerate(text.splitlines(), 1):
      if line.startswith('```'):
        in_block = line.strip() == '```bash'
        continue
      if in_block:
        pending += line.rstrip('\\').strip() + ' ' if line.endswith('\\') else line.strip()
        if pending and not line.endswith('\\'):
          found.append((f'{name}:{number}', re.sub(r'\s+', ' ', pending)))
          pending = ''
        continue
      for span in re.findall(r'`([^`\n]+)`', line):
        if span.split(' ')[0] in COMMAND_WORDS and ' ' in span:
          found.append((f'{name}:{number}', span))
  return found


def test_every_documented_command_is_covered():
  documented = documented_commands()
  uncovered = [f'{where}: {command}' for where, command in documented if command not in COMMANDS]
  assert not uncovered, ('commands in the docs without an entry in tests/test_docs.py '
                         'COMMANDS (say how to run them here):\n' + '\n'.join(uncovered))
  stale = set(COMMANDS) - {command for _, command in documented}
  assert not stale, f'entries of COMMANDS no longer in the docs: {sorted(stale)}'


def _extras() -> set:
  with open(os.path.join(REPO, 'pyproject.toml'), 'rb') as f:
    return set(tomllib.load(f)['project']['optional-dependencies'])


def _check_syntax(command: str) -> None:
  checked = subprocess.run(['bash', '-n', '-c', command], capture_output=True, text=True)
  assert checked.returncode == 0, checked.stderr
  for extras in re.findall(r"\.\[([\w,]+)\]", command):
    assert set(extras.split(',')) <= _extras(), f'{command}: no such extra in pyproject.toml'
  words = shlex.split(command)
  if words[:2] == ['python', '-m']:
    assert importlib.util.find_spec(words[2]) is not None, f'{command}: no module {words[2]}'


def test_install_and_unrunnable_commands_are_well_formed():
  ci = open(os.path.join(REPO, '.ci', 'run')).read()
  with open(os.path.join(REPO, 'pyproject.toml'), 'rb') as f:
    extras = tomllib.load(f)['project']['optional-dependencies']
  for extra in ('tfds', 'torch'):  # their commands run here through the test extra
    assert set(extras[extra]) <= set(extras['test']), extra
  for command, entry in COMMANDS.items():
    if isinstance(entry, (Installed, NotHere)):
      _check_syntax(command)
    if isinstance(entry, Installed) and entry.why == CI:
      # .ci/run has the same command (pip run as `python -m pip`, the venv in .ci/venv)
      line = command.replace('.venv', '.ci/venv').split(' && ')[0]
      assert line.replace('pip install', 'python -m pip install') in ci or line in ci, line


def test_the_launch_scripts_are_valid_bash():
  scripts = sorted(glob.glob(os.path.join(REPO, 'launch', '*')))
  assert scripts
  for script in scripts:  # cluster launchers: checked for syntax only
    checked = subprocess.run(['bash', '-n', script], capture_output=True, text=True)
    assert checked.returncode == 0, f'{script}: {checked.stderr}'


# Setup functions named by `Run.before`.

def make_dataset(tmp):
  from affectjax.data.synthetic import generate
  generate.generate(os.path.join(tmp, 'affwild2'), num_videos=6, frames_per_video=24,
                    progress=False)


def write_test_list(tmp):
  """test_videos.txt: two validation videos of the demo's synthetic set (the test list)."""
  roots = [p for p in glob.glob(os.path.join(tmp, 'cache', 'synthetic', 'affwild2_synthetic_*'))
           if os.path.isdir(p)]  # not the sets' lock files
  with open(os.path.join(roots[0], 'validation_set_annotations.txt')) as f:
    videos = sorted({line.split('/')[0] for line in list(f)[1:]})
  with open(os.path.join(tmp, 'test_videos.txt'), 'w') as f:
    f.write('\n'.join(videos[:2]) + '\n')


def link_frame_run(tmp):
  """runs/frames: the demo run trained above stands in for a configs/mtl_va.py frame run (the
  same network at test scale; its 8-class EXPR layer does not load into the 7-class head)."""
  os.symlink(os.path.join(tmp, 'runs', 'demo'), os.path.join(tmp, 'runs', 'frames'))


def make_videos(tmp):
  """clip.mp4 and videos/{a,b}.mp4: scikit-image's astronaut photograph (a real face) drifting
  over six frames (b: the same, another speed)."""
  import cv2
  from skimage import data
  from affectjax.data import video
  photo = data.astronaut()[20:320, 100:360]
  os.makedirs(os.path.join(tmp, 'videos'))
  for path, step in (('clip.mp4', 2), ('videos/a.mp4', 2), ('videos/b.mp4', 4)):
    frames = [cv2.warpAffine(photo, np.array([[0.5, 0, 30 + step * k], [0, 0.5, 5.0]]),
                             (192, 160), borderValue=(96, 96, 96)) for k in range(6)]
    video.write(os.path.join(tmp, path), frames)


def make_vggface2_pickle(tmp):
  """A VGGFace2-format pickle (a dict of NumPy arrays, VGGFace2's layer names and block
  layout) of the test variant's network, a ResNet18 at width 4: the real file is a ResNet50,
  which the test variant of configs/mtl.py does not build (its conversion is checked against
  PyTorch in test_convert.py)."""
  import torch_resnet  # tests/ is on sys.path
  net = torch_resnet.TorchResNet(18, 4, '1x1', 'ceil', num_classes=11)
  os.makedirs(os.path.join(tmp, 'weights'))
  with open(os.path.join(tmp, 'weights', 'resnet50_ft_weight.pkl'), 'wb') as f:
    pickle.dump({k: v.numpy() for k, v in net.state_dict().items()
                 if 'num_batches' not in k}, f, protocol=2)


def scaled(command: str, tmp: str) -> str:
  """The command as run here: the substitutions and the scratch cache folder."""
  for pattern, replacement in SUBSTITUTIONS:
    command = re.sub(pattern, replacement.replace('{tmp}', tmp), command)
  if command.startswith(TRAINING):
    command += CACHE_FLAG.replace('{tmp}', tmp)
  if command.startswith('python -m affectjax.ablate '):  # every row's config
    command += f' --set=data.cache_dir={tmp}/cache'
  return command


@pytest.fixture(scope='module')
def scratch(tmp_path_factory):
  tmp = str(tmp_path_factory.mktemp('docs'))
  os.symlink(os.path.join(REPO, 'configs'), os.path.join(tmp, 'configs'))
  return tmp


RUNS = [(where, command) for where, command in documented_commands()
        if isinstance(COMMANDS.get(command), Run)]


@pytest.mark.parametrize('where,command', RUNS, ids=[where for where, _ in RUNS])
def test_documented_command_runs(where, command, scratch):
  entry = COMMANDS[command]
  if entry.before:
    globals()[entry.before](scratch)
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1',
             PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ['PATH'])
  run = scaled(command, scratch)
  done = subprocess.run(['bash', '-c', run], cwd=scratch, env=env, capture_output=True,
                        text=True, timeout=900, stdin=subprocess.DEVNULL)
  assert done.returncode == 0, f'{where}: {run}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}'
  for text in entry.stdout:
    assert text in done.stdout, f'{where}: {text!r} not printed:\n{done.stdout[-2000:]}'
  for pattern in entry.expect:
    assert glob.glob(os.path.join(scratch, pattern)), f'{where}: nothing matches {pattern}'
