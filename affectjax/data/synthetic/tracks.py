"""Latent label tracks of synthetic videos: expression segments, smooth AU intensities, VA, nuisance.

A video is a sequence of expression segments (some tens of frames). Each segment's AU targets are
its expression's prototype AUs plus noise; intensities ramp smoothly between segments, and valence
and arousal are a fixed linear function of the intensities plus a ramped per-expression offset and
small smooth noise, so all three tasks are visible in the rendered face.
"""
import dataclasses

import numpy as np

from affectjax import labels
from affectjax.data.synthetic import faces

_TARGET = {name: i for i, name in enumerate(labels.AU_NAMES + faces.OTHER_AU_NAMES)}
OTHER = 7  # Index of 'Other' in labels.EXPR_CLASSES_8.
# Prototype AUs per class of labels.EXPR_CLASSES_7.
PROTOTYPES = (
    (),  # Neutral
    ('AU4', 'AU7', 'AU23', 'AU24'),  # Anger
    ('AU4', 'AU10', 'AU15'),  # Disgust
    ('AU1', 'AU2', 'AU4', 'AU7', 'AU25', 'AU26'),  # Fear
    ('AU6', 'AU12'),  # Happiness
    ('AU1', 'AU4', 'AU15'),  # Sadness
    ('AU1', 'AU2', 'AU25', 'AU26'),  # Surprise
)
# Other: a gesture outside the basic expressions (faces.OTHER_AU_NAMES: tongue show, cheek puff)
# with ABAW AUs in a combination no basic expression has (mouth open without raised brows, cheeks
# raised without a smile), so the class is visible both as itself and through the AUs.
OTHER_MIXES = ((('AU19',), ('AU25', 'AU26')), (('AU34',), ('AU6', 'AU24')))
# Spurious AUs that may join any segment, so AU labels are not a function of the expression.
SPURIOUS = ('AU2', 'AU24', 'AU25')
# Segment class prior, imbalanced like the real set: Neutral and Happiness dominate.
EXPR_PRIOR = np.array([0.22, 0.09, 0.09, 0.09, 0.19, 0.11, 0.11, 0.10])
# Valence and arousal per unit of AU intensity (order of labels.AU_NAMES), and per class offsets.
VALENCE_WEIGHTS = np.array([-0.15, 0.05, -0.3, 0.3, -0.15, -0.3, 0.55, -0.4, -0.2, -0.2, 0.0, 0.0])
AROUSAL_WEIGHTS = np.array([0.15, 0.2, 0.15, 0.1, 0.2, 0.1, 0.15, -0.15, 0.15, 0.1, 0.25, 0.4])
VA_OFFSETS = np.array([[0.0, -0.3], [-0.1, 0.0], [-0.1, -0.25], [-0.1, -0.2], [0.1, -0.2],
                       [-0.1, -0.5], [0.1, -0.15], [0.0, -0.25]])


def expr_for_classes(expr8: np.ndarray, num_classes: int) -> np.ndarray:
  """Maps 8-class labels to the 7-class set (Other -> EXPR_MISSING) or keeps them; int [N]."""
  expr8 = np.asarray(expr8)
  if num_classes == 8:
    return expr8
  return np.where(expr8 == OTHER, labels.EXPR_MISSING, expr8)


def smooth_noise(rng: np.random.Generator, n: int, dims: int, width: float) -> np.ndarray:
  """Unit-variance noise [n, dims] correlated over about `width` frames."""
  k = np.exp(-0.5 * (np.arange(-3 * width, 3 * width + 1) / width) ** 2)
  pad = len(k)
  white = rng.normal(size=(n + 2 * pad, dims))
  out = np.stack([np.convolve(white[:, d], k, 'same')[pad:pad + n] for d in range(dims)], 1)
  return out / np.sqrt(np.sum(k ** 2))


def random_runs(rng: np.random.Generator, n: int, rate: float, max_len: int) -> np.ndarray:
  """Bool [n], True on about rate * n short runs of 1..max_len frames."""
  mask = np.zeros(n, bool)
  for _ in range(rng.poisson(rate * n)):
    start = rng.integers(n)
    mask[start:start + rng.integers(1, max_len + 1)] = True
  return mask


@dataclasses.dataclass(frozen=True)
class Style:
  """How expressive and how fast the faces of a preset are (the defaults: the demo's set)."""
  prior: tuple = tuple(EXPR_PRIOR)  # segment class prior (labels.EXPR_CLASSES_8)
  strength: tuple = (0.75, 1.0)  # range of a segment's prototype AU intensity
  ramp: tuple = (3, 7)  # frames from one segment's face to the next's
  va_scale: float = 1.0  # scales the VA offsets and weights (smaller: VA nearer neutral)
  other_mixes: tuple = OTHER_MIXES  # the Other class's gesture and its ABAW AUs
  segment: tuple = (12, 37)  # range of an expression segment's frames (the stop excluded)

  def va_weights(self) -> np.ndarray:
    """Valence and arousal per unit of AU intensity, float [12, 2] (labels.AU_NAMES order)."""
    return self.va_scale * np.stack([VALENCE_WEIGHTS, AROUSAL_WEIGHTS], 1)


