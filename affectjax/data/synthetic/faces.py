"""Procedural face renderer for the synthetic Aff-Wild2 set: each action unit visibly moves its part.

Geometry is written in design coordinates: pixels of a 112x112 crop with the origin at the face
centre, y pointing down. Every shape is a polygon transformed by the pose (yaw squash with per-part
depth, roll, scale, shift) and drawn anti-aliased at the output resolution, so rendering is fast and
sharp at any size. Images are RGB uint8 (OpenCV only draws; it never sees BGR here).
"""
import copy
import dataclasses

import cv2
import numpy as np

from affectjax.labels import AU_NAMES

DESIGN_SIZE = 112.0
FACE_CENTRE = (56.0, 58.0)  # Design pixels of the face centre in a frontal, unscaled crop.
_SHIFT = 4  # Fixed-point bits for sub-pixel cv2 drawing.
_AU = {name: i for i, name in enumerate(AU_NAMES)}
# FACS AUs outside the ABAW twelve that the renderer can draw (never labelled): tongue show and
# cheek puff, the 'Other' expressions of the synthetic set.
OTHER_AU_NAMES = ('AU19', 'AU34')

# Boxes (x0, y0, x1, y1) in pixels of a frontal, unscaled 112 crop where each part moves, and the
# part each AU moves (tests check that an AU's pixel change stays in its box).
FACE_REGIONS = {
    'brows': (20, 12, 92, 52),
    'eyes': (26, 40, 86, 60),
    'cheeks': (8, 40, 104, 84),
    'mouth': (16, 54, 96, 112),
}
AU_REGIONS = {'AU1': 'brows', 'AU2': 'brows', 'AU4': 'brows', 'AU6': 'cheeks', 'AU7': 'eyes',
              'AU10': 'mouth', 'AU12': 'mouth', 'AU15': 'mouth', 'AU23': 'mouth', 'AU24': 'mouth',
              'AU25': 'mouth', 'AU26': 'mouth'}

SKIN_TONES = ((250, 222, 196), (238, 192, 160), (222, 170, 134), (196, 136, 100), (160, 108, 78),
              (132, 88, 62))


@dataclasses.dataclass(frozen=True)
class Identity:
  """Appearance that stays fixed within a video: colours and face proportions."""
  skin: tuple = SKIN_TONES[1]
  hair: tuple = (50, 35, 25)
  brow: tuple = (40, 28, 20)
  lips: tuple = (180, 80, 85)
  iris: tuple = (80, 55, 35)
  clothes: tuple = (60, 80, 120)
  background: tuple = ((120, 130, 140), (180, 175, 160))
  face_width: float = 1.0
  face_height: float = 1.0
  eye_spacing: float = 1.0
  mouth_width: float = 1.0
  lip_thickness: float = 1.0
  brow_thickness: float = 5.0
  hairline: float = -40.0

  @classmethod
  def sample(cls, rng: np.random.Generator) -> 'Identity':
    """Draws a random identity; skin tones keep features in clear contrast."""
    skin = np.array(SKIN_TONES[rng.integers(len(SKIN_TONES))], float) + rng.normal(0, 6, 3)
    hair = rng.choice([[30, 22, 18], [60, 40, 25], [110, 75, 40], [150, 120, 80], [20, 20, 25]])
    brow = np.minimum(hair, 70) * rng.uniform(0.6, 0.9)
    lips = (skin * 0.45 + np.array([185, 45, 60]) * 0.55) * 0.85 + rng.normal(0, 5, 3)
    iris = rng.choice([[70, 45, 30], [60, 90, 130], [70, 100, 60], [40, 30, 25]])
    bg = rng.uniform(40, 230, (2, 3))
    return cls(skin=_rgb(skin), hair=_rgb(hair), brow=_rgb(brow), lips=_rgb(lips), iris=_rgb(iris),
               clothes=_rgb(rng.uniform(20, 200, 3)), background=(_rgb(bg[0]), _rgb(bg[1])),
               face_width=rng.uniform(0.92, 1.08), face_height=rng.uniform(0.95, 1.05),
               eye_spacing=rng.uniform(0.94, 1.06), mouth_width=rng.uniform(0.9, 1.1),
               lip_thickness=rng.uniform(0.85, 1.15), brow_thickness=rng.uniform(4.5, 6.0),
               hairline=rng.uniform(-46.0, -38.0))


