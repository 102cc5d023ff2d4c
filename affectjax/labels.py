"""The ABAW label vocabulary and the missing-label conventions shared by every module."""

EXPR_CLASSES_7 = ('Neutral', 'Anger', 'Disgust', 'Fear', 'Happiness', 'Sadness', 'Surprise')
EXPR_CLASSES_8 = EXPR_CLASSES_7 + ('Other',)
AU_NAMES = ('AU1', 'AU2', 'AU4', 'AU6', 'AU7', 'AU10', 'AU12', 'AU15', 'AU23', 'AU24', 'AU25',
            'AU26')
NUM_AUS = len(AU_NAMES)
TASKS = ('expr', 'au', 'va')

EXPR_MISSING = -1
AU_MISSING = -1
VA_MISSING = -5.0


def expr_classes(num_classes: int) -> tuple:
  """Class names for the 7-class (ABAW1/2) or 8-class (ABAW3+, with Other) expression task."""
  if num_classes not in (7, 8):
    raise ValueError(f'num_expr_classes must be 7 or 8, got {num_classes}')
  return EXPR_CLASSES_8 if num_classes == 8 else EXPR_CLASSES_7


def expr_mask(expr):
  """True where an expression label is present; expr int [...]."""
  return expr >= 0


def au_mask(au):
  """True per AU where a label is present; au int [..., 12]."""
  return au >= 0


def va_mask(va):
  """True per column where valence / arousal is present; va float [..., 2]."""
  return va > VA_MISSING + 0.5
