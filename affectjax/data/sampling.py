"""Which index rows an epoch visits, in which order and phase: the `joint`, `alternating` and
`balanced` sampling schemes, and the padded evaluation order.

An epoch plan is a flat sequence of global positions, `rows int64 [steps * G]` and
`phases int32 [steps * G]` (G = global batch size): global batch b is positions [b*G, (b+1)*G)
and process p of P takes its contiguous share [b*G + p*G/P, b*G + (p+1)*G/P). Each phase's
segment is a whole number of global batches, so a batch never mixes phases.
"""
import dataclasses

import numpy as np

from affectjax.data import index as index_lib

SAMPLING_SCHEMES = ('joint', 'alternating', 'balanced')
# Batch phases (`batch['phase']`, the same on every row of a batch): `joint` and `balanced`
# batches are all PHASE_JOINT; `alternating` runs, each epoch, phase E, then A, then B (the
# incomplete-labels paper's Algorithm 1). Its phase sets (`PHASE_SETS`, data.phase_sets):
# 'exclusive' (the authors' code): E = frames with EXPR labels only, A = AU labels only, B = both;
# 'inclusive' (the paper's text): E = every frame with an EXPR label, A = every frame with AU
# labels, B = both (a frame with both is then visited three times an epoch).
PHASE_JOINT, PHASE_EXPR_ONLY, PHASE_AU_ONLY, PHASE_BOTH = 0, 1, 2, 3
PHASE_NAMES = {PHASE_JOINT: 'joint', PHASE_EXPR_ONLY: 'expr_only', PHASE_AU_ONLY: 'au_only',
               PHASE_BOTH: 'both'}
PHASE_SETS = ('exclusive', 'inclusive')
# The task each phase neither trains nor scores: its head is left unchanged (as in the authors'
# code) and its labels are left out of the loss (with inclusive sets, E's frames can carry AU
# labels: Algorithm 1 trains E on the EXPR loss alone).
FROZEN_TASKS_BY_PHASE = {PHASE_EXPR_ONLY: ('au',), PHASE_AU_ONLY: ('expr',)}
_PLAN_STREAM = 0x5A4D  # separates plan randomness from augmentation randomness


def label_presence(index, tasks: tuple) -> dict:
  """task -> bool [N]: the row carries that task's label (only the requested tasks)."""
  return {t: np.asarray(index.has_label(t)) for t in tasks}


def labelled_rows(index, tasks: tuple) -> np.ndarray:
  """int64 rows with a label for at least one of `tasks`, ascending."""
  presence = label_presence(index, tasks)
  return np.flatnonzero(np.logical_or.reduce(list(presence.values())))


@dataclasses.dataclass(frozen=True)
class Groups:
  """The rows of each phase, and (balanced only) the sampling weight of every row."""
  sampling: str
  phases: tuple  # ((phase, rows int64 [n]), ...) in epoch order
  weights: np.ndarray | None = None  # float64 [n] summing to 1, for the single balanced group

  def counts(self) -> dict:
    return {PHASE_NAMES[p]: int(r.size) for p, r in self.phases}


def make_groups(index, tasks: tuple, sampling: str, phase_sets: str = 'exclusive') -> Groups:
  """Splits the labelled rows into the phases of `sampling` (`phase_sets`: alternating's)."""
  if sampling not in SAMPLING_SCHEMES:
    raise ValueError(f'sampling must be one of {SAMPLING_SCHEMES}, got {sampling!r}')
  if phase_sets not in PHASE_SETS:
    raise ValueError(f'phase_sets must be one of {PHASE_SETS}, got {phase_sets!r}')
  presence = label_presence(index, tasks)
  if sampling == 'joint':
    return Groups(sampling, ((PHASE_JOINT, labelled_rows(index, tasks)),))
  if sampling == 'alternating':
    if not {'expr', 'au'} <= set(tasks):
      raise ValueError(f"sampling='alternating' needs tasks expr and au, got {tasks}")
    e, a = presence['expr'], presence['au']
    only_e, only_a = (e, a) if phase_sets == 'inclusive' else (e & ~a, a & ~e)
    return Groups(sampling, ((PHASE_EXPR_ONLY, np.flatnonzero(only_e)),
                             (PHASE_AU_ONLY, np.flatnonzero(only_a)),
                             (PHASE_BOTH, np.flatnonzero(e & a))))
  if 'expr' not in tasks:
    raise ValueError(f"sampling='balanced' needs the expr task, got {tasks}")
  rows = np.flatnonzero(presence['expr'])
  classes = index.expr[rows].astype(np.int64)
  frequency = np.bincount(classes)[classes].astype(np.float64)
  weights = 1.0 / frequency
  return Groups(sampling, ((PHASE_JOINT, rows),), weights / weights.sum())