@dataclasses.dataclass(frozen=True)
class Scene:
  """Per-frame nuisance: pose, lighting and image degradation."""
  roll: float = 0.0  # Degrees, in-plane rotation.
  yaw: float = 0.0  # Radians; drawn as a horizontal squash plus a depth-dependent shift.
  scale: float = 1.0
  shift: tuple = (0.0, 0.0)  # Design pixels.
  gaze: tuple = (0.0, 0.0)  # Iris offset, design pixels.
  light_angle: float = 0.0  # Radians, direction of the brightness gradient.
  light_strength: float = 0.0  # Relative brightness change across the crop.
  brightness: float = 1.0
  blur_sigma: float = 0.0  # Output pixels; 0 disables.
  noise_std: float = 0.0  # Grey levels; needs an rng in render_face.


def _rgb(c) -> tuple:
  return tuple(int(v) for v in np.clip(np.round(c), 0, 255))


def _shade(c, f: float) -> tuple:
  return _rgb(np.asarray(c, float) * f)


def _mix(a, b, t: float) -> tuple:
  return _rgb(np.asarray(a, float) * (1 - t) + np.asarray(b, float) * t)


class _Canvas:
  """Maps design coordinates through the pose to pixels and draws anti-aliased shapes."""

  def __init__(self, img: np.ndarray, scene: Scene):
    self.img = img
    self.unit = img.shape[0] / DESIGN_SIZE
    a = np.deg2rad(scene.roll)
    s = scene.scale * self.unit
    self.rot = s * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    self.centre = (np.array(FACE_CENTRE) + np.array(scene.shift)) * self.unit
    self.cos_yaw, self.sin_yaw = np.cos(scene.yaw), np.sin(scene.yaw)

  def px(self, pts, depth: float = 0.0) -> np.ndarray:
    """Design points [N,2] at a depth (design px toward the camera) -> fixed-point pixels."""
    p = np.asarray(pts, float).reshape(-1, 2).copy()
    p[:, 0] = p[:, 0] * self.cos_yaw + depth * self.sin_yaw
    out = p @ self.rot.T + self.centre
    return np.round(out * (1 << _SHIFT)).astype(np.int32)

  def on(self, img: np.ndarray) -> '_Canvas':
    """The same pose drawing onto another image of the same size."""
    other = copy.copy(self)
    other.img = img
    return other

  def width(self, t: float) -> int:
    return max(1, int(round(t * self.unit)))

  def fill(self, pts, color, depth=0.0, alpha=1.0):
    self._draw(lambda im: cv2.fillPoly(im, [self.px(pts, depth)], color, cv2.LINE_AA, _SHIFT),
               alpha)

  def line(self, pts, color, thickness, depth=0.0, alpha=1.0):
    w = self.width(thickness)
    self._draw(lambda im: cv2.polylines(im, [self.px(pts, depth)], False, color, w, cv2.LINE_AA,
                                        _SHIFT), alpha)

  def _draw(self, fn, alpha):
    if alpha <= 0.02:
      return
    if alpha >= 0.98:
      fn(self.img)
      return
    layer = self.img.copy()
    fn(layer)
    cv2.addWeighted(layer, alpha, self.img, 1 - alpha, 0, dst=self.img)


def _ellipse(cx, cy, rx, ry, n=28, a0=0.0, a1=2 * np.pi):
  t = np.linspace(a0, a1, n)
  return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1)


def _curve(p0, p1, p2, n=12):
  """Quadratic curve through p0, p1 (at its middle) and p2; returns [n,2]."""
  p0, p1, p2 = (np.asarray(p, float) for p in (p0, p1, p2))
  c = 2 * p1 - (p0 + p2) / 2
  t = np.linspace(0, 1, n)[:, None]
  return (1 - t) ** 2 * p0 + 2 * t * (1 - t) * c + t ** 2 * p2


def _stroke(centre: np.ndarray, w0: float, w1: float) -> np.ndarray:
  """Filled polygon of a stroke along centre [N,2] whose width goes linearly from w0 to w1."""
  d = np.gradient(centre, axis=0)
  n = np.stack([-d[:, 1], d[:, 0]], 1) / (np.linalg.norm(d, axis=1, keepdims=True) + 1e-9)
  w = np.linspace(w0, w1, len(centre))[:, None] / 2
  return np.concatenate([centre + n * w, (centre - n * w)[::-1]])


def _background(size: int, ident: Identity) -> np.ndarray:
  c0, c1 = (np.array(c, np.float32) for c in ident.background)
  t = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
  img = np.empty((size, size, 3), np.uint8)
  img[:] = c0 * (1 - t) + c1 * t
  return img


