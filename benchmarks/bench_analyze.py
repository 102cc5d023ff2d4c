"""Video analysis throughput: decoding (PyAV against OpenCV), detection (our JAX MTCNN against the
reference `mtcnn` package on the same frames), alignment, the model, and peak memory against video
length.

  python benchmarks/bench_analyze.py --seconds 60,600 --run runs/demo \
      --reference-python /work/venv_tfds/bin/python --out /tmp/bench_analyze

The test videos are made here: scikit-image's astronaut photograph (a real face) panned and
zoomed slowly over a `--size` canvas at 25 frames/s (libx264). Per length, one child process
runs the whole of `affectjax.analyze` on the video (decode, detect, track, align, write the
crops, restore the run and predict them, the table and the plots) and reports each stage's
frames/s and its peak RSS (ru_maxrss), so the memory of one length does not hide another's.
The reference detector runs in `--reference-python` (an environment with the `mtcnn` package
and TensorFlow; TensorFlow never enters affectjax's) on the first `--reference-frames` frames,
and our detector on the same frames in this process, each after a warm-up call.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import cv2
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=wrong-import-position

FPS = 25
REFERENCE = r'''
import json, sys, time
import cv2
from mtcnn import MTCNN
path, count = sys.argv[1], int(sys.argv[2])
capture, frames = cv2.VideoCapture(path), []
while len(frames) < count:
  ok, image = capture.read()
  if not ok:
    break
  frames.append(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
detector = MTCNN()
detector.detect_faces(frames[0])
start = time.perf_counter()
found = [len(detector.detect_faces(f)) for f in frames]
seconds = time.perf_counter() - start
print(json.dumps({'frames': len(frames), 'seconds': seconds, 'faces': sum(found)}))
'''


def astronaut_frames(seconds: float, width: int, height: int):
  """The astronaut's face drifting and zooming slowly over a grey canvas, one frame at a time."""
  from skimage import data  # pylint: disable=import-outside-toplevel
  photo = data.astronaut()[20:320, 100:360]  # her head and shoulders
  for k in range(int(seconds * FPS)):
    phase = 2 * np.pi * k / (8 * FPS)
    scale = 0.55 * height / photo.shape[0] * (1 + 0.1 * np.sin(phase / 3))
    m = np.array([[scale, 0, width / 2 - scale * photo.shape[1] / 2 + 0.1 * width *
                   np.sin(phase)], [0, scale, height / 2 - scale * photo.shape[0] / 2]])
    yield cv2.warpAffine(photo, m, (width, height), borderValue=(96, 96, 96))


def make_video(folder: str, seconds: float, width: int, height: int) -> str:
  from affectjax.data import video  # pylint: disable=import-outside-toplevel
  path = os.path.join(folder, f'astronaut_{int(seconds)}s_{width}x{height}.mp4')
  if not os.path.exists(path):
    video.write(path + '.tmp.mp4', astronaut_frames(seconds, width, height), fps=FPS)
    os.rename(path + '.tmp.mp4', path)
  return path


def decode_rates(path: str) -> dict:
  """frames/s of PyAV (affectjax.data.video.read, RGB) and of OpenCV (BGR to RGB) on `path`."""
  from affectjax.data import video  # pylint: disable=import-outside-toplevel

  def pyav():
    return sum(len(c.index) for c in video.read(path, chunk=64))

  def opencv():
    capture, n = cv2.VideoCapture(path), 0
    while True:
      ok, image = capture.read()
      if not ok:
        return n
      cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
      n += 1

  counts = {'pyav': pyav(), 'opencv': opencv()}
  wall, _ = common.interleaved_times({'pyav': pyav, 'opencv': opencv}, reps=3, warmup=0)
  return {name: counts[name] / float(np.median(wall[name])) for name in wall}


def detector_rates(path: str, frames: int, reference_python: str, chunk: int) -> dict:
  """frames/s of our detector and of the reference package on the first `frames` frames."""
  from affectjax.data import video  # pylint: disable=import-outside-toplevel
  from affectjax.face import detect  # pylint: disable=import-outside-toplevel
  images = np.concatenate([c.images for c in video.read(path, chunk=frames)][:1])[:frames]
  detector = detect.Detector()
  batches = [images[i:i + chunk] for i in range(0, len(images) - chunk + 1, chunk)]
  np.asarray(detector(batches[0])['valid'])  # compile
  start = time.perf_counter()
  found = sum(int(np.asarray(detector(b)['valid']).sum()) for b in batches)
  ours = {'frames': chunk * len(batches), 'seconds': time.perf_counter() - start, 'faces': found}
  out = {'ours': ours}
  if reference_python:
    done = subprocess.run([reference_python, '-c', REFERENCE, path, str(frames)],
                          capture_output=True, text=True, check=False)
    if done.returncode == 0:
      out['reference'] = json.loads(done.stdout.strip().splitlines()[-1])
    else:
      out['reference_error'] = done.stderr.strip().splitlines()[-1:]
  for v in out.values():
    if isinstance(v, dict) and 'seconds' in v:
      v['frames_per_s'] = v['frames'] / v['seconds']
  return out


