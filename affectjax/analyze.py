"""From a video to per-frame affect: a table and plots, with a trained run.

  python -m affectjax.analyze --video clip.mp4 --run runs/mtl --out out/clip
  python -m affectjax.analyze --video-dir videos/ --run runs/mtl --out out/   # many videos

Per video: the faces are detected, tracked and aligned as `python -m affectjax.data.crop` does
(the largest face, or every face with --all-faces), the run's model predicts every crop (the
run restored from its checkpoint with the config it trained with, through mode=predict's own
reading of an Aff-Wild2 crop folder, so the crops are prepared exactly as in training), and
OUT gets, per face:
- `<face>.csv`: one row per frame (affectjax.timeline: frame, time, face found, box, landmarks,
  detection score, EXPR probabilities and class, AU probabilities and decisions, valence and
  arousal). AU decisions use the run's tuned per-AU thresholds and valence-arousal its tuned
  smoothing window, from the newest `eval_*.json` in the run folder that has them (mode=eval
  writes them; --no-tuned for 0.5 and no smoothing);
- `<face>_valence_arousal.png`, `_expressions.png`, `_action_units.png`, `_contact_sheet.png`
  (matplotlib, the `report` extra);
- with --abaw, the ABAW per-video prediction files (`abaw/`);
- `cropped_aligned/<face>/%05d.jpg`, the aligned crops, and `summary.json`.
The folder is written under a temporary name and renamed when complete; an existing one is
refused unless --overwrite. A summary line per video gives its frames, the frames with a face
and each stage's frames/s.

The run is an image run, or a temporal run: then the crops' features are extracted first with
the image run (and checkpoint) that made its training features, as named in their meta.json.
Converted backbone weights alone (affectjax.convert) cannot predict affect (no trained heads),
and a run folder without a checkpoint is refused with that message.
"""
import argparse
import glob
import json
import os
import sys
import time

import ml_collections
import numpy as np

from affectjax import ensemble, files, inference, labels, metrics as metrics_lib, predictions
from affectjax import timeline
from affectjax import weights as weights_lib
from affectjax.data import crop as crop_lib
from affectjax.data import layout as layout_lib
from affectjax.data import sequences
from affectjax.data import unlabelled
from affectjax.data import video as video_lib
from affectjax.face import faces as faces_lib


class AnalyzeError(ValueError):
  """A run or a video that cannot be analysed; names it and says why."""


def load_run(run: str, checkpoint: str = '') -> ml_collections.ConfigDict:
  """The run's training config (RUN/config.json), set to restore `checkpoint`."""
  path = os.path.join(run, 'config.json')
  if os.path.isfile(os.path.join(run, weights_lib.META_FILE)):
    raise AnalyzeError(f'--run {run}: converted backbone weights (affectjax.convert), without '
                       'trained affect heads: train a run from them first (--config.init_from='
                       f'{run}) and pass that run')
  if not os.path.isfile(path):
    raise AnalyzeError(f'--run {run}: not a run folder (no config.json). Converted weights '
                       '(affectjax.convert) have no trained affect heads: train a run on them '
                       'first (README, "Pretrained weights")')
  steps = glob.glob(os.path.join(run, 'checkpoints', '[0-9]*'))
  if not steps:
    raise AnalyzeError(f'--run {run}: has no checkpoint in {os.path.join(run, "checkpoints")} '
                       '(was its training stopped before the first save?)')
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  if config.kind not in ('image', 'temporal'):
    raise AnalyzeError(f'--run {run}: a {config.kind} run; analyze restores image runs and '
                       'temporal runs on image runs\' features')
  config.eval_checkpoint = checkpoint or config.eval_checkpoint
  return config


