"""Method 2's ablation models 1 to 6 (multi-task temporal statistical model, ABAW 2020).

  python -m affectjax.ablate --table=configs/ablations/method2.py:demo --workdir=runs/method2

Models 3 to 6 train on the per-frame features of model 2's run of the same seed (extracted
once into it); `model6_end_to_end` starts from that run and trains its last stage with the block
model on blocks of crops. The paper reports model 2's EXPR score (0.67 F1 + 0.33 acc) and VA,
and model 4's VA.

Model 2's features of its own training frames are better than its features of unseen faces
(it fits its training identities). `model4_oof` and `model6_oof` train on out-of-fold features
instead (`model2_oof`: 5 fold runs and the full run, affectjax.oof; 2 folds in the test
variant): every training frame's features come from a run that did not train on its video.
"""


def get_table(variant=None):
  folds = 2 if variant == 'test' else 5
  model = lambda n, **kw: {'name': f'model{n}', 'config': f'configs/temporal_stat.py:model{n}',
                           **kw}
  return {
      'title': 'Method 2 (ABAW 2020): the temporal statistical model, models 1 to 6',
      'metrics': ('expr_f1', 'expr_abaw2', 'va_ccc', 'va_ccc_valence', 'va_ccc_arousal'),
      'seeds': (0, 1, 2),
      'rows': [
          model(1), model(2, paper={'expr_abaw2': 0.501, 'va_ccc': 0.484}),
          model(3, features_of='model2'),
          model(4, features_of='model2',
                paper={'va_ccc': 0.534, 'va_ccc_valence': 0.504, 'va_ccc_arousal': 0.564}),
          model(5, features_of='model2'), model(6, features_of='model2'),
          {'name': 'model6_end_to_end', 'config': 'configs/temporal_stat.py:model6,end_to_end',
           'init_from': 'model2'},
          {'name': 'model2_oof', 'config': 'configs/temporal_stat.py:model2',
           'overrides': {'mode': 'oof', 'data.folds': folds}},
          {'name': 'model4_oof', 'config': 'configs/temporal_stat.py:model4',
           'features_of': 'model2_oof'},
          {'name': 'model6_oof', 'config': 'configs/temporal_stat.py:model6',
           'features_of': 'model2_oof'},
      ],
  }
