"""Random-access sources of Aff-Wild2 records (grain's `RandomAccessDataSource` protocol).

Every source is indexed by the row of an `AffWild2Index` and returns the record
`{'jpeg': bytes, 'expr': int32, 'au': int32 [12], 'va': float32 [2], 'index': int32}`:
- `JpegTreeSource`: reads `cropped_aligned/<video>/<frame>.jpg`; labels come from the index.
- `ArrayRecordSource`: shards written by `affectjax.data.pack`; the pack keeps the index it was
  made from, so any index of packed frames (e.g. built for fewer tasks) maps onto it, with its
  labels checked against the packed ones.
- `TfdsSource`: the `affwild2` TFDS dataset (`affectjax.data.tfds_builder`), read with
  `tfds.data_source` (no TensorFlow needed to read).
An unreadable image file gives `jpeg=b''`; the pipeline counts such records as bad frames.
"""
import hashlib
import json
import os
import struct

import numpy as np
from absl import logging

from affectjax import labels


SOURCES = ('jpeg', 'arrayrecord', 'tfds')  # data.source: a JPEG tree, packed shards, a TFDS dataset
PACK_FORMAT = 'affectjax.arrayrecord'
PACK_FORMAT_VERSION = 1
# Packed record: index int32, expr int8, au int8 [12], va float32 [2], little-endian, then JPEG.
_HEADER = struct.Struct('<ib12b2f')
# Random access needs one record per chunk; JPEG bytes do not compress further.
ARRAY_RECORD_WRITER_OPTIONS = 'group_size:1,uncompressed'


class DataError(RuntimeError):
  """Unusable input data: too many bad frames, or packed data that does not match the index."""


def manifest_path(packed_dir: str, split: str) -> str:
  return os.path.join(packed_dir, f'{split}_manifest.json')


def shard_name(split: str, shard: int, num_shards: int) -> str:
  return f'{split}.array_record-{shard:05d}-of-{num_shards:05d}'


def index_fingerprint(index) -> str:
  """sha1 over the index's videos, frames and labels: identifies the rows a pack was made from."""
  h = hashlib.sha1('\n'.join(index.video_names).encode())
  for column in (index.video_id, index.frame, index.expr, index.au, index.va):
    h.update(np.ascontiguousarray(column).tobytes())
  return h.hexdigest()


def make_record(jpeg: bytes, expr, au, va, row: int) -> dict:
  """The record dict every source returns."""
  return {'jpeg': jpeg, 'expr': np.int32(expr), 'au': np.asarray(au, np.int32),
          'va': np.asarray(va, np.float32), 'index': np.int32(row)}


def serialize_record(record: dict) -> bytes:
  """Fixed 25-byte label header followed by the JPEG bytes as they are."""
  return _HEADER.pack(int(record['index']), int(record['expr']),
                      *np.asarray(record['au']).tolist(),
                      *np.asarray(record['va'], np.float32).tolist()) + record['jpeg']


def parse_record(data: bytes) -> dict:
  """Inverse of `serialize_record`."""
  fields = _HEADER.unpack_from(data)
  return make_record(bytes(data[_HEADER.size:]), fields[1], fields[2:14], fields[14:16],
                     fields[0])


def read_bytes(path: str) -> bytes:
  """The file's bytes, or b'' if it cannot be read (counted as a bad frame downstream)."""
  # os.read skips the buffered file object: a third less CPU for a 5 KB crop.
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return b''
  try:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
      chunks.append(chunk)
    return b''.join(chunks)
  except OSError:
    return b''
  finally:
    os.close(fd)


class JpegTreeSource:
  """Records read from the Aff-Wild2 folder tree of `index.root`."""

  def __init__(self, index):
    self.index = index

  def __len__(self) -> int:
    return len(self.index)

  def __getitem__(self, row) -> dict:
    return self.__getitems__([row])[0]

  def __getitems__(self, rows) -> list:
    rows = np.asarray(rows, np.int64).reshape(-1)
    ix = self.index
    expr, au = ix.expr[rows].astype(np.int32), ix.au[rows].astype(np.int32)
    va, index = ix.va[rows], rows.astype(np.int32)
    return [{'jpeg': read_bytes(path), 'expr': expr[i], 'au': au[i], 'va': va[i],
             'index': index[i]} for i, path in enumerate(ix.image_paths(rows))]

  def __repr__(self) -> str:
    return f'JpegTreeSource(root={self.index.root!r}, split={self.index.split!r})'


