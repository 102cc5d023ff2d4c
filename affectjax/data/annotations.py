"""Vectorised parsers for the Aff-Wild2 annotation files, with errors that name file and line.

Per-task files (`<video>.txt`): a header line (skipped, content not relied on), then line k is
frame k. s-Aff-Wild2 files: a header, then rows `video/00001.jpg,v,a,e,au1,...,au12`.
A file is read whole and parsed with NumPy: the small integers of EXPR and AU through a fixed
grid of bytes (after `-1` -> one byte), everything else with `np.fromstring`, and the field count
of every line from the positions of the separators. The slow per-line pass runs only after a
vectorised check failed, to name the first bad line. Windows line endings and trailing blank lines
are tolerated.
"""
import dataclasses
import re

import numpy as np

from affectjax import labels

MTL_HEADER = ('image', 'valence', 'arousal', 'expression') + labels.AU_NAMES

_COMMA, _NEWLINE, _SLASH = ord(','), ord('\n'), ord('/')
_MINUS_ONE = b'm'  # stands for '-1' in the grid parser; any other byte but 0-9 is rejected
_GRID_VALUE = np.full(256, 127, np.int8)  # byte -> value in the grid parser, 127 = not one
_GRID_VALUE[ord('0'):ord('9') + 1] = np.arange(10)
_GRID_VALUE[ord(_MINUS_ONE)] = -1
_PATH_CHUNK_ROWS = 1 << 16  # bounds the [rows, path_width] temporaries of the path parser
_LOOKS_NUMERIC = re.compile(rb'[\s\d.,+\-]+')


class AnnotationError(ValueError):
  """A malformed or out-of-range annotation; the message names the file and the 1-based line."""


def line_error(path: str, lineno: int, reason: str, text: bytes) -> AnnotationError:
  shown = text.decode('utf-8', 'replace')
  return AnnotationError(f'{path}, line {lineno}: {reason}\n    {shown!r}')


class Table:
  """A comma-separated file after its header. Data row r (0-based) is line r + 2 of the file.

  `numeric_cols` (a slice) names the columns that must hold numbers, for error messages.
  """

  def __init__(self, path: str, num_cols: int, numeric_cols: slice):
    with open(path, 'rb') as f:
      data = f.read().replace(b'\r', b'')
    header, _, text = data.partition(b'\n')
    if header.strip() and _LOOKS_NUMERIC.fullmatch(header):
      raise line_error(path, 1, 'expected a header line, found numbers (is the header missing?)',
                       header)
    self.path, self.num_cols, self.numeric_cols = path, num_cols, numeric_cols
    self.header, self.text = header, text.rstrip(b'\n \t')
    self.num_rows = self.text.count(b'\n') + 1 if self.text else 0
    self._seps = None

  @property
  def body(self) -> np.ndarray:
    """uint8 [num_bytes] view of `text`."""
    return np.frombuffer(self.text, np.uint8)

  @property
  def seps(self) -> np.ndarray:
    """int64 [rows * cols - 1] offsets of the commas and newlines, in order."""
    if self._seps is None:
      self.check_field_counts()
    return self._seps

  def check_field_counts(self) -> None:
    """Raises AnnotationError naming the first line without `num_cols` fields."""
    if self._seps is not None:
      return
    if not self.num_rows:
      self._seps = np.zeros(0, np.int64)
      return
    seps = np.flatnonzero((self.body == _COMMA) | (self.body == _NEWLINE))
    newline_at = np.flatnonzero(self.body[seps] == _NEWLINE)
    if (seps.size + 1 != self.num_rows * self.num_cols or
        not np.array_equal(newline_at, np.arange(self.num_cols - 1, seps.size, self.num_cols))):
      raise self.explain()
    self._seps = seps

  def field_bounds(self, cols: slice):
    """(starts, ends) int64 [rows, n] byte offsets of the fields in `cols` (end exclusive)."""
    bounds = np.empty(self.seps.size + 2, np.int64)
    bounds[0], bounds[1:-1], bounds[-1] = -1, self.seps, self.body.size
    starts = (bounds[:-1] + 1).reshape(self.num_rows, self.num_cols)
    ends = bounds[1:].reshape(self.num_rows, self.num_cols)
    return starts[:, cols], ends[:, cols]

  def columns_text(self, cols: slice) -> bytes:
    """The text of columns `cols` only, rows still separated by newlines."""
    if cols.stop - cols.start == self.num_cols or not self.num_rows:
      return self.text
    starts, ends = self.field_bounds(cols)
    start, stop = starts[:, 0], np.minimum(ends[:, -1] + 1, self.body.size)  # with separator
    marks = np.zeros(self.body.size + 1, np.int8)  # +1 where a row's part starts, -1 after it
    marks[start], marks[stop] = 1, -1
    text = self.body[np.cumsum(marks[:-1], dtype=np.int8) > 0]
    row_ends = np.cumsum(stop - start) - 1
    text[row_ends] = _NEWLINE
    return text[:-1].tobytes() if stop[-1] > ends[-1, -1] else text.tobytes()

  def error(self, row: int, reason: str) -> AnnotationError:
    """An AnnotationError for data row `row` (0-based), showing the line's text."""
    return line_error(self.path, row + 2, reason, self.text.split(b'\n', row + 1)[row])

  def explain(self) -> AnnotationError:
    """Slow pass after a failed vectorised check: the error for the first bad line."""
    for row, line in enumerate(self.text.split(b'\n')):
      fields = line.split(b',')
      if len(fields) != self.num_cols:
        return self.error(row, f'expected {self.num_cols} comma-separated fields, '
                               f'found {len(fields)}')
      for col, field in enumerate(fields[self.numeric_cols], start=self.numeric_cols.start):
        if _strtod(field, 1) is None:
          return self.error(row, f'field {col + 1} is not a number: {field!r}')
    return AnnotationError(f'{self.path}: could not parse the file (no single bad line found)')


