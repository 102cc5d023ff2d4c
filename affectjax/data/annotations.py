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
_PATH_CHUNK_ROWS = 1 << 14  # bounds the [rows, path_width] temporaries of the path parser
MTL_CHUNK_BYTES = 1 << 22  # s-Aff-Wild2 files are parsed in pieces: bounds the temporaries
_LOOKS_NUMERIC = re.compile(rb'[\s\d.,+\-]+')


class AnnotationError(ValueError):
  """A malformed or out-of-range annotation; the message names the file and the 1-based line."""


def line_error(path: str, lineno: int, reason: str, text: bytes) -> AnnotationError:
  shown = text.decode('utf-8', 'replace')
  return AnnotationError(f'{path}, line {lineno}: {reason}\n    {shown!r}')


def read_text(path: str):
  """(header line, the text after it) of a file; '\r' removed, trailing blank lines stripped."""
  with open(path, 'rb') as f:
    data = f.read().replace(b'\r', b'')
  if not data.strip():
    raise AnnotationError(f'{path}: the file is empty ({len(data)} bytes): expected a header '
                          'line, then one line per frame (a copy cut short?)')
  header, _, text = data.partition(b'\n')
  if header.strip() and _LOOKS_NUMERIC.fullmatch(header):
    raise line_error(path, 1, 'expected a header line, found numbers (is the header missing?)',
                     header)
  text = text.rstrip(b'\n \t')
  if not text:
    raise line_error(path, 2, 'no annotation line after the header (a copy cut short?)', b'')
  return header, text


class Table:
  """Comma-separated rows of a file; row r (0-based) is line first_row + r + 2 of the file.

  `numeric_cols` (a slice) names the columns that must hold numbers, for error messages.
  """

  def __init__(self, path: str, text: bytes, num_cols: int, numeric_cols: slice,
               first_row: int = 0):
    self.path, self.text, self.first_row = path, text, first_row
    self.num_cols, self.numeric_cols = num_cols, numeric_cols
    self.num_rows = text.count(b'\n') + 1 if text else 0
    self._seps = None

  @classmethod
  def read(cls, path: str, num_cols: int) -> 'Table':
    """A per-task file: every column numeric."""
    return cls(path, read_text(path)[1], num_cols, slice(0, num_cols))

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

  def field_starts(self, col: int) -> np.ndarray:
    """int64 [rows] byte offset where field `col` of each row starts."""
    if col:
      return self.seps[col - 1::self.num_cols] + 1
    return np.concatenate([[0], self.seps[self.num_cols - 1::self.num_cols] + 1])

  def field_ends(self, col: int) -> np.ndarray:
    """int64 [rows] byte offset one past the end of field `col` of each row."""
    if col < self.num_cols - 1:
      return self.seps[col::self.num_cols]
    return np.concatenate([self.seps[self.num_cols - 1::self.num_cols], [self.body.size]])

  def columns_text(self, cols: slice) -> bytes:
    """The text of columns `cols` only, rows still separated by newlines."""
    if cols.stop - cols.start == self.num_cols or not self.num_rows:
      return self.text
    start, end = self.field_starts(cols.start), self.field_ends(cols.stop - 1)
    stop = np.minimum(end + 1, self.body.size)  # with the separator that follows
    marks = np.zeros(self.body.size + 1, np.int8)  # +1 where a row's part starts, -1 after it
    marks[start], marks[stop] = 1, -1
    text = self.body[np.cumsum(marks[:-1], dtype=np.int8) > 0]
    text[np.cumsum(stop - start)[:-1] - 1] = _NEWLINE  # the separator after each row's part
    return text[:-1].tobytes() if stop[-1] > end[-1] else text.tobytes()

  def error(self, row: int, reason: str) -> AnnotationError:
    """An AnnotationError for row `row` (0-based) of this table, showing the line's text."""
    return line_error(self.path, self.first_row + row + 2, reason,
                      self.text.split(b'\n', row + 1)[row])

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


def checked_expr(table: Table, expr: np.ndarray, num_classes: int) -> np.ndarray:
  """int8 [rows] expression labels, validated against -1..num_classes-1."""
  bad = (expr < labels.EXPR_MISSING) | (expr >= num_classes)
  if bad.any():
    row = int(np.argmax(bad))
    hint = ' (7 is Other: use 8 EXPR classes)' if num_classes == 7 and expr[row] == 7 else ''
    raise table.error(row, f'expression label {expr[row]} outside -1..{num_classes - 1}{hint}')
  return expr.astype(np.int8, copy=False)


def checked_au(table: Table, au: np.ndarray) -> np.ndarray:
  """int8 [rows, 12] AU labels, validated to be -1, 0 or 1."""
  check_rows(table, ((au < labels.AU_MISSING) | (au > 1)).any(axis=1),
             f'AU labels must be -1 (missing), 0 or 1 ({",".join(labels.AU_NAMES)})')
  return au.astype(np.int8, copy=False)


def checked_va(table: Table, va: np.ndarray) -> np.ndarray:
  """float32 [rows, 2] (valence, arousal), validated to lie in [-1, 1] or be -5."""
  ok = ((va >= -1.0) & (va <= 1.0)) | (va == labels.VA_MISSING)  # NaN fails both
  check_rows(table, ~ok.all(axis=1), 'valence/arousal must lie in [-1, 1] or be -5 (missing)')
  missing = va == labels.VA_MISSING
  check_rows(table, missing.any(axis=1) & ~missing.all(axis=1),
             'valence and arousal must both be labelled or both be -5 (missing), not one of them')
  return va.astype(np.float32)