def _head(cv: _Canvas, ident: Identity, a, puff: float):
  skin = ident.skin
  half_w, top, bottom = 36 * ident.face_width, 50 * ident.face_height, 46 * ident.face_height
  bottom += 9 * a[_AU['AU26']]  # Jaw drop lowers the chin.
  cv.fill([[-70, 70], [-55, 48], [55, 48], [70, 70], [70, 120], [-70, 120]], ident.clothes)
  cv.fill([[-17, 20], [17, 20], [19, 70], [-19, 70]], _shade(skin, 0.72))
  t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
  sin = np.sin(t)
  y = sin * np.where(sin > 0, bottom, top)
  # AU34 puffs the cheeks out: the outline bulges at cheek height.
  bulge = 1 + 0.16 * puff * np.exp(-0.5 * ((y - 14) / 9) ** 2)
  x = half_w * np.cos(t) * np.where(sin > 0, 1 - 0.22 * sin ** 2, 1.0) * bulge
  outline = np.stack([x, y], 1)
  cv.fill(outline, skin)
  lower = outline[(sin > -0.1)]
  cv.line(lower[np.argsort(np.arctan2(lower[:, 1], lower[:, 0]))], _shade(skin, 0.7), 1.2,
          alpha=0.8)
  # Hair: the top of the outline, a little wider, down to the hairline.
  hl = ident.hairline
  arc = _ellipse(0, 0, half_w * 1.05, top * 1.05, 24, np.deg2rad(190), np.deg2rad(350))
  front = _curve([half_w * 0.98, -12], [0, hl], [-half_w * 0.98, -12], 14)
  front[:, 1] = np.minimum(front[:, 1], hl + 0.35 * (np.abs(front[:, 0]) / half_w) ** 4 * 40)
  cv.fill(np.concatenate([arc, front]), ident.hair)


def _brows(cv: _Canvas, ident: Identity, a):
  a1, a2, a4 = a[_AU['AU1']], a[_AU['AU2']], a[_AU['AU4']]
  es = ident.eye_spacing
  wrinkle = _shade(ident.skin, 0.6)
  for k, y in enumerate((-33.0, -38.0)):  # Forehead lines: centre from AU1, sides from AU2.
    cv.line(_curve([-10, y + 1], [0, y - 1], [10, y + 1], 8), wrinkle, 1.0, 4, 0.9 * a1 - 0.1 * k)
    for s in (-1, 1):
      cv.line(_curve([s * 13, y], [s * 19, y - 1.5], [s * 25, y + 1], 6), wrinkle, 1.0, 4,
              0.9 * a2 - 0.1 * k)
  for s in (-1, 1):  # Glabella furrows from AU4.
    cv.line([[s * 2.5, -22], [s * 2.0, -11]], wrinkle, 1.6, 6, a4)
  for s in (-1, 1):
    inner = [s * (5.5 - 3.5 * a4) * es, -19 - 8 * a1 + 6.5 * a4]
    mid = [s * 15 * es, -23 - 3 * a1 - 4 * a2 + 4 * a4]
    outer = [s * 26 * es, -20 - 8.5 * a2 + 1.5 * a4]
    c = _curve(inner, mid, outer, 12)
    t = ident.brow_thickness
    cv.fill(_stroke(c, 1.15 * t, 0.6 * t), ident.brow, depth=8)


def _eyes(cv: _Canvas, ident: Identity, a, gaze):
  a6, a7 = a[_AU['AU6']], a[_AU['AU7']]
  skin = ident.skin
  for s in (-1, 1):
    cx, cy, half = s * 16 * ident.eye_spacing, -6.0, 8.5
    upper_h = 5.2 * (1 - 0.45 * a7) * (1 - 0.12 * a6)
    lower_h = 3.4 * (1 - 0.6 * a6) * (1 - 0.55 * a7)
    u = np.linspace(-1, 1, 13)
    upper = np.stack([cx + half * u, cy - upper_h * (1 - u ** 2) ** 0.8], 1)
    lower = np.stack([cx + half * u, cy + lower_h * (1 - u ** 2)], 1)[::-1]
    eye = np.concatenate([upper, lower])
    cv.line(upper + [0, -3.5], _shade(skin, 0.75), 1.0, 6, 0.6)  # Lid crease.
    cv.fill(eye, (238, 236, 230), 6)
    _iris(cv, eye, (cx + gaze[0], cy - 0.5 + gaze[1]), ident.iris)
    cv.line(upper, _shade(ident.brow, 0.7), 2.0, 6)  # Lashes along the upper lid.
    cv.line(lower[1:-1], _shade(skin, 0.45), 1.0 + a7, 6, 0.6 + 0.4 * a7)  # AU7 tenses the lid.
    # AU6: lower-lid bulge and crow's feet at the outer corner.
    cv.line(lower[2:-2] + [0, 2.8], _shade(skin, 0.62), 1.2, 6, a6)
    ox = cx + s * (half + 2)
    for dy in (-3.0, 0.0, 3.0):
      cv.line([[ox, cy + dy * 0.5], [ox + s * 5, cy + dy * 1.4]], _shade(skin, 0.6), 1.0, 5, a6)


