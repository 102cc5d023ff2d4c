"""Method 1's EXPR and AU tables (incomplete labels, modified MTL, ABAW2 2021), as rows.

  python -m affectjax.ablate --table=configs/ablations/method1.py:demo --workdir=runs/method1

Our reading of the paper's rows: "EXPR only" / "AU" (single-task ResNet50; theirs from
EmotionNet) are configs/expr.py and configs/au.py; "multi-task" is configs/mtl.py with plain CE
(the alternating scheme without focal loss); "shared backbone" is one network trained on both
tasks jointly (data.sampling=joint) with focal loss; "multi-task + focal loss" is configs/mtl.py
(the alternating scheme and focal loss). The paper starts from VGGFace2 weights
(--config.init_from there; the demo trains from scratch).

`mtl_ce_balanced` is not in the paper: plain CE with scikit-learn's 'balanced' class weights
(n / (C * n_c) over the training frames), the other usual answer to EXPR's class imbalance,
beside focal loss.
"""


def get_table(variant=None):
  del variant  # each row's config takes it
  return {
      'title': "Method 1 (ABAW2 2021): single-task against multi-task, focal against CE, "
               "alternating against joint",
      'metrics': ('expr_f1', 'expr_acc', 'expr_abaw2', 'au_f1', 'au_acc', 'au_abaw2'),
      'seeds': (0, 1, 2),
      'rows': [
          {'name': 'expr_only', 'config': 'configs/expr.py',
           'paper': {'expr_f1': 0.395, 'expr_acc': 0.598, 'expr_abaw2': 0.462}},
          {'name': 'au_only', 'config': 'configs/au.py',
           'paper': {'au_f1': 0.439, 'au_acc': 0.878, 'au_abaw2': 0.659}},
          {'name': 'mtl_ce', 'config': 'configs/mtl.py', 'overrides': {'loss.expr': 'ce'},
           'paper': {'expr_f1': 0.494, 'expr_acc': 0.684, 'expr_abaw2': 0.556,
                     'au_f1': 0.566, 'au_acc': 0.895, 'au_abaw2': 0.731}},
          {'name': 'joint_focal', 'config': 'configs/mtl.py',
           'overrides': {'data.sampling': 'joint'},
           'paper': {'expr_f1': 0.675, 'expr_acc': 0.791, 'expr_abaw2': 0.713,
                     'au_f1': 0.427, 'au_acc': 0.883, 'au_abaw2': 0.655}},
          {'name': 'mtl_ce_balanced', 'config': 'configs/mtl.py',
           'overrides': {'loss.expr': 'ce', 'loss.expr_class_weights': 'balanced'}},
          {'name': 'mtl_focal', 'config': 'configs/mtl.py',
           'paper': {'expr_f1': 0.724, 'expr_acc': 0.826, 'expr_abaw2': 0.757}},
      ],
  }