def image_runs(config) -> list:
  """(workdir, checkpoint step) of the image run behind each features folder of a temporal
  run (their meta.json), whose model makes the features of new frames."""
  found = []
  for folder in (f.strip() for f in config.temporal.features_dir.split(',') if f.strip()):
    metas = sorted(glob.glob(os.path.join(folder, '*', sequences.META)))
    if not metas:
      raise AnalyzeError(f'the temporal run\'s features {folder} are gone: analyze extracts new '
                         'frames\' features with the image run they name')
    runs = []  # mode=oof: the training frames' come from fold runs, the others' from the full run
    for path in metas:
      with open(path) as f:
        meta = json.load(f)
      if meta.get('oof_eval') == 'folds':
        raise AnalyzeError(f'{path}: features from the mean of {len(meta["fold_workdirs"])} fold '
                           'runs (data.oof_eval=folds); analyze extracts new frames\' features '
                           'with one image run: use a temporal run trained on mode=features or '
                           'on mode=oof with data.oof_eval=full')
      if os.path.isfile(os.path.join(meta.get('workdir', ''), 'config.json')) and 'step' in meta:
        runs.append((meta['workdir'], int(meta['step'])))
    if not runs:
      raise AnalyzeError(f'{metas[0]}: its image run {meta.get("workdir") or "(none named)"} is '
                         'not a run folder, nor is that of any other split of its features')
    found.append(runs[0])
  return found


def tuned_settings(run: str, use: bool, step: int | None = None) -> tuple:
  """(AU thresholds: 0.5 or float [12], VA window, the eval JSON they came from or None): those
  mode=eval tuned for checkpoint `step` (eval_<split>_step<step>.json), else the newest tuned."""
  if use:
    found = sorted(glob.glob(os.path.join(run, 'eval_*.json')), key=os.path.getmtime)
    found.sort(key=lambda p: p.endswith(f'_step{step}.json'))  # that step's last
    for path in reversed(found):
      with open(path) as f:
        values = json.load(f)
      if 'au_thresholds' in values or 'va_window' in values:
        thresholds = (predictions.read_au_thresholds(path) if 'au_thresholds' in values
                      else 0.5)
        return thresholds, int(values.get('va_window', 1)), path
  return 0.5, 1, None


def _for_crops(config, root: str, list_path: str, batch: int) -> ml_collections.ConfigDict:
  """A copy of `config` that predicts the faces listed in list_path under root/cropped_aligned."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.data.root, config.data.cache_dir = root, os.path.join(root, '.cache')
  config.predict.root = root  # (a run's own predict.root, if it had one, names other crops)
  config.predict.videos, config.predict.images = list_path, ''
  config.eval_batch_size = batch or config.eval_batch_size
  config.mode = 'predict'
  return config


def predict_faces(config, run: str, root: str, names: list, batch: int) -> tuple:
  """(member pass over the crops of `names` under root/cropped_aligned, checkpoint step). A
  temporal run gets the crops' features from its image runs first (their mode=features)."""
  list_path = os.path.join(root, 'faces.txt')
  with open(list_path, 'w') as f:
    f.write(''.join(f'{n}\n' for n in names))
  config = _for_crops(config, root, list_path, batch)
  if config.kind == 'temporal':
    folders = []
    for k, (workdir, step) in enumerate(image_runs(config)):
      image = _for_crops(load_run(workdir, str(step)), root, list_path, batch)
      image.features_out = os.path.join(root, '.features', str(k))
      inference.extract_features(image, workdir, test_only=True)
      folders.append(image.features_out)
    config.temporal.features_dir = ','.join(folders)
  member, step, _ = ensemble.run_member(config, run, test=True)
  for leftover in (config.data.cache_dir, os.path.join(root, '.features'), list_path):
    files.remove(leftover)
  return member, step