def read_manifest(packed_dir: str, split: str) -> dict:
  path = manifest_path(packed_dir, split)
  try:
    with open(path) as f:
      manifest = json.load(f)
  except FileNotFoundError:
    raise DataError(f'{path} not found: pack the dataset first with\n  python -m '
                    f'affectjax.data.pack --root <Aff-Wild2 root> --out {packed_dir}') from None
  if manifest.get('format') != PACK_FORMAT or manifest.get('version') != PACK_FORMAT_VERSION:
    raise DataError(f'{path}: format {manifest.get("format")!r} version '
                    f'{manifest.get("version")!r}; this version of affectjax reads '
                    f'{PACK_FORMAT!r} version {PACK_FORMAT_VERSION}. Re-pack the dataset.')
  return manifest


def check_manifest(manifest: dict, index, where: str) -> None:
  """Raises DataError unless `index` is exactly the index the pack was made from."""
  if manifest['num_records'] != len(index) or manifest['index_fingerprint'] != (
      index_fingerprint(index)):
    raise DataError(f'{where} ({len(index)} rows) does not match its manifest '
                    f'({manifest["num_records"]} records): the pack is incomplete or was '
                    'modified; re-pack the dataset.')


def packed_index(packed_dir: str, split: str, root: str | None = None):
  """The AffWild2Index a split was packed from (no raw Aff-Wild2 tree needed)."""
  from affectjax.data import index as index_lib  # deferred: the index module is larger
  manifest = read_manifest(packed_dir, split)
  path = os.path.join(packed_dir, f'{split}_index.npz')
  index = index_lib.AffWild2Index.load(path, root)
  check_manifest(manifest, index, path)
  return index


def describe_pack(summary: dict) -> str:
  """'layout per_task, tasks expr,au,va, 7 EXPR classes' of a packed index's summary."""
  return (f"layout {summary.get('layout')}, tasks {','.join(summary.get('tasks', labels.TASKS))}, "
          f"{summary.get('num_expr_classes')} EXPR classes")


def pack_command(root: str, packed_dir: str, options: str = '') -> str:
  return f'python -m affectjax.data.pack --root {root} --out {packed_dir}{options}'


def check_packed_labels(packed, packed_dir: str, layout: str, tasks, num_expr_classes: int):
  """Raises DataError unless the labels a pack holds (those of the index it was made with)
  are the ones a run training from the pack alone (no data.root) wants."""
  s = packed.summary
  layout = s.get('layout') if layout == 'auto' else layout
  absent = [t for t in tasks if t not in s.get('tasks', labels.TASKS)]
  wrong = ([f'layout {layout}'] if layout != s.get('layout') else []) + (
      [f'{num_expr_classes} EXPR classes'] if num_expr_classes != s.get('num_expr_classes')
      else []) + ([f'tasks {",".join(absent)}'] if absent else [])
  if wrong:
    options = f' --layout {layout} --num-expr-classes {num_expr_classes} --tasks {",".join(tasks)}'
    raise DataError(
        f'{packed_dir} holds the labels of {describe_pack(s)}; this run wants '
        f'{" and ".join(wrong)}. The pack holds the frames of every layout, so set '
        f'data.root={packed.root} (the labels then come from its annotations), or pack these '
        f'labels: {pack_command(packed.root, f"{packed_dir}_{layout}_{num_expr_classes}", options)}')


def record_numbers(packed, index, where: str, fix: str) -> np.ndarray:
  """int64 [len(index)]: the record holding each row of `index` (matched by video and frame)
  in a pack made from the index `packed`. DataError (ending with `fix`) if a row was not
  packed, or if `index` was built with the pack's layout and EXPR class count and its labels of
  a packed task differ (other layouts and class counts take their labels from `index`)."""
  position = {name: i for i, name in enumerate(packed.video_names)}
  video_map = np.array([position.get(name, -1) for name in index.video_names], np.int64)
  keys = (video_map[index.video_id] << 32) | index.frame.astype(np.int64)
  packed_keys = (packed.video_id.astype(np.int64) << 32) | packed.frame.astype(np.int64)
  order = np.argsort(packed_keys, kind='stable')
  slot = np.minimum(np.searchsorted(packed_keys[order], keys), max(len(order) - 1, 0))
  records = order[slot] if len(order) else np.zeros(len(index), np.int64)
  missing = np.flatnonzero(packed_keys[records] != keys) if len(order) else np.arange(len(index))
  made = packed.summary
  if missing.size:
    raise DataError(
        f'{missing.size} of {len(index)} frames of the index are not in {where} (made from '
        f'{packed.root} with {describe_pack(made)}), e.g. {index.image_path(missing[0])}: '
        f'annotations or crops were added since, or it was made by an affectjax whose packs '
        f'held only the frames of one layout; {fix}')
  same = all(index.summary.get(k) == made.get(k) for k in ('layout', 'num_expr_classes'))
  tasks = [t for t in index.summary.get('tasks', labels.TASKS)
           if t in made.get('tasks', labels.TASKS)] if same else []
  differs = np.zeros(len(index), bool)
  for task in tasks:
    packed_values, values = getattr(packed, task)[records], getattr(index, task)
    differs |= (packed_values != values).reshape(len(index), -1).any(axis=1)
  if differs.any():
    row = int(np.flatnonzero(differs)[0])
    raise DataError(f'{int(differs.sum())} frames have other {"/".join(tasks)} labels in {where} '
                    f'than in the index, e.g. {index.image_path(row)} (the annotations changed '
                    f'since): {fix}')
  return records


