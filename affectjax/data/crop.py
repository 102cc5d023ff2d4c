"""Face crops from your own videos, in Aff-Wild2's `cropped_aligned` layout, for training or
prediction.

  python -m affectjax.data.crop --videos raw_videos/ --out my_dataset/
  python -m affectjax.data.crop --videos clip.mp4 --out my_dataset/ --all-faces --smooth 5

Each video is decoded (PyAV), its faces detected with five landmarks (MTCNN in JAX/Flax,
affectjax.face.detect), tracked (the largest face, or every face with --all-faces, named as
Aff-Wild2 names them: `<video>`, `<video>_left` / `_right`, `<video>_face<k>`), aligned to the
112x112 ArcFace template on the device (affectjax.face.align) and written as
`OUT/cropped_aligned/<name>/<frame>.jpg`, frames numbered from 1 (`%05d.jpg`); a frame without
the face leaves no file, as in Aff-Wild2. Every part of affectjax reads the result
(`--config.data.root=OUT`, an unlabelled test list of the names for mode=predict).

Each face's folder appears whole or not at all (written under a temporary name, renamed when
complete); OUT/crop_summary.json, written last, lists what was done, so a folder with it is
complete. An existing OUT is refused unless --overwrite. A video that cannot be read, or that
has no face, is reported and the others go on; the exit status is 1 if any video failed.
"""
import argparse
import contextlib
import json
import os
import sys
import time

import numpy as np
import simplejpeg

from affectjax import files
from affectjax.data import layout as layout_lib
from affectjax.data import video as video_lib
from affectjax.face import faces as faces_lib

SUMMARY = 'crop_summary.json'


def video_paths(videos: str) -> list:
  """One video file, or the videos of a folder (video_lib.list_videos)."""
  if os.path.isfile(videos):
    if not videos.lower().endswith(video_lib.SUFFIXES):
      raise video_lib.VideoError(f'{videos}: not a video file (videos end in '
                                 f'{", ".join(video_lib.SUFFIXES)})')
    return [videos]
  return video_lib.list_videos(videos)


def prepare_out(out: str, overwrite: bool) -> None:
  """Refuses an existing `out` unless `overwrite` (then removes it); creates it."""
  if os.path.exists(out):
    if not overwrite:
      raise FileExistsError(f'{out} exists: choose another --out, or pass --overwrite to '
                            'replace it')
    files.remove(out)
  os.makedirs(out)


def write_crops(path: str, dets, found: list, crop_root: str, size: int, chunk: int,
                seconds: dict, quality: int = 95) -> dict:
  """Writes every face of `found` under crop_root/<name>/%05d.jpg (each folder written under a
  temporary name and renamed into place when complete); returns {name: crops written}."""
  written = {f.name: 0 for f in found}
  with contextlib.ExitStack() as stack:
    staging = {f.name: stack.enter_context(files.atomic_dir(os.path.join(crop_root, f.name)))
               for f in found}
    for rows, per_face in faces_lib.aligned(path, dets, found, size, chunk, seconds):
      start = time.perf_counter()
      for name, (present, crops) in per_face.items():
        for row in np.flatnonzero(present):
          data = simplejpeg.encode_jpeg(np.ascontiguousarray(crops[row]), quality=quality,
                                        colorspace='RGB')
          number = int(dets.index[rows[row]]) + 1
          with open(os.path.join(staging[name], f'{number:05d}.jpg'), 'wb') as f:
            f.write(data)
          written[name] += 1
      seconds['write'] = seconds.get('write', 0.0) + time.perf_counter() - start
  return written