def face_values(member, name: str, frames: np.ndarray, tasks: tuple, thresholds, window: int
                ) -> tuple:
  """(predicted bool [T], values per task over the T decoded frames `frames` (0-based)) of the
  face `name` of the member pass."""
  video = list(member.index.video_names).index(name)
  rows = np.flatnonzero((member.index.video_id == video) & member.got)
  at = np.searchsorted(frames, member.index.frame[rows] - 1)
  predicted = np.zeros(len(frames), bool)
  predicted[at] = True
  values = {}
  for task in tasks:
    full = np.zeros((len(frames), member.probs[task].shape[1]))
    full[at] = member.probs[task][rows]
    values[task] = full
  if 'va' in tasks:  # as mode=predict decides them
    values['va'] = predictions.clip_va(values['va'])
  if 'au' in tasks:
    values['au_on'] = values['au'] >= np.asarray(thresholds)
  if 'va' in tasks and window > 1:
    values['va'][at] = metrics_lib.smooth_per_video(values['va'][at], np.zeros(len(at), int),
                                                    window, frames[at])
  return predicted, values


def write_abaw(folder: str, member, tasks: tuple, num_expr_classes: int, thresholds,
               window: int, frame_counts: dict) -> list:
  """The ABAW per-video files (predictions.write_per_video) of every face: one line per frame
  of the video, frames without the face taking the nearest predicted frame's values."""
  decided = {}
  if 'expr' in tasks:
    decided['expr'] = member.probs['expr'].argmax(-1)
  if 'au' in tasks:
    decided['au'] = (member.probs['au'] >= np.asarray(thresholds)).astype(np.int64)
  if 'va' in tasks:
    got = np.flatnonzero(member.got)
    decided['va'] = predictions.clip_va(member.probs['va'])
    decided['va'][got] = metrics_lib.smooth_per_video(
        decided['va'][got], member.index.video_id[got], window, member.index.frame[got])
  return predictions.write_per_video(folder, member.index, decided, member.got, tasks,
                                     num_expr_classes, frame_counts)