def _relabel(record: dict, index, row: int) -> dict:
  """A packed record as row `row` of another index of the same frames (labels from `index`)."""
  return make_record(record['jpeg'], index.expr[row], index.au[row], index.va[row], row)


class ArrayRecordSource:
  """Records from packed ArrayRecord shards.

  With `index`, row i is the index's row i: directly when the pack was made from this very
  index, else through `record_numbers` (any index of packed frames, e.g. built for fewer tasks;
  labels then come from `index`). Without `index`, record i as packed.
  """

  def __init__(self, packed_dir: str, split: str, index=None):
    import grain  # deferred: keeps `import affectjax.data.sources` light
    self.manifest = read_manifest(packed_dir, split)
    paths = [os.path.join(packed_dir, name) for name in self.manifest['shards']]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
      raise DataError(f'packed shards missing: {missing[:3]} ({len(missing)} of {len(paths)})')
    self._records = grain.sources.ArrayRecordDataSource(paths)
    if len(self._records) != self.manifest['num_records']:
      raise DataError(f'{packed_dir}: shards hold {len(self._records)} records, manifest says '
                      f'{self.manifest["num_records"]}; re-pack the dataset.')
    self._index, self._record_of = index, None
    if index is not None and self.manifest['index_fingerprint'] != index_fingerprint(index):
      self._record_of = record_numbers(
          packed_index(packed_dir, split), index, os.path.join(packed_dir, f'{split}_*'),
          're-pack: ' + pack_command(index.root, packed_dir))

  def __len__(self) -> int:
    return len(self._records) if self._record_of is None else len(self._record_of)

  def __getitem__(self, row) -> dict:
    if self._record_of is None:
      return parse_record(self._records[int(row)])
    return _relabel(parse_record(self._records[int(self._record_of[row])]), self._index, row)

  def __getitems__(self, rows) -> list:
    # One read per record: array_record's batched read starts a thread pool per call, which
    # costs more than it saves for ~5 KB records (measured by benchmarks/bench_pipeline.py).
    return [self[r] for r in rows]

  def __repr__(self) -> str:
    return f'ArrayRecordSource({self._records!r}, {self.manifest["num_records"]} records)'


def record_from_tfds_example(example: dict) -> dict:
  """Maps an `affwild2` TFDS example (image left encoded) to the record dict."""
  return make_record(bytes(example['image']), example['expr'], example['au'], example['va'],
                     example['index'])


class TfdsSource:
  """Records of the `affwild2` TFDS dataset, whose examples are the rows of `prepared_index`
  in order (the builder's all-task index; shuffling disabled). `index` (default: the prepared
  one) may be any index of its frames, as for `ArrayRecordSource`."""

  def __init__(self, data_dir: str, split: str, config_name: str, index=None,
               data_source=None, prepared_index=None):
    if data_source is None:
      import tensorflow_datasets as tfds  # deferred: optional `tfds` extra
      from affectjax.data import tfds_builder  # registers the `affwild2` builder
      if not tfds_builder.Affwild2(config=config_name, data_dir=data_dir).is_prepared():
        raise DataError(
            f'no prepared TFDS dataset {tfds_builder.Affwild2.name}/{config_name} in {data_dir} '
            f'(data.packed_dir): prepare it with python -m affectjax.data.tfds_builder --root '
            f'<Aff-Wild2 root> --config {config_name} --data_dir {data_dir}')
      data_source = tfds.data_source(
          f'{tfds_builder.Affwild2.name}/{config_name}', split=split, data_dir=data_dir,
          decoders={'image': tfds.decode.SkipDecoding()}, download=False)
    self._examples, self._index, self._record_of = data_source, index, None
    prepared = index if prepared_index is None else prepared_index
    if prepared is None:
      return
    where = f'TFDS affwild2/{config_name} {split}'
    if len(data_source) != len(prepared):
      raise DataError(f'{where} has {len(data_source)} examples, the index it should hold '
                      f'{len(prepared)} rows: prepare it from the same data and settings.')
    for row in {0, len(prepared) - 1} if len(prepared) else ():
      record = record_from_tfds_example(data_source[row])
      if (int(record['index']) != row or int(record['expr']) != int(prepared.expr[row])
          or not np.array_equal(record['au'], prepared.au[row])):
        raise DataError(f'{where} example {row} does not match the index row: prepare it from '
                        'the same data and settings.')
    if index is not None and prepared is not index:
      self._record_of = record_numbers(prepared, index, where, 'prepare it again (python -m '
                                       'affectjax.data.tfds_builder)')

  def __len__(self) -> int:
    return len(self._examples) if self._record_of is None else len(self._record_of)

  def __getitem__(self, row) -> dict:
    if self._record_of is None:
      return record_from_tfds_example(self._examples[int(row)])
    example = record_from_tfds_example(self._examples[int(self._record_of[row])])
    return _relabel(example, self._index, row)

  def __getitems__(self, rows) -> list:
    return [self[r] for r in rows]


