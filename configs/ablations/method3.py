"""Method 3's uni-task against naive multi-task study (2024 report, ResNet18).

  python -m affectjax.ablate --table=configs/ablations/method3.py:demo --workdir=runs/method3
"""


def get_table(variant=None):
  del variant
  return {
      'title': 'Method 3 (2024): uni-task ResNet18s against one naive multi-task ResNet18',
      'metrics': ('va_ccc', 'expr_f1', 'au_f1'),
      'seeds': (0, 1, 2),
      'rows': [
          {'name': 'va', 'config': 'configs/unitask.py:va', 'paper': {'va_ccc': 0.248}},
          {'name': 'expr', 'config': 'configs/unitask.py:expr', 'paper': {'expr_f1': 0.204}},
          {'name': 'au', 'config': 'configs/unitask.py:au', 'paper': {'au_f1': 0.400}},
          {'name': 'naive_mtl', 'config': 'configs/unitask.py:mtl',
           'paper': {'va_ccc': 0.027, 'expr_f1': 0.221, 'au_f1': 0.087}},
      ],
  }