def _strtod(text: bytes, count: int):
  """float64 [count] of comma/newline-separated numbers, or None if they are not exactly that."""
  try:
    values = np.fromstring(text.replace(b'\n', b','), dtype=np.float64, sep=',')
  except ValueError:
    return None
  ok = values.size == count and bool(text.strip()) and not text.endswith((b',', b'\n'))
  return values if ok else None


def _grid_ints(text: bytes, rows: int, width: int):
  """int8 [rows, width] when every field is one of -1, 0..9 (the EXPR and AU files); else None.

  With '-1' written as one byte, such a file is a [rows, 2 * width] grid of bytes: value, comma,
  value, ..., newline, so it parses and validates with strided views instead of token offsets.
  """
  if _MINUS_ONE in text:
    return None
  text = text.replace(b'-1', _MINUS_ONE)
  if len(text) != rows * 2 * width - 1:
    return None
  grid = np.frombuffer(text + b'\n', np.uint8).reshape(rows, 2 * width)
  values = _GRID_VALUE[grid[:, 0::2]]
  seps = grid[:, 1::2]
  if (values == 127).any() or (seps[:, :-1] != _COMMA).any() or (seps[:, -1] != _NEWLINE).any():
    return None
  return values


def parse_numbers(table: Table, cols: slice) -> np.ndarray:
  """float64 [rows, n] of the contiguous columns `cols`; AnnotationError names a bad line."""
  width = cols.stop - cols.start
  if not table.num_rows:
    return np.zeros((0, width))
  table.check_field_counts()
  values = _strtod(table.columns_text(cols), table.num_rows * width)
  if values is None:
    raise table.explain()
  return values.reshape(table.num_rows, width)


def parse_ints(table: Table, cols: slice, what: str) -> np.ndarray:
  """Integers [rows, n] (int8 or int64) of the contiguous columns `cols`."""
  width = cols.stop - cols.start
  values = _grid_ints(table.columns_text(cols), table.num_rows, width) if table.num_rows else (
      np.zeros((0, width), np.int8))
  if values is not None:
    return values
  values = parse_numbers(table, cols)
  integral = (values == np.round(values)) & (np.abs(values) < 2**31)
  check_rows(table, ~integral.all(axis=1), f'{what} must be integers')
  return values.astype(np.int64)


def check_rows(table: Table, bad: np.ndarray, reason: str) -> None:
  """Raises AnnotationError for the first row where `bad` (bool [rows]) is set."""
  if bad.any():
    raise table.error(int(np.argmax(bad)), reason)


def expr_values(table: Table, cols: slice, num_classes: int) -> np.ndarray:
  """int8 [rows] expression labels, validated against -1..num_classes-1."""
  expr = parse_ints(table, cols, 'expression labels')[:, 0]
  bad = (expr < labels.EXPR_MISSING) | (expr >= num_classes)
  if bad.any():
    row = int(np.argmax(bad))
    hint = ' (7 is Other: pass num_expr_classes=8)' if num_classes == 7 and expr[row] == 7 else ''
    raise table.error(row, f'expression label {expr[row]} outside -1..{num_classes - 1}{hint}')
  return expr.astype(np.int8, copy=False)


def au_values(table: Table, cols: slice) -> np.ndarray:
  """int8 [rows, 12] AU labels, validated to be -1, 0 or 1."""
  au = parse_ints(table, cols, 'AU labels')
  check_rows(table, ((au < labels.AU_MISSING) | (au > 1)).any(axis=1),
             f'AU labels must be -1 (missing), 0 or 1 ({",".join(labels.AU_NAMES)})')
  return au.astype(np.int8, copy=False)


def va_values(table: Table, cols: slice) -> np.ndarray:
  """float32 [rows, 2] (valence, arousal), validated to lie in [-1, 1] or be -5."""
  va = parse_numbers(table, cols)
  ok = ((va >= -1.0) & (va <= 1.0)) | (va == labels.VA_MISSING)  # NaN fails both
  check_rows(table, ~ok.all(axis=1), 'valence/arousal must lie in [-1, 1] or be -5 (missing)')
  return va.astype(np.float32)


def read_expr_file(path: str, num_classes: int) -> np.ndarray:
  """Per-task EXPR file -> int8 [frames], -1 missing; row k is frame k + 1."""
  return expr_values(Table(path, 1, slice(0, 1)), slice(0, 1), num_classes)