def make_source(index, data_config, source_type: str | None = None):
  """The source named by `source_type` or else `data_config.source` ('jpeg' | 'arrayrecord' |
  'tfds') for `index`; with `data_config.decoded_cache`, the decoded-frame cache built from it
  (on first use)."""
  kind = source_type or data_config.source
  if kind == 'jpeg':
    source, origin = JpegTreeSource(index), f'jpeg:{os.path.abspath(index.root)}'
  elif kind in ('arrayrecord', 'tfds'):
    if not data_config.packed_dir:
      raise ValueError(f"data.source={kind!r} needs data.packed_dir"
                       + (' (the TFDS data_dir)' if kind == 'tfds' else ''))
    source = (ArrayRecordSource(data_config.packed_dir, index.split, index)
              if kind == 'arrayrecord' else _tfds_source(index, data_config))
    origin = f'{kind}:{os.path.abspath(data_config.packed_dir)}'
  else:
    raise ValueError(f'data.source must be one of {SOURCES}, got {kind!r}')
  if not data_config.get('decoded_cache', False):
    return source
  from affectjax.data import decoded_cache  # deferred: only the cache needs it
  return decoded_cache.build(source, index, int(data_config.image_size),
                             decoded_cache.cache_folder(data_config), origin)


def _tfds_source(index, data_config) -> TfdsSource:
  from affectjax.data import index as index_lib  # deferred: only TFDS needs to rebuild
  from affectjax.data import tfds_builder
  summary = index.summary
  prepared = index_lib.build_index(  # the builder's index: all tasks (cached, so cheap)
      index.root, index.split, layout=summary['layout'], tasks=labels.TASKS,
      num_expr_classes=summary['num_expr_classes'], check_images=summary['check_images'],
      cache_dir=data_config.cache_dir or None)
  name = tfds_builder.config_name(summary['layout'], summary['num_expr_classes'])
  return TfdsSource(data_config.packed_dir, index.split, name, index, prepared_index=prepared)


BAD_FRAME_FLOOR = 10  # bad frames always tolerated when max_bad_frame_fraction > 0
_MAX_WARNINGS = 10


def allowed_bad_frames(read: int, max_fraction: float) -> float:
  """Bad frames tolerated after `read` frames: the fraction, with a floor of BAD_FRAME_FLOOR."""
  if max_fraction <= 0:
    return 0
  return max(BAD_FRAME_FLOOR, max_fraction * read)


class BadFrameCounter:
  """Frames read and bad frames seen by an iterator; raises DataError above the tolerance."""

  def __init__(self, max_fraction: float, read: int = 0, bad: int = 0):
    self.max_fraction = float(max_fraction)
    self.read, self.bad = int(read), int(bad)
    self.last_path = None
    self._warned = set()

  def add(self, num_read: int, bad_paths: list) -> None:
    self.read += int(num_read)
    self.bad += len(bad_paths)
    for path in bad_paths:
      self.last_path = path
      if path not in self._warned and len(self._warned) < _MAX_WARNINGS:
        self._warned.add(path)
        more = ' (further bad frames are not logged one by one)' if len(
            self._warned) == _MAX_WARNINGS else ''
        logging.warning('Skipping a frame that cannot be read or decoded: %s%s', path, more)
    if bad_paths and self.bad > allowed_bad_frames(self.read, self.max_fraction):
      raise DataError(
          f'{self.bad} of {self.read} frames read so far could not be read or decoded '
          f'({self.bad / self.read:.1%} > data.max_bad_frame_fraction={self.max_fraction}' +
          (f', beyond the first {BAD_FRAME_FLOOR} tolerated' if self.max_fraction > 0 else '') +
          f'); latest: {self.last_path}')
