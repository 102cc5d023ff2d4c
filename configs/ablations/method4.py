"""Method 4's temporal encoders and multi-task frameworks (ABAW4 2022 MTL winners).

  python -m affectjax.ablate --table=configs/ablations/method4.py:demo --workdir=runs/method4

Every temporal row trains on the per-frame features of the `frames` row's run (configs/mtl3.py)
of the same seed. The paper's validation figures are of its final ensemble (MTL 1.742), not of
these single rows, so the paper column stays empty.
"""
ENCODERS = ('gru', 'lstm', 'transformer')
FRAMEWORKS = ('basic', 'share_bottom', 'feedback')


def get_table(variant=None):
  del variant
  rows = [{'name': 'frames', 'config': 'configs/mtl3.py'}]
  for encoder in ENCODERS:
    for framework in FRAMEWORKS:
      words = encoder if framework == 'basic' else f'{encoder},{framework}'
      rows.append({'name': f'{encoder}_{framework}', 'config': f'configs/temporal.py:{words}',
                   'features_of': 'frames'})
  return {
      'title': 'Method 4 (ABAW4 2022): temporal encoders x multi-task frameworks',
      'metrics': ('mtl_score', 'expr_f1', 'au_f1', 'va_ccc'),
      'seeds': (0, 1, 2),
      'rows': rows,
  }