def read_au_file(path: str) -> np.ndarray:
  """Per-task AU file -> int8 [frames, 12], -1 missing."""
  au_cols = slice(0, labels.NUM_AUS)
  return au_values(Table(path, labels.NUM_AUS, au_cols), au_cols)


def read_va_file(path: str) -> np.ndarray:
  """Per-task VA file -> float32 [frames, 2] (valence, arousal), -5 missing."""
  return va_values(Table(path, 2, slice(0, 2)), slice(0, 2))


@dataclasses.dataclass(frozen=True)
class MtlRows:
  """s-Aff-Wild2 rows sorted by (video, frame); unique (video, frame) pairs."""
  video_names: tuple  # sorted
  video_id: np.ndarray  # int32 [n] into video_names
  frame: np.ndarray  # int32 [n], 1-based
  expr: np.ndarray  # int8 [n], -1 missing
  au: np.ndarray  # int8 [n, 12], -1 missing
  va: np.ndarray  # float32 [n, 2], -5 missing


def read_mtl_file(path: str, num_classes: int) -> MtlRows:
  """Reads one s-Aff-Wild2 file (`training_set_annotations.txt` or the validation one)."""
  num_cols = len(MTL_HEADER)
  table = Table(path, num_cols, slice(1, num_cols))
  header = table.header.split(b',')
  if len(header) != num_cols or header[0].strip().lower().endswith(b'.jpg'):
    raise line_error(path, 1, f'expected the {num_cols}-column header {",".join(MTL_HEADER)}',
                     table.header)
  va = va_values(table, slice(1, 3))
  expr = expr_values(table, slice(3, 4), num_classes)
  au = au_values(table, slice(4, num_cols))
  video_names, video_id, frame = _parse_image_paths(table)
  order = np.lexsort((frame, video_id))
  same = (np.diff(video_id[order]) == 0) & (np.diff(frame[order]) == 0)
  if same.any():
    k = int(np.argmax(same))
    first, again = sorted((int(order[k]), int(order[k + 1])))
    raise table.error(again, f'duplicate image; the same image is on line {first + 2}')
  return MtlRows(video_names, video_id[order].astype(np.int32), frame[order].astype(np.int32),
                 expr[order], au[order], va[order])


def _parse_image_paths(table: Table):
  """Splits the `[prefix/]video/00001.jpg` column: (sorted names, video_id [n], frame [n])."""
  if table.num_rows == 0:
    return (), np.zeros(0, np.int64), np.zeros(0, np.int64)
  starts, ends = table.field_bounds(slice(0, 1))
  chunks = [_parse_path_chunk(table, starts[lo:lo + _PATH_CHUNK_ROWS, 0],
                              ends[lo:lo + _PATH_CHUNK_ROWS, 0], lo)
            for lo in range(0, table.num_rows, _PATH_CHUNK_ROWS)]
  names = np.unique(np.concatenate([u for u, _, _ in chunks]))
  video_id = np.concatenate([np.searchsorted(names, u)[inv] for u, inv, _ in chunks])
  frame = np.concatenate([f for _, _, f in chunks])
  return tuple(n.decode('utf-8') for n in names), video_id, frame


def _parse_path_chunk(table: Table, start, end, lo: int):
  """Paths of rows lo.. (byte offsets start, end [n]) as a padded byte matrix, parsed by column."""
  body, length = table.body, end - start
  width = max(int(length.max()), 5)
  col = np.arange(width)
  inside = col < length[:, None]
  text = np.where(inside, body[np.minimum(start[:, None] + col, body.size - 1)], 0)
  slash_col = np.where(text == _SLASH, col, -1)
  last = slash_col.max(axis=1)
  prev = np.where(slash_col < last[:, None], slash_col, -1).max(axis=1)
  ext = np.take_along_axis(text, np.maximum(length[:, None] - 4 + np.arange(4), 0), axis=1)
  ext_ok = (length >= 4) & ((ext | 0x20) == np.frombuffer(b'.jpg', np.uint8)).all(axis=1)
  in_number = (col > last[:, None]) & (col < length[:, None] - 4)
  digit = text.astype(np.int64) - ord('0')
  digits_ok = np.where(in_number, (digit >= 0) & (digit <= 9), True).all(axis=1)
  num_digits = in_number.sum(axis=1)
  bad = ~ext_ok | ~digits_ok | (num_digits < 1) | (num_digits > 9) | (last - prev < 2)
  if bad.any():
    raise table.error(lo + int(np.argmax(bad)),
                      'expected an image path like <video>/00001.jpg in the first field')
  place = np.where(in_number, length[:, None] - 5 - col, 0)
  frame = np.where(in_number, digit * 10**place, 0).sum(axis=1)
  shift = np.minimum(col + prev[:, None] + 1, width - 1)
  video = np.take_along_axis(text, shift, axis=1)
  video[col >= (last - prev - 1)[:, None]] = 0
  video = np.ascontiguousarray(video.astype(np.uint8)).view(f'S{width}')[:, 0]
  names, inverse = np.unique(video, return_inverse=True)
  return names, inverse.reshape(-1), frame