def _iris(cv: _Canvas, eye, centre, color):
  """Iris and pupil, clipped to the eye opening through a soft mask."""
  img = cv.img
  mask = np.zeros(img.shape[:2], np.uint8)
  cv2.fillPoly(mask, [cv.px(eye, 6)], 255, cv2.LINE_AA, _SHIFT)
  ys, xs = np.nonzero(mask)
  if len(ys) == 0:
    return
  y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
  layer = img.copy()
  sub = cv.on(layer)
  sub.fill(_ellipse(centre[0], centre[1], 3.8, 3.8, 20), color, 6)
  sub.fill(_ellipse(centre[0], centre[1], 1.7, 1.7, 12), (15, 12, 12), 6)
  m = mask[y0:y1, x0:x1, None].astype(np.float32) / 255
  img[y0:y1, x0:x1] = (layer[y0:y1, x0:x1] * m + img[y0:y1, x0:x1] * (1 - m)).astype(np.uint8)


def _nose_cheeks(cv: _Canvas, ident: Identity, a, puff: float):
  a6, a10, a12 = a[_AU['AU6']], a[_AU['AU10']], a[_AU['AU12']]
  skin = ident.skin
  for s in (-1, 1):  # AU6: raised cheek apples.
    cv.fill(_ellipse(s * 20, 12 - 5 * a6, 9 + 1.5 * a6, 6 + 2 * a6, 20),
            _mix(skin, (205, 85, 90), 0.45), 4, 0.1 + 0.55 * a6)
    # AU34: taut, shiny puffed cheeks.
    cv.fill(_ellipse(s * 24, 17, 9, 8, 20), _mix(skin, (255, 255, 255), 0.35), 4, 0.8 * puff)
  cv.line([[2.0, -6], [3.5, 7]], _shade(skin, 0.7), 1.0, 14, 0.35)
  for y in (-1.0, 2.0, 5.0):  # AU10 wrinkles the nose as it lifts the upper lip.
    cv.line(_curve([-4, y + 1], [0, y], [4, y + 1], 6), _shade(skin, 0.55), 1.0, 16, a10)
  cv.line(_curve([-6, 9], [0, 12], [6, 9], 8), _shade(skin, 0.6), 1.0, 18, 0.5)
  for s in (-1, 1):
    cv.fill(_ellipse(s * 4.2, 10 - 1.5 * a10, 2.3 + 0.6 * a10, 1.4, 12), _shade(skin, 0.4), 16)
    # Nasolabial folds: deep with AU10, moderate and pushed out with AU12.
    fold = _curve([s * 6.5, 7 - 1.5 * a10], [s * (12.5 + 2 * a12), 16], [s * (15 + 3 * a12), 26],
                  10)
    cv.line(fold, _shade(skin, 0.58), 1.4, 8, min(1.0, 0.12 + 0.85 * a10 + 0.3 * a12))


