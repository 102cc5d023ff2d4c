"""Benchmark: host input pipeline images/s per core at 112x112 (decode + flip + rotation + batch).

Candidates, timed in turn within each repetition on the same frames (a synthetic Aff-Wild2 of
112x112 JPEG crops, in the page cache), all single-threaded in this process:
- `decoder alone`: simplejpeg decode of in-memory JPEG bytes (the ceiling);
- `grain, JPEG tree` / `grain, ArrayRecord`: `make_train_iterator` with worker_count=0,
  read_threads=0, augment flip + rotation up to 10 degrees (bilinear, or nearest as
  torchvision's RandomRotation), uint8 batches of 256; and flip only, leaving rotation to the
  device (affectjax.models.preprocess.augment);
- `grain, decoded cache`: the same iterator reading pixels decoded once into a memory map
  (`data.decoded_cache`, affectjax.data.decoded_cache), with the rotation or flip only;
- `torchvision-style chain`: per sample PIL open + convert, Resize(112) (a no-op at 112, as in
  torchvision), RandomHorizontalFlip, RandomRotation(10) (PIL NEAREST), ToTensor, Normalize
  (float32), default collate (torch.stack), torch.set_num_threads(1).
Also a decoder table (PIL, OpenCV, simplejpeg and its fast modes, with their pixel error).

  python benchmarks/bench_pipeline.py            # about a minute
  python benchmarks/bench_pipeline.py --reps 3 --images 1024
"""
import argparse
import datetime
import io
import os
import platform
import statistics
import tempfile

import cv2
import numpy as np
import simplejpeg
import torch
from PIL import Image

import common
from affectjax.data import index as index_lib
from affectjax.data import pack
from affectjax.data import pipeline
from affectjax.data.synthetic import generate

_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)
DECODER = 'decoder alone (simplejpeg, in memory)'
TORCH = 'torchvision-style chain'


def torchvision_style_sample(path: str, label_row: tuple, rotate_deg: float):
  """One `Dataset.__getitem__` of the torchvision chain, transforms as torchvision applies them."""
  with open(path, 'rb') as f:  # torchvision's default_loader
    image = Image.open(f).convert('RGB')
  if list(image.size[::-1]) != [112, 112]:  # Resize(112): returns the image when already 112
    image = image.resize((112, 112), Image.BILINEAR)
  if torch.rand(1) < 0.5:  # RandomHorizontalFlip
    image = image.transpose(Image.FLIP_LEFT_RIGHT)
  angle = float(torch.empty(1).uniform_(-rotate_deg, rotate_deg).item())  # RandomRotation
  image = image.rotate(angle, Image.NEAREST, expand=False, center=None, fillcolor=(0, 0, 0))
  tensor = torch.from_numpy(np.array(image, np.uint8, copy=True))  # ToTensor
  tensor = tensor.view(image.size[1], image.size[0], 3).permute((2, 0, 1)).contiguous()
  tensor = tensor.to(dtype=torch.float32).div(255)
  mean = torch.as_tensor(_MEAN, dtype=tensor.dtype).view(-1, 1, 1)  # Normalize
  std = torch.as_tensor(_STD, dtype=tensor.dtype).view(-1, 1, 1)
  tensor = tensor.sub_(mean).div_(std)
  expr, au, va = label_row
  return tensor, torch.tensor(expr), torch.from_numpy(au), torch.from_numpy(va)


def torchvision_style_batches(index, batch_size: int, rotate_deg: float, seed: int):
  """Endless batches of the torchvision chain over a shuffled order, collated by torch.stack."""
  rng = np.random.default_rng(seed)
  paths = index.image_paths()
  label_rows = [(int(index.expr[i]), index.au[i].astype(np.int64), index.va[i])
                for i in range(len(index))]
  while True:
    order = rng.permutation(len(index))
    for start in range(0, len(order) - batch_size + 1, batch_size):
      samples = [torchvision_style_sample(paths[i], label_rows[i], rotate_deg)
                 for i in order[start:start + batch_size]]
      yield tuple(torch.stack(column) for column in zip(*samples))


