"""mode=eval's report (affectjax/report.py): its figures' numbers are the eval JSON's and the
frame index's, the PNGs exist, and the figures reach TensorBoard as images."""
import glob
import json
import os

import numpy as np
from PIL import Image

from affectjax import inference, kinds, labels, report

FIGURES = ('expr_confusion', 'expr_f1', 'au_f1', 'va_density', 'va_traces', 'training_curves')


def test_eval_report_numbers_are_the_evaluations(uninterrupted, config, tmp_path):
  _, workdir = uninterrupted
  c = config.copy_and_resolve_references()
  c.mode, c.eval_out = 'eval', str(tmp_path)
  metrics = inference.evaluate_checkpoint(c, str(workdir))
  evaluated = json.load(open(glob.glob(str(tmp_path / 'eval_validation_step*.json'))[0]))
  folder = glob.glob(str(tmp_path / 'report_validation_step*'))[0]
  numbers = json.load(open(os.path.join(folder, 'figures.json')))

  # EXPR: the confusion counts and per-class F1 of the eval JSON, rows normalised per true class.
  e = numbers['expr']
  assert e['confusion'] == evaluated['expr_confusion']
  assert e['f1'] == evaluated['expr_f1_per_class']
  assert e['classes'] == list(labels.EXPR_CLASSES_8)
  counts = np.asarray(e['confusion'])
  assert e['support'] == counts.sum(1).tolist() and sum(e['support']) == metrics['count_expr']
  normalised = np.asarray(e['confusion_normalised'])
  np.testing.assert_allclose(normalised.sum(1)[counts.sum(1) > 0], 1.0)
  # AU: F1 per AU from the JSON; support = frames with the AU present, counted from the index.
  index = kinds.load_index(c, 'validation')
  au = index.au[labels.has_label('au', index.au)]
  assert numbers['au']['f1'] == evaluated['au_f1_per_au']
  assert numbers['au']['support'] == (au == 1).sum(0).tolist() == evaluated['au_support']
  # VA: both densities hold every VA-labelled frame; the labels' is NumPy's histogram of them.
  va = index.va[labels.va_mask(index.va).all(-1)]
  edges = np.linspace(-1, 1, report.VA_BINS + 1)
  np.testing.assert_array_equal(numbers['va']['density']['labels'],
                                np.histogram2d(va[:, 0], va[:, 1], [edges, edges])[0])
  assert np.sum(numbers['va']['density']['predictions']) == len(va) == metrics['count_va']
  for trace in numbers['va']['traces'].values():
    assert trace['frame'] == sorted(trace['frame']) and len(trace['valence']) == len(trace['frame'])
  # Training curves: the run's metrics.jsonl.
  records = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  assert numbers['curves']['val_score'] == [r['score'] for r in records
                                            if r['split'] == 'validation']
  for name in FIGURES:
    image = Image.open(os.path.join(folder, f'{name}.png'))
    assert image.format == 'PNG' and min(image.size) > 100, name
  events = glob.glob(str(tmp_path / 'tensorboard' / 'eval' / 'events.out.tfevents.*'))
  assert events and os.path.getsize(events[0]) > 10_000  # six PNG images
