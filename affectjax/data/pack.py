"""Packs Aff-Wild2 frames into ArrayRecord shards for fast random access.

  python -m affectjax.data.pack --root /data/affwild2 --out /data/affwild2_packed --split both

Per split: `<split>.array_record-SSSSS-of-NNNNN` shards holding index row i as record i (label
header + the JPEG bytes as they are, see `sources.serialize_record`), `<split>_index.npz` (the
index they were packed from, loadable without the raw tree: `sources.packed_index`), and
`<split>_manifest.json` (format version, counts, index summary and fingerprint), written last,
which `sources.ArrayRecordSource` validates.

Every frame with a crop that any config of the root uses is packed (both annotation layouts,
7 or 8 EXPR classes, every task: `frames_of_every_config`), so one pack serves every config;
`--layout`, `--tasks` and `--num-expr-classes` choose the labels the records carry, which a run
uses when it trains from the pack alone (no `data.root`); the class count is by default 8 where
the EXPR labels hold Other (ABAW3 onwards), else 7. A wrong root or a malformed
annotation line ends with `error: ...` and status 1.
"""
import argparse
import concurrent.futures
import datetime
import json
import math
import os
import time

import tqdm

from affectjax import files
from affectjax import labels
from affectjax import logs
from affectjax.data import annotations
from affectjax.data import index as index_lib
from affectjax.data import layout as layout_lib
from affectjax.data import sources

_READ_CHUNK = 4096  # paths read concurrently at a time (bounds memory)


def frames_of_every_config(index, cache_dir=None):
  """`index` plus, unlabelled, every frame with a crop that another config of its root labels
  (the other annotation layout, tasks not packed, the Other class of 8-class EXPR): packed
  with them, one pack serves every config of the root (the labels of other configs come from
  the root's annotations at training time). Each layout is read with 8 EXPR classes, whose
  frames include those of 7 (a file with Other cannot be read as 7 classes)."""
  others = []
  for layout in ('per_task', 'mtl'):
    try:
      others.append(index_lib.build_index(index.root, index.split, layout=layout,
                                          num_expr_classes=8, cache_dir=cache_dir))
    except layout_lib.DatasetLayoutError:
      continue  # the root does not hold this layout (or all of its tasks)
  return index_lib.union_frames(index, others)


def expr_classes_of(root, splits, layout: str, tasks, cache_dir=None) -> int:
  """8 where the EXPR labels of `splits` hold Other (7: ABAW3 onwards), else 7 (ABAW1/2); 7
  where the packed labels have no EXPR."""
  if 'expr' not in tasks:
    return 7
  return 8 if any((index_lib.build_index(root, split, layout=layout, tasks=tasks,
                                         num_expr_classes=8, cache_dir=cache_dir).expr == 7).any()
                  for split in splits) else 7


def default_num_shards(num_records: int) -> int:
  """About 100k frames (~0.5 GB of 112x112 crops) per shard."""
  return max(1, math.ceil(num_records / 100_000))