def sample_crops(crop_dir: str, frames: np.ndarray, times: np.ndarray, predicted: np.ndarray,
                 values: dict, classes: tuple, tasks: tuple) -> list:
  """Up to timeline.SHEET (time, crop, caption) evenly over the predicted frames."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  have = np.flatnonzero(predicted)
  picks = have[np.linspace(0, len(have) - 1, min(timeline.SHEET, len(have))).astype(int)]
  out = []
  for t in picks:
    with Image.open(os.path.join(crop_dir, f'{int(frames[t]) + 1:05d}.jpg')) as image:
      out.append((float(times[t]), np.asarray(image.convert('RGB')),
                  timeline.caption(values, t, classes, tasks)))
  return out


def analyze_video(path: str, out: str, config, run: str, detector, args) -> dict:
  """Writes OUT for one video (see the module's docstring); returns its summary."""
  with files.atomic_dir(out) as tmp:
    crop_root = os.path.join(tmp, layout_lib.IMAGE_DIR)
    os.makedirs(crop_root)
    summary, dets, found = crop_lib.crop_video(
        path, detector, crop_root, all_faces=args.all_faces, smooth=args.smooth,
        chunk=args.chunk, max_bad_fraction=args.max_bad_fraction, progress=not args.quiet)
    if not found and summary['frames_with_a_face']:
      need = min(faces_lib.MIN_FRAMES, summary['frames'])
      raise AnalyzeError(f'{path}: faces were found in {summary["frames_with_a_face"]} of its '
                         f'{summary["frames"]} frames, but --all-faces keeps only a face '
                         f'tracked over at least {need} frames')
    if not found:
      raise AnalyzeError(f'{path}: no face found in any of its {summary["frames"]} frames')
    start = time.perf_counter()
    member, step = predict_faces(config, run, tmp, [f.name for f in found], args.batch)
    model_s = time.perf_counter() - start
    thresholds, window, tuned_from = tuned_settings(run, not args.no_tuned, step)
    tasks, classes = member.tasks, labels.expr_classes(config.num_expr_classes)
    for face in found:
      predicted, values = face_values(member, face.name, dets.index, tasks, thresholds, window)
      timeline.write_csv(os.path.join(tmp, f'{face.name}.csv'), dets.index, dets.time, face,
                         predicted, values, classes, tasks)
      if not args.no_plots:
        try:
          crops = sample_crops(os.path.join(crop_root, face.name), dets.index, dets.time,
                               predicted, values, classes, tasks)
          pngs = timeline.write_plots(tmp, dets.time, predicted, values, classes, tasks, crops,
                                      face.name)
          for png in pngs:
            os.rename(png, os.path.join(tmp, f'{face.name}_{os.path.basename(png)}'))
        except ImportError:
          print("  matplotlib is not installed: no plots (pip install 'affectjax[report]')")
      summary.setdefault('predicted', {})[face.name] = int(predicted.sum())
    if args.abaw:
      write_abaw(os.path.join(tmp, 'abaw'), member, tasks, config.num_expr_classes, thresholds,
                 window, {f.name: int(dets.index[-1]) + 1 for f in found})
    summary.update(run=os.path.abspath(run), checkpoint_step=step,
                   au_thresholds=np.asarray(thresholds).tolist(), va_window=window,
                   tuned_from=tuned_from, model_s=round(model_s, 2))
    summary['frames_per_s']['model'] = round(sum(summary['predicted'].values()) /
                                             max(model_s, 1e-9), 1)
    with open(os.path.join(tmp, 'summary.json'), 'w') as f:
      json.dump(summary, f, indent=1)
  return summary


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  which = parser.add_mutually_exclusive_group(required=True)
  which.add_argument('--video', help='one video file; OUT is its output folder')
  which.add_argument('--video-dir', help='a folder of videos; OUT gets a folder per video')
  parser.add_argument('--run', required=True, help='a trained image or temporal run (WORKDIR)')
  parser.add_argument('--out', required=True)
  parser.add_argument('--checkpoint', default='', help='best, latest or a step (default: the '
                      "run's eval_checkpoint)")
  parser.add_argument('--all-faces', action='store_true', help='every tracked face')
  parser.add_argument('--smooth', type=int, default=1, help='landmark smoothing window (frames)')
  parser.add_argument('--min-face', type=int, default=20, help="detector's smallest face (px)")
  parser.add_argument('--chunk', type=int, default=32, help='frames per detection batch')
  parser.add_argument('--batch', type=int, default=0, help="model batch (default: the run's)")
  parser.add_argument('--max-bad-fraction', type=float, default=0.01)
  parser.add_argument('--no-tuned', action='store_true',
                      help="AU threshold 0.5 and no VA smoothing, whatever the run tuned")
  parser.add_argument('--no-plots', action='store_true')
  parser.add_argument('--abaw', action='store_true', help='also the ABAW per-video files')
  parser.add_argument('--overwrite', action='store_true', help='replace existing output folders')
  parser.add_argument('--quiet', action='store_true', help='no progress bars')
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    config = load_run(args.run, args.checkpoint)
    if args.video:
      jobs = [(crop_lib.video_paths(args.video)[0], args.out)]
    else:
      jobs = [(p, os.path.join(args.out, video_lib.video_name(p)))
              for p in video_lib.list_videos(args.video_dir)]
    for _, out in jobs:
      if os.path.exists(out) and not args.overwrite:
        raise FileExistsError(f'{out} exists: choose another --out, or pass --overwrite')
  except (AnalyzeError, video_lib.VideoError, FileExistsError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  from affectjax.face import detect as detect_lib  # pylint: disable=import-outside-toplevel
  detector = detect_lib.Detector(min_face_size=args.min_face)
  failed = []
  for number, (path, out) in enumerate(jobs, 1):
    print(f'[{number}/{len(jobs)}] {path} -> {out}', flush=True)
    try:
      summary = analyze_video(path, out, config, args.run, detector, args)
    except (AnalyzeError, video_lib.VideoError, unlabelled.FrameListError) as e:
      print(f'  error: {e}', file=sys.stderr, flush=True)
      failed.append(path)
      continue
    print(f'  {crop_lib.describe(summary)}; predicted {summary["predicted"]} with checkpoint '
          f'step {summary["checkpoint_step"]}', flush=True)
  print(f'Analysed {len(jobs) - len(failed)} of {len(jobs)} videos into {args.out}' +
        (f'; failed: {", ".join(failed)}' if failed else ''), flush=True)
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