def steps_per_epoch(groups: Groups, global_batch_size: int) -> int:
  """Global batches per epoch: each phase drops its remainder."""
  return sum(r.size // global_batch_size for _, r in groups.phases)


def epoch_plan(groups: Groups, seed: int, epoch: int, global_batch_size: int):
  """(rows int64 [S*G], phases int32 [S*G]) of one training epoch, a function of (seed, epoch).

  joint / alternating: each phase's rows in a fresh permutation, remainder dropped.
  balanced: rows drawn with replacement with probability inversely proportional to their
  EXPR class frequency, as many draws as EXPR rows.
  """
  rng = np.random.default_rng([int(seed), int(epoch), _PLAN_STREAM])
  rows, phases = [], []
  for phase, group in groups.phases:
    if groups.weights is not None:
      picked = rng.choice(group, size=group.size, replace=True, p=groups.weights)
    else:
      picked = rng.permutation(group)
    picked = picked[:picked.size - picked.size % global_batch_size]
    rows.append(picked)
    phases.append(np.full(picked.size, phase, np.int32))
  return np.concatenate(rows), np.concatenate(phases)


def segment_bounds(phases: np.ndarray) -> np.ndarray:
  """int64 [K+1]: start positions of the K phase segments of a plan, then its length."""
  starts = np.flatnonzero(np.diff(phases)) + 1
  return np.concatenate([[0], starts, [phases.size]]).astype(np.int64)


def eval_plan(index, tasks: tuple, global_batch_size: int, labelled_only: bool = True
              ) -> np.ndarray:
  """int64 [S*G]: every labelled row (every row, without `labelled_only`) once, in index
  order, padded with -1 to whole batches."""
  rows = labelled_rows(index, tasks) if labelled_only else np.arange(len(index), dtype=np.int64)
  padded = -(-rows.size // global_batch_size) * global_batch_size
  return np.concatenate([rows, np.full(padded - rows.size, -1, np.int64)])


def frame_counts(index, tasks: tuple, groups: Groups | None = None) -> dict:
  """Frames per task label and per phase (of `groups`), for logging."""
  presence = label_presence(index, tasks)
  counts = {'frames': int(labelled_rows(index, tasks).size)}
  counts.update({t: int(p.sum()) for t, p in presence.items()})
  if groups is not None:
    counts['phases'] = groups.counts()
  return counts


def block_rows(index, size: int) -> np.ndarray:
  """int64 [N, size]: for each row i at frame f, its video's frames f - size + 1 .. f by frame
  number (not by row: frames without a crop or a feature have no row). A frame without a row
  repeats the nearest earlier frame that has one, as the frame model's output would hold still
  over a missing face; frames before the video's first row are left out. Left-aligned and padded
  with -1, so the current frame is the last present entry."""
  if size < 1:
    raise ValueError(f'block size must be positive, got {size}')
  first, end = index_lib.run_bounds(index.video_id)
  frame = np.asarray(index.frame, np.int64)
  wanted = frame[:, None] - (size - 1) + np.arange(size)[None, :]  # frame numbers [N, size]
  # Per row and slot: the last row of the same video whose frame is <= the wanted frame.
  found = np.empty_like(wanted)
  for start, stop in zip(*np.unique(np.stack([first, end]), axis=1)):
    rows = slice(start, stop)
    found[rows] = start + np.searchsorted(frame[rows], wanted[rows], side='right') - 1
  present = found >= first[:, None]
  lead = size - present.sum(axis=1)  # slots before the video's first row, all at the start
  slot = np.arange(size)[None, :] + lead[:, None]
  return np.where(slot < size, np.take_along_axis(found, np.minimum(slot, size - 1), axis=1),
                  -1).astype(np.int64)