def synthetic_landmarks(count: int, chunk: int) -> dict:
  """Our detector on `count` synthetic faces (affectjax.data.synthetic, random identities, pose
  and expressions, rendered at 160 px in a 240x200 frame), where the true landmarks are known:
  the found fraction and the landmark error over the inter-ocular distance."""
  from affectjax.data.synthetic import faces, tracks  # pylint: disable=import-outside-toplevel
  from affectjax.face import detect  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  images, truth = [], []
  for _ in range(count):
    identity = faces.Identity.sample(rng)
    au = tracks.segment_targets(rng, int(rng.integers(7)))[:12]
    scene = faces.Scene(roll=rng.uniform(-12, 12), yaw=rng.uniform(-0.2, 0.2),
                        scale=rng.uniform(0.9, 1.1))
    frame = np.full((200, 240, 3), 110, np.uint8)
    frame[20:180, 40:200] = faces.render_face(au, identity, scene, 160)
    images.append(frame)
    truth.append(faces.landmarks(au, identity, scene, 160) + np.array([40, 20]))
  detector = detect.Detector()
  found, errors = 0, []
  for i in range(0, count, chunk):
    out = {k: np.asarray(v) for k, v in detector(np.stack(images[i:i + chunk])).items()}
    for j in range(len(out['valid'])):
      if out['valid'][j, 0]:
        found += 1
        t = truth[i + j]
        errors.append(np.linalg.norm(out['landmarks'][j, 0] - t, axis=-1).mean() /
                      np.linalg.norm(t[0] - t[1]))
  return {'faces': count, 'found': found,
          'nme_interocular_mean': float(np.mean(errors)) if errors else None,
          'nme_interocular_median': float(np.median(errors)) if errors else None}


def child(args) -> None:
  """One analysis of --video in this process; prints its summary with the peak RSS."""
  from affectjax import analyze  # pylint: disable=import-outside-toplevel
  out = tempfile.mkdtemp(prefix='bench_analyze_')
  start = time.perf_counter()
  argv = ['--video', args.video, '--out', os.path.join(out, 'result'), '--quiet',
          '--chunk', str(args.chunk)]
  if args.run:
    argv += ['--run', args.run]
  code = analyze.main(argv) if args.run else _no_model(args.video, out, args.chunk)
  summary_path = os.path.join(out, 'result', 'summary.json')
  summary = json.load(open(summary_path)) if os.path.exists(summary_path) else {}
  summary.update(code=code, wall_s=time.perf_counter() - start,
                 peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
  print('RESULT ' + json.dumps(summary))


def _no_model(path: str, out: str, chunk: int) -> int:
  """Without a run: detection, alignment and crops only (affectjax.data.crop)."""
  from affectjax.data import crop  # pylint: disable=import-outside-toplevel
  from affectjax.face import detect  # pylint: disable=import-outside-toplevel
  os.makedirs(os.path.join(out, 'result', 'cropped_aligned'))
  summary, _, _ = crop.crop_video(path, detect.Detector(), os.path.join(out, 'result',
                                                                        'cropped_aligned'),
                                  chunk=chunk, progress=False)
  with open(os.path.join(out, 'result', 'summary.json'), 'w') as f:
    json.dump(summary, f)
  return 0


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--seconds', default='60,600', help='video lengths to analyse')
  parser.add_argument('--size', default='320x240', help='video frame size WxH')
  parser.add_argument('--run', default='', help='a trained image run (without: no model stage)')
  parser.add_argument('--reference-python', default='', help="a python with the 'mtcnn' package")
  parser.add_argument('--reference-frames', type=int, default=64)
  parser.add_argument('--chunk', type=int, default=32)
  parser.add_argument('--synthetic-faces', type=int, default=64)
  parser.add_argument('--videos', default='/tmp/bench_analyze_videos')
  parser.add_argument('--out', default='')
  parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  parser.add_argument('--video', default='', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    child(args)
    return
  width, height = (int(v) for v in args.size.split('x'))
  os.makedirs(args.videos, exist_ok=True)
  lengths = [float(s) for s in args.seconds.split(',')]
  paths = {s: make_video(args.videos, s, width, height) for s in lengths}
  first = paths[lengths[0]]
  results = {'size': args.size, 'decode': decode_rates(first),
             'detector': detector_rates(first, args.reference_frames, args.reference_python,
                                        args.chunk), 'lengths': {}}
  results['synthetic'] = synthetic_landmarks(args.synthetic_faces, args.chunk)
  print(f"synthetic faces: {results['synthetic']}", flush=True)
  for seconds, path in paths.items():
    done = subprocess.run([sys.executable, os.path.abspath(__file__), '--child', '--video', path,
                           '--run', args.run, '--chunk', str(args.chunk)],
                          capture_output=True, text=True, check=False)
    line = [l for l in done.stdout.splitlines() if l.startswith('RESULT ')]
    results['lengths'][seconds] = (json.loads(line[-1][7:]) if line else
                                   {'error': done.stderr.strip().splitlines()[-3:]})
    print(f'{seconds:.0f} s of video: {results["lengths"][seconds]}', flush=True)
  rows = [(f'{s:.0f} s ({r.get("frames", "?")} frames)',
           ', '.join(f'{k} {v:.0f}' for k, v in r.get('frames_per_s', {}).items()),
           f'{r.get("wall_s", 0):.0f}', f'{r.get("peak_rss_mb", 0):.0f}')
          for s, r in results['lengths'].items()]
  print(common.format_table(('video', 'frames/s per stage', 'wall s', 'peak RSS MB'), rows))
  d = results['detector']
  ref = d.get('reference', {}).get('frames_per_s')
  print(f"decode frames/s: PyAV {results['decode']['pyav']:.0f}, OpenCV "
        f"{results['decode']['opencv']:.0f}; detector frames/s on {d['ours']['frames']} frames: "
        f"ours {d['ours']['frames_per_s']:.1f}" +
        (f", reference mtcnn {ref:.1f} (ratio {d['ours']['frames_per_s'] / ref:.2f}x)" if ref
         else f", reference: {d.get('reference_error', 'not run')}"))
  import jax  # pylint: disable=import-outside-toplevel
  print(f'{jax.devices()[0].device_kind}; command: {common.command_line()}')
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, 'bench_analyze.json'), 'w') as f:
      json.dump(results, f, indent=1)


if __name__ == '__main__':
  main()