def read_expr_file(path: str, num_classes: int) -> np.ndarray:
  """Per-task EXPR file -> int8 [frames], -1 missing; row k is frame k + 1."""
  table = Table.read(path, 1)
  return checked_expr(table, parse_ints(table, slice(0, 1), 'expression labels')[:, 0],
                      num_classes)


def read_au_file(path: str) -> np.ndarray:
  """Per-task AU file -> int8 [frames, 12], -1 missing."""
  table = Table.read(path, labels.NUM_AUS)
  return checked_au(table, parse_ints(table, slice(0, labels.NUM_AUS), 'AU labels'))


def read_va_file(path: str) -> np.ndarray:
  """Per-task VA file -> float32 [frames, 2] (valence, arousal), -5 missing."""
  table = Table.read(path, 2)
  return checked_va(table, parse_numbers(table, slice(0, 2)))


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
  # The file is read and parsed piece by piece, and each column is joined (then sorted) while
  # the pieces are dropped, so memory stays near one copy of the parsed columns.
  pieces = _read_pieces(path, MTL_CHUNK_BYTES)
  header = next(pieces)
  if len(header.split(b',')) != len(MTL_HEADER) or b'.jpg' in header.lower():
    raise line_error(path, 1, f'expected the {len(MTL_HEADER)}-column header '
                     f'{",".join(MTL_HEADER)}', header)
  parts = [_parse_mtl_table(_mtl_table(path, piece, first_row), num_classes)
           for first_row, piece in pieces]
  if not parts:
    raise line_error(path, 2, 'no annotation row after the header (a copy cut short?)', b'')
  local_names = [p.pop('names') for p in parts]
  names = np.unique(np.concatenate(local_names))
  for p, local in zip(parts, local_names):
    p['video_id'] = np.searchsorted(names, local)[p['video_id']].astype(np.int32)
  columns = {k: np.concatenate([p.pop(k) for p in parts]) for k in list(parts[0])}
  order = np.lexsort((columns['frame'], columns['video_id']))
  same = np.flatnonzero((np.diff(columns['video_id'][order]) == 0) &
                        (np.diff(columns['frame'][order]) == 0))
  if same.size:
    first, again = sorted(order[same[0]:same[0] + 2].tolist())
    raise _row_error(path, again, f'duplicate image; the same image is on line {first + 2}')
  for k in columns:
    columns[k] = columns[k][order]
  return MtlRows(tuple(n.decode('utf-8') for n in names), **columns)


def _mtl_table(path, piece, first_row):
  return Table(path, piece, len(MTL_HEADER), slice(1, len(MTL_HEADER)), first_row)


def _row_error(path, row, reason):
  """AnnotationError for data row `row` of an s-Aff-Wild2 file, found by reading it again."""
  pieces = _read_pieces(path, MTL_CHUNK_BYTES)
  next(pieces)
  for first_row, piece in pieces:
    if row <= first_row + piece.count(b'\n'):
      return _mtl_table(path, piece, first_row).error(row - first_row, reason)
  return AnnotationError(f'{path}: row {row + 1}: {reason}')


def _read_pieces(path: str, chunk_bytes: int):
  """Yields the header line, then (first row, text) pieces of about chunk_bytes cut at line ends.

  '\r' is removed; blank lines are carried into the next piece, so that they are rows (errors)
  unless they end the file.
  """
  with open(path, 'rb') as f:
    yield f.readline().replace(b'\r', b'').rstrip(b'\n')
    row, carry = 0, b''
    while block := f.read(chunk_bytes):
      data = carry + block.replace(b'\r', b'')
      cut = data.rfind(b'\n')
      piece = data[:max(cut, 0)].rstrip(b'\n')
      carry = data[len(piece) + 1:] if piece else data
      if piece:
        yield row, piece
        row += piece.count(b'\n') + 1
    if carry.strip():
      yield row, carry.rstrip(b'\n \t')


def _parse_mtl_table(table: Table, num_classes: int) -> dict:
  """The columns of MtlRows for one piece, video_id indexing the piece's own `names` (S [v])."""
  va = checked_va(table, parse_numbers(table, slice(1, 3)))
  ints = parse_ints(table, slice(3, len(MTL_HEADER)), 'expression and AU labels')
  expr, au = checked_expr(table, ints[:, 0], num_classes), checked_au(table, ints[:, 1:])
  starts, ends = table.field_starts(0), table.field_ends(0)
  chunks = [_parse_path_chunk(table, starts[lo:lo + _PATH_CHUNK_ROWS],
                              ends[lo:lo + _PATH_CHUNK_ROWS], lo)
            for lo in range(0, table.num_rows, _PATH_CHUNK_ROWS)]
  names = np.unique(np.concatenate([u for u, _, _ in chunks]))
  video_id = np.concatenate([np.searchsorted(names, u)[inv] for u, inv, _ in chunks])
  frame = np.concatenate([f for _, _, f in chunks]).astype(np.int32)
  return dict(names=names, video_id=video_id, frame=frame, expr=expr,
              au=np.ascontiguousarray(au), va=va)


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