def segment_bounds(expr: np.ndarray) -> list:
  """(start, stop) of each run of one class in an EXPR track int [n], in order."""
  starts = np.flatnonzero(np.r_[True, expr[1:] != expr[:-1]])
  return list(zip(starts.tolist(), np.r_[starts[1:], len(expr)].tolist()))


def segment_targets(rng: np.random.Generator, expr: int, strength_range: tuple = (0.75, 1.0),
                    other_mixes: tuple = OTHER_MIXES) -> np.ndarray:
  """Targets float [12 + 2] of a segment of `expr`: AU_NAMES then faces.OTHER_AU_NAMES."""
  target = np.concatenate([rng.uniform(0.0, 0.15, labels.NUM_AUS), np.zeros(2)])
  if expr == OTHER:
    gesture, active = other_mixes[rng.integers(len(other_mixes))]
    active = list(gesture + active)
  else:
    active = list(PROTOTYPES[expr])
  if rng.uniform() < 0.1:
    active.append(SPURIOUS[rng.integers(len(SPURIOUS))])
  low, high = strength_range
  strength = rng.uniform(low, high)
  for name in active:
    target[_TARGET[name]] = np.clip(strength + rng.normal(0, 0.07), low - 0.05, 1.0)
  return target


def _segments(rng: np.random.Generator, n: int, forced_expr: int, prior=EXPR_PRIOR,
              lengths: tuple = (12, 37)) -> list:
  """(start, class) of consecutive segments of lengths[0]..lengths[1] - 1 frames; one of class
  forced_expr if >= 0."""
  starts, start = [], 0
  while start < n:
    starts.append(start)
    start += int(rng.integers(*lengths))
  classes = rng.choice(len(prior), len(starts), p=np.asarray(prior))
  if forced_expr >= 0:
    classes[rng.integers(len(starts))] = forced_expr
  return list(zip(starts, classes.tolist()))


def simulate_track(rng: np.random.Generator, n: int, forced_expr: int = -1,
                   style: Style = Style()) -> dict:
  """Per-frame latent labels of one video of n frames.

  Returns expr int32 [n] (8-class), au_intensity float32 [n,12] (AU present above 0.5),
  other_aus float32 [n,2] (faces.OTHER_AU_NAMES, drawn, not labelled), va float32 [n,2] in
  [-1,1], has_image bool [n], missing {task: bool [n]} (short sentinel runs inside annotated
  videos).
  """
  segs = _segments(rng, n, forced_expr, style.prior, style.segment)
  expr = np.zeros(n, np.int32)
  num = len(_TARGET)
  target = np.zeros((n, num + 2))  # AU targets (labelled, then drawn only), then VA offsets.
  prev = None
  for i, (start, cls) in enumerate(segs):
    stop = segs[i + 1][0] if i + 1 < len(segs) else n
    cur = np.concatenate([segment_targets(rng, cls, style.strength, style.other_mixes),
                          style.va_scale * VA_OFFSETS[cls] + rng.normal(0, 0.06, 2)])
    expr[start:stop] = cls
    t = np.arange(stop - start)[:, None]
    ramp = int(rng.integers(*style.ramp))
    w = np.clip((t + 1) / ramp, 0, 1) ** 2 * (3 - 2 * np.clip((t + 1) / ramp, 0, 1))
    target[start:stop] = cur if prev is None else prev * (1 - w) + cur * w
    prev = cur
  au = np.clip(target[:, :num] + 0.04 * smooth_noise(rng, n, num, 4), 0, 1)
  va = au[:, :labels.NUM_AUS] @ style.va_weights() + target[:, num:]
  va = np.clip(va + 0.04 * smooth_noise(rng, n, 2, 6), -1, 1)
  missing = {task: random_runs(rng, n, 1 / 80, 8) for task in labels.TASKS}
  has_image = ~random_runs(rng, n, 1 / 100, 5)
  return {'expr': expr, 'au_intensity': au[:, :labels.NUM_AUS].astype(np.float32),
          'other_aus': au[:, labels.NUM_AUS:].astype(np.float32), 'va': va.astype(np.float32),
          'has_image': has_image, 'missing': missing}


def sample_scenes(rng: np.random.Generator, n: int, image_size: int) -> tuple:
  """Smoothly varying pose and lighting for n frames, and the video's JPEG quality."""
  walk = smooth_noise(rng, n, 8, 12)
  roll0, yaw0 = rng.uniform(-5, 5), rng.uniform(-0.12, 0.12)
  scale0, shift0 = rng.uniform(0.94, 1.05), rng.uniform(-2.5, 2.5, 2)
  light_angle, light_strength = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.35)
  brightness = rng.uniform(0.82, 1.12)
  blur = rng.uniform(0.3, 0.9) * image_size / 112 if rng.uniform() < 0.3 else 0.0
  noise = rng.uniform(0, 3)
  quality = int(rng.integers(70, 96))
  scenes = [faces.Scene(roll=roll0 + 3 * w[0], yaw=yaw0 + 0.08 * w[1],
                        scale=scale0 + 0.03 * w[2], shift=(shift0[0] + 1.5 * w[3],
                                                           shift0[1] + 1.5 * w[4]),
                        gaze=(1.5 * w[5], 0.8 * w[6]), light_angle=light_angle,
                        light_strength=light_strength, brightness=brightness + 0.04 * w[7],
                        blur_sigma=blur, noise_std=noise)
            for w in walk]
  return scenes, quality
