"""Per-frame prediction files in the ABAW3/4 multi-task submission format."""
import numpy as np

from affectjax import labels

MTL_HEADER = 'image,valence,arousal,expression,aus'


def decode_outputs(outputs: dict, tasks: tuple, au_threshold: float = 0.5) -> dict:
  """Model outputs (NumPy) -> per-frame decisions: EXPR class, AU 0/1, VA values.

  Untrained tasks get the missing-label sentinels, as in the annotation files.
  """
  n = len(next(iter(outputs.values())))
  expr = np.full(n, labels.EXPR_MISSING, np.int64)
  au = np.full((n, labels.NUM_AUS), labels.AU_MISSING, np.int64)
  va = np.full((n, 2), labels.VA_MISSING, np.float64)
  if 'expr' in tasks:
    expr = np.argmax(outputs['expr'], axis=-1)
  if 'au' in tasks:
    au = (1.0 / (1.0 + np.exp(-outputs['au'])) >= au_threshold).astype(np.int64)
  if 'va' in tasks:
    va = np.clip(outputs['va'], -1.0, 1.0)
  return {'expr': expr, 'au': au, 'va': va}


def write_predictions(path: str, rows: list, index, tasks: tuple, num_expr_classes: int) -> str:
  """Writes `video/00001.jpg,v,a,e,au1..au12` for every evaluated frame (padding skipped).

  `rows` is a list of (outputs, batch) pairs from the evaluation loop; `batch['index']` maps
  each row to the frame index.
  """
  del num_expr_classes  # the class index is written as is
  with open(path, 'w') as f:
    f.write(MTL_HEADER + '\n')
    for outputs, batch in rows:
      keep = np.asarray(batch['valid'], bool)
      decided = decode_outputs({k: np.asarray(v)[keep] for k, v in outputs.items()}, tasks)
      for j, i in enumerate(np.asarray(batch['index'])[keep]):
        name = f'{index.video_names[index.video_id[i]]}/{index.frame[i]:05d}.jpg'
        v, a = decided['va'][j]
        aus = ','.join(str(x) for x in decided['au'][j])
        f.write(f"{name},{v:.6f},{a:.6f},{decided['expr'][j]},{aus}\n")
  return path