def decoder_table(jpegs: list, reps: int) -> list:
  """Rows (decoder, img/s, mean / max abs difference to PIL) on the in-memory JPEGs."""
  arrays = [np.frombuffer(j, np.uint8) for j in jpegs]
  decoders = {
      'PIL': lambda j, a: np.asarray(Image.open(io.BytesIO(j)).convert('RGB')),
      'OpenCV (imdecode + BGR2RGB)': lambda j, a: cv2.cvtColor(cv2.imdecode(a, cv2.IMREAD_COLOR),
                                                             cv2.COLOR_BGR2RGB),
      'simplejpeg (chosen)': lambda j, a: simplejpeg.decode_jpeg(j, 'RGB'),
      'simplejpeg fastdct': lambda j, a: simplejpeg.decode_jpeg(j, 'RGB', fastdct=True),
      'simplejpeg fastdct+fastupsample': lambda j, a: simplejpeg.decode_jpeg(
          j, 'RGB', fastdct=True, fastupsample=True),
  }
  runs = {name: (lambda fn=fn: [fn(j, a) for j, a in zip(jpegs, arrays)])
          for name, fn in decoders.items()}
  _, times = common.interleaved_times(runs, reps)  # CPU seconds: per core
  reference = [decoders['PIL'](j, a).astype(np.int16) for j, a in zip(jpegs[:200], arrays)]
  rows = []
  for name, fn in decoders.items():
    diffs = [np.abs(fn(j, a).astype(np.int16) - r) for j, a, r in zip(jpegs, arrays, reference)]
    rows.append((name, f'{len(jpegs) / statistics.median(times[name]):,.0f}',
                 f'{np.mean([d.mean() for d in diffs]):.2f}', int(max(d.max() for d in diffs))))
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--root', default='', help='Aff-Wild2 root (default: synthetic)')
  parser.add_argument('--work-dir', default=os.path.join(tempfile.gettempdir(), 'bench_pipeline'))
  parser.add_argument('--images', type=int, default=2048, help='images per timed run')
  parser.add_argument('--batch', type=int, default=256)
  parser.add_argument('--reps', type=int, default=7)
  parser.add_argument('--rotate-deg', type=float, default=10.0)
  args = parser.parse_args()
  torch.set_num_threads(1)
  root = args.root or generate.ensure_synthetic(args.work_dir, progress=False, num_videos=24,
                                                frames_per_video=150, seed=0)
  index = index_lib.build_index(root, 'train', num_expr_classes=7,
                                cache_dir=os.path.join(args.work_dir, 'index_cache'))
  packed_dir = os.path.join(args.work_dir, 'packed')
  pack.pack_split(index, packed_dir, num_shards=2, progress=False)
  jpegs = [open(p, 'rb').read() for p in index.image_paths()]
  steps = max(1, args.images // args.batch)
  images = steps * args.batch

  config = pipeline.default_data_config()
  config.read_threads = 0
  config.worker_count = 0
  config.augment.flip = True
  config.augment.rotate_deg = args.rotate_deg
  config.packed_dir = packed_dir
  decode_pool = (jpegs * (images // len(jpegs) + 1))[:images]
  runs = {DECODER: lambda: [simplejpeg.decode_jpeg(j, 'RGB') for j in decode_pool]}
  for source, source_name in (('jpeg', 'JPEG tree'), ('arrayrecord', 'ArrayRecord')):
    for interpolation in ('bilinear', 'nearest'):
      config.source, config.augment.interpolation = source, interpolation
      it = pipeline.make_train_iterator(index, config, global_batch_size=args.batch, seed=0)
      runs[f'grain, {source_name}, {interpolation} rotation'] = (
          lambda it=it: [next(it) for _ in range(steps)])
  config.source, config.augment.rotate_deg = 'jpeg', 0.0
  flip_only = pipeline.make_train_iterator(index, config, global_batch_size=args.batch, seed=0)
  runs['grain, JPEG tree, flip only (rotate on device)'] = (
      lambda: [next(flip_only) for _ in range(steps)])
  # The decoded-frame cache (built once here, before timing): pixels read from a memory map.
  config.decoded_cache, config.decoded_cache_dir = True, os.path.join(args.work_dir, 'decoded')
  for rotate_deg, name in ((args.rotate_deg, 'bilinear rotation'), (0.0, 'flip only')):
    config.augment.rotate_deg, config.augment.interpolation = rotate_deg, 'bilinear'
    it = pipeline.make_train_iterator(index, config, global_batch_size=args.batch, seed=0)
    runs[f'grain, decoded cache, {name}'] = lambda it=it: [next(it) for _ in range(steps)]
  torch_batches = torchvision_style_batches(index, args.batch, args.rotate_deg, seed=0)
  runs[TORCH] = lambda: [next(torch_batches) for _ in range(steps)]
  wall, cpu = common.interleaved_times(runs, args.reps)
  rows = []
  for name in runs:
    rows.append((name, f'{images / statistics.median(cpu[name]):,.0f}',
                 f'{common.paired_ratio(cpu, name, TORCH):.2f}',
                 f'{common.paired_ratio(cpu, name, DECODER):.2f}',
                 f'{images / statistics.median(wall[name]):,.0f}',
                 f'{common.paired_ratio(wall, name, TORCH):.2f}'))
  print(f'\n{datetime.date.today()}  {platform.processor() or platform.machine()}, '
        f'{os.cpu_count()} cores; {len(index)} frames of 112x112, {images} images per run, '
        f'batch {args.batch}, {args.reps} repetitions (medians; per core = per CPU-second of '
        'this single-threaded process)')
  print(common.format_table(
      ('pipeline', 'img/s per core', 'x torchvision', 'x decoder alone', 'img/s wall',
       'x torchvision (wall)'), rows))
  print('\nDecoders on the same in-memory crops (difference to PIL over 200 images):')
  print(common.format_table(('decoder', 'img/s per core', 'mean |diff|', 'max |diff|'),
                            decoder_table(jpegs[:500], args.reps)))
  print(f'\ncommand: {common.command_line()}')


if __name__ == '__main__':
  main()