def _shard_bounds(num_records: int, num_shards: int) -> list:
  edges = [num_records * s // num_shards for s in range(num_shards + 1)]
  return list(zip(edges[:-1], edges[1:]))


def pack_split(index, out_dir: str, *, num_shards: int = 0, threads: int = 8,
               progress: bool = True) -> dict:
  """Writes `index`'s frames as shards + index + manifest under out_dir; returns the manifest.

  Each shard is written under a temporary name and renamed when complete; on any failure (a
  full disk: `files.DiskFullError`, Ctrl-C) the shards of this call are removed again, so
  neither partial shards nor a manifest of an incomplete pack are left."""
  os.makedirs(out_dir, exist_ok=True)
  split, n = index.split, len(index)
  num_shards = num_shards or default_num_shards(n)
  names = [sources.shard_name(split, s, num_shards) for s in range(num_shards)]
  manifest_file = sources.manifest_path(out_dir, split)
  files.remove(manifest_file)  # the pack is incomplete until the manifest is rewritten
  try:
    manifest = _write_split(index, out_dir, names, threads, progress)
    with files.atomic_write(manifest_file) as f:
      json.dump(manifest, f, indent=1)
  except BaseException as e:
    for name in names:
      files.remove(os.path.join(out_dir, name))
    if files.is_disk_full(e):
      raise files.disk_full_error(
          f'the packed {split} split', out_dir,
          'pack to a larger disk (--out), or free space there') from e
    raise
  return manifest


def _write_split(index, out_dir: str, names: list, threads: int, progress: bool) -> dict:
  from array_record.python import array_record_module  # deferred: only packing writes
  split, n = index.split, len(index)
  start, total_bytes, unreadable_paths = time.perf_counter(), 0, []
  with concurrent.futures.ThreadPoolExecutor(threads) as pool, tqdm.tqdm(
      total=n, unit='frame', desc=f'packing {split}', disable=not progress) as bar:
    for name, (lo, hi) in zip(names, _shard_bounds(n, len(names))):
      with files.atomic_path(os.path.join(out_dir, name)) as tmp:
        writer = array_record_module.ArrayRecordWriter(tmp, sources.ARRAY_RECORD_WRITER_OPTIONS)
        try:
          for chunk in range(lo, hi, _READ_CHUNK):
            rows = range(chunk, min(chunk + _READ_CHUNK, hi))
            paths = index.image_paths(list(rows))
            for row, path, jpeg in zip(rows, paths, pool.map(sources.read_bytes, paths)):
              if not jpeg:
                unreadable_paths.append(path)
              total_bytes += len(jpeg)
              writer.write(sources.serialize_record(sources.make_record(
                  jpeg, index.expr[row], index.au[row], index.va[row], row)))
            bar.update(len(rows))
        finally:
          writer.close()
  index.save(os.path.join(out_dir, f'{split}_index.npz'))
  return {
      'format': sources.PACK_FORMAT, 'version': sources.PACK_FORMAT_VERSION, 'split': split,
      'num_records': n, 'shards': names, 'jpeg_bytes': total_bytes,
      'unreadable_frames': len(unreadable_paths), 'unreadable_examples': unreadable_paths[:10],
      'index_fingerprint': sources.index_fingerprint(index), 'index_summary': index.summary,
      'root': index.root, 'created': datetime.datetime.now().isoformat(timespec='seconds'),
      'seconds': round(time.perf_counter() - start, 2),
  }


def format_summary(manifest: dict, out_dir: str) -> str:
  m, seconds = manifest, max(manifest['seconds'], 1e-9)
  line = (f"{m['split']}: {m['num_records']} frames in {len(m['shards'])} shards, "
          f"{logs.format_bytes(m['jpeg_bytes'])} of JPEG, {seconds:.1f} s "
          f"({m['num_records'] / seconds:.0f} frames/s) -> {out_dir}")
  if m['unreadable_frames']:
    line += (f"\n  WARNING: {m['unreadable_frames']} unreadable images packed as empty records "
             f"(skipped at training time), e.g. {m['unreadable_examples'][:3]}")
  return line


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--root', required=True, help='Aff-Wild2 root (cropped_aligned/, annotations)')
  parser.add_argument('--out', required=True, help='output folder for shards and manifests')
  parser.add_argument('--split', default='both', choices=('train', 'validation', 'both'))
  # The pack holds the frames of every layout, task and class count of the root; these choose
  # the labels it carries for training from the pack alone (without data.root).
  parser.add_argument('--layout', default='auto', choices=('auto', 'per_task', 'mtl'),
                      help='annotations whose labels the records carry')
  parser.add_argument('--tasks', default=','.join(labels.TASKS),
                      help='comma-separated tasks whose labels the records carry')
  parser.add_argument('--num-expr-classes', default='auto', choices=('auto', '7', '8'),
                      help='EXPR classes of the labels the records carry; auto: 8 where the '
                      "root's EXPR labels hold Other (7, ABAW3 onwards), else 7")
  parser.add_argument('--shards', type=int, default=0, help='shards per split (0 = ~100k frames each)')
  parser.add_argument('--threads', type=int, default=8, help='concurrent file reads')
  parser.add_argument('--cache-dir', default=None, help='where build_index caches the index')
  args = parser.parse_args(argv)
  tasks = labels.parse_tasks(args.tasks)
  splits = ('train', 'validation') if args.split == 'both' else (args.split,)
  manifests = []
  try:
    num_classes = (expr_classes_of(args.root, splits, args.layout, tasks, args.cache_dir)
                   if args.num_expr_classes == 'auto' else int(args.num_expr_classes))
  except (layout_lib.DatasetLayoutError, annotations.AnnotationError) as e:
    parser.exit(1, f'error: {e}\n')
  for split in splits:
    try:
      index = index_lib.build_index(args.root, split, layout=args.layout, tasks=tasks,
                                    num_expr_classes=num_classes, cache_dir=args.cache_dir)
      index = frames_of_every_config(index, args.cache_dir)
      print(index.describe(), flush=True)
      manifests.append(pack_split(index, args.out, num_shards=args.shards,
                                  threads=args.threads))
    except (files.DiskFullError, layout_lib.DatasetLayoutError,
            annotations.AnnotationError) as e:
      parser.exit(1, f'error: {e}\n')
    print(format_summary(manifests[-1], args.out))
  print(f'packed {sum(m["num_records"] for m in manifests)} frames '
        f'({", ".join(m["split"] for m in manifests)}) into {args.out}; train from them with '
        f'--config.data.source=arrayrecord --config.data.packed_dir={args.out}')


if __name__ == '__main__':
  main()