def _mouth(cv: _Canvas, ident: Identity, a, tongue: float):
  g = {n: a[_AU[n]] for n in ('AU10', 'AU12', 'AU15', 'AU23', 'AU24', 'AU25', 'AU26')}
  skin = ident.skin
  half = 14.5 * ident.mouth_width * (1 + 0.25 * g['AU12'] - 0.42 * g['AU23'] - 0.12 * g['AU26'])
  corner = -8 * g['AU12'] + 8 * g['AU15']
  thin = (1 - 0.45 * g['AU23']) * (1 - 0.65 * g['AU24']) * ident.lip_thickness
  gap = 5.5 * g['AU25'] + 9 * g['AU26']
  u = np.linspace(-1, 1, 21)
  x = half * u
  line = 27 + corner * u ** 2
  open_profile = (1 - u ** 2) ** 0.6
  raise10 = 6 * g['AU10'] * (1 - u ** 2) ** 0.3
  up_in = line - 0.3 * gap * open_profile - raise10
  lo_in = line + 0.7 * gap * open_profile
  bow = 1 - 0.25 * np.exp(-(u / 0.18) ** 2)
  up_out = up_in - 4.0 * thin * np.sqrt(1 - u ** 2) * bow
  lo_out = lo_in + 5.0 * thin * np.sqrt(1 - u ** 2)
  pts = lambda top, bot: np.concatenate([np.stack([x, top], 1), np.stack([x, bot], 1)[::-1]])
  # AU24: pressed lips push the skin below the lower lip out (a shaded bulge).
  cv.fill(_ellipse(0, lo_out.max() + 4.5, half * 0.55, 3, 16), _shade(skin, 0.75), 8,
          0.75 * g['AU24'])
  if gap + raise10.max() > 0.4:
    cv.fill(pts(up_in, lo_in), (60, 18, 28), 8)
    cv.fill(pts(up_in, np.minimum(up_in + 3.2, lo_in)), (240, 238, 228), 8)
    cv.fill(pts(np.maximum(lo_in - 2.2, up_in + 3.2), lo_in), (225, 222, 210), 8,
            float(np.clip(gap / 6 - 0.3, 0, 1)))
  cv.fill(pts(up_out, up_in), ident.lips, 8)
  cv.fill(pts(lo_in, lo_out), ident.lips, 8)
  cv.line(np.stack([x, (up_in + lo_in) / 2], 1), _shade(ident.lips, 0.45), 1.0 + g['AU24'], 8,
          0.9 - min(gap, 3) / 3.5)
  if tongue > 0.02:  # AU19: the tongue out over the lower lip.
    top = float(up_in[len(u) // 2]) + 1.5
    tip = _ellipse(0, top + 2 + 5 * tongue, 6.5, 2 + 5 * tongue, 20, 0, np.pi)
    shape = np.concatenate([[[-6.5, top]], tip, [[6.5, top]]])
    cv.fill(shape, (212, 78, 98), 10, min(1.0, 2 * tongue))
    cv.line(tip, (130, 35, 50), 1.0, 10, min(1.0, 2 * tongue))
  cv.line(_curve([-7, 0], [0, 2.5], [7, 0], 8) + [0, lo_out.max() + 6 + 5 * g['AU26']],
          _shade(skin, 0.72), 1.0, 6, 0.5)


def render_face(au_intensity, identity: Identity, scene: Scene = Scene(), size: int = 112,
                rng: np.random.Generator | None = None, other_aus=(0.0, 0.0)) -> np.ndarray:
  """Renders one face -> RGB uint8 [size, size, 3].

  au_intensity: float [12] in [0, 1], order of AU_NAMES. other_aus: float [2] in [0, 1], order of
  OTHER_AU_NAMES. rng: only for the scene's pixel noise.
  """
  a = np.clip(np.asarray(au_intensity, float), 0, 1)
  tongue, puff = np.clip(np.asarray(other_aus, float), 0, 1)
  img = _background(size, identity)
  cv = _Canvas(img, scene)
  _head(cv, identity, a, puff)
  _brows(cv, identity, a)
  _eyes(cv, identity, a, scene.gaze)
  _nose_cheeks(cv, identity, a, puff)
  _mouth(cv, identity, a, tongue)
  out = img.astype(np.float32)
  if scene.light_strength or scene.brightness != 1.0:
    r = (np.arange(size, dtype=np.float32) - size / 2) / size
    grad = np.cos(scene.light_angle) * r[None, :] + np.sin(scene.light_angle) * r[:, None]
    out *= (scene.brightness * (1 + scene.light_strength * grad))[..., None]
  if scene.blur_sigma > 0:
    out = cv2.GaussianBlur(out, (0, 0), scene.blur_sigma)
  if scene.noise_std > 0 and rng is not None:
    out += rng.normal(0, scene.noise_std, out.shape).astype(np.float32)
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def landmarks(au_intensity, identity: Identity, scene: Scene = Scene(), size: int = 112
              ) -> np.ndarray:
  """float32 [5, 2]: where render_face draws the eye centres, the nose tip and the mouth corners
  (x, y in pixels, MTCNN's order: left eye, right eye, nose, mouth left, mouth right as seen in
  the image), so detectors and alignment can be scored on the synthetic faces."""
  a = np.clip(np.asarray(au_intensity, float), 0, 1)
  g = {n: a[_AU[n]] for n in ('AU12', 'AU15', 'AU23', 'AU26')}
  half = 14.5 * identity.mouth_width * (1 + 0.25 * g['AU12'] - 0.42 * g['AU23'] -
                                        0.12 * g['AU26'])
  corner = 27 - 8 * g['AU12'] + 8 * g['AU15']
  cv = _Canvas(np.zeros((size, size, 3), np.uint8), scene)
  eye = 16 * identity.eye_spacing
  points = [cv.px([[-eye, -6.0]], 6), cv.px([[eye, -6.0]], 6), cv.px([[0.0, 8.0]], 16),
            cv.px([[-half, corner]], 8), cv.px([[half, corner]], 8)]
  return (np.concatenate(points) / (1 << _SHIFT)).astype(np.float32)