def crop_video(path: str, detector, crop_root: str, *, all_faces: bool = False,
               smooth: int = 1, size: int = 112, chunk: int = 32,
               min_frames: int = faces_lib.MIN_FRAMES,
               max_bad_fraction: float = 0.01, progress: bool = True) -> tuple:
  """(summary dict, detections, faces) of one video, its faces' crops written under
  crop_root."""
  start = time.perf_counter()
  dets = faces_lib.detect_video(path, detector, chunk, max_bad_fraction, progress)
  found = faces_lib.faces_of(dets, video_lib.video_name(path), all_faces, smooth, min_frames)
  seconds = dict(dets.seconds)
  written = write_crops(path, dets, found, crop_root, size, chunk, seconds) if found else {}
  frames = len(dets.index)
  wall = time.perf_counter() - start
  summary = {'video': path, 'frames': frames, 'bad_packets': dets.counts['bad'],
             'fps': dets.info.fps, 'rotation': dets.info.rotation,
             'size': [dets.info.width, dets.info.height],
             'frames_with_a_face': int(dets.valid.any(1).sum()), 'faces': written,
             'seconds': {k: round(v, 3) for k, v in seconds.items()}, 'wall_s': round(wall, 2),
             'frames_per_s': {k: round(frames / max(v, 1e-9), 1) for k, v in seconds.items()}}
  return summary, dets, found


def describe(summary: dict) -> str:
  rates = ', '.join(f'{k} {v:.0f}' for k, v in summary['frames_per_s'].items())
  faces = ', '.join(f'{k} ({v} crops)' for k, v in summary['faces'].items()) or 'no face found'
  return (f"{summary['video']}: {summary['frames']} frames, {summary['frames_with_a_face']} "
          f"with a face; {faces}; frames/s: {rates}; {summary['wall_s']:.1f} s")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--videos', required=True, help='a video file or a folder of videos')
  parser.add_argument('--out', required=True, help='the dataset folder to write')
  parser.add_argument('--all-faces', action='store_true',
                      help='every tracked face, not only the largest')
  parser.add_argument('--smooth', type=int, default=1,
                      help='landmarks averaged over this many frames (1: not smoothed)')
  parser.add_argument('--size', type=int, default=112, help='crop size in pixels')
  parser.add_argument('--min-face', type=int, default=20, help="detector's smallest face (px)")
  parser.add_argument('--chunk', type=int, default=32, help='frames per device batch')
  parser.add_argument('--max-bad-fraction', type=float, default=0.01,
                      help='corrupt packets tolerated per video, as a fraction of its frames')
  parser.add_argument('--overwrite', action='store_true', help='replace an existing --out')
  args = parser.parse_args(argv)
  from affectjax.face import detect as detect_lib  # pylint: disable=import-outside-toplevel
  try:
    paths = video_paths(args.videos)
    prepare_out(args.out, args.overwrite)
  except (video_lib.VideoError, FileExistsError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  detector = detect_lib.Detector(min_face_size=args.min_face)
  crop_root = os.path.join(args.out, layout_lib.IMAGE_DIR)
  os.makedirs(crop_root, exist_ok=True)
  done, failed = [], []
  for number, path in enumerate(paths, 1):
    print(f'[{number}/{len(paths)}] {path}', flush=True)
    try:
      summary, _, _ = crop_video(path, detector, crop_root, all_faces=args.all_faces,
                                 smooth=args.smooth, size=args.size, chunk=args.chunk,
                                 max_bad_fraction=args.max_bad_fraction)
    except video_lib.VideoError as e:
      print(f'  error: {e}', file=sys.stderr, flush=True)
      failed.append({'video': path, 'error': str(e)})
      continue
    print('  ' + describe(summary), flush=True)
    done.append(summary)
  with files.atomic_write(os.path.join(args.out, SUMMARY)) as f:
    json.dump({'videos': done, 'failed': failed, 'args': vars(args)}, f, indent=1)
  crops = sum(sum(s['faces'].values()) for s in done)
  print(f'Cropped {len(done)} of {len(paths)} videos into {crop_root}: '
        f'{sum(len(s["faces"]) for s in done)} faces, {crops} crops; '
        f'{len(failed)} failed' + (f' ({", ".join(f["video"] for f in failed)})' if failed
                                   else '') + f'. Summary: {os.path.join(args.out, SUMMARY)}')
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
