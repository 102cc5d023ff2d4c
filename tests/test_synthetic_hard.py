"""The hard preset of the synthetic Aff-Wild2 (data/synthetic/hard.py): the default set is left
as it was, the hard one is deterministic by seed, imbalanced like Aff-Wild2, subtle, late (label
lag) and noisily annotated, and reads like any Aff-Wild2."""
import numpy as np

from affectjax import labels
from affectjax.data import index as index_lib
from affectjax.data.synthetic import generate, hard, tracks

TINY = dict(num_videos=4, frames_per_video=20, seed=5, preset='hard')


def test_the_default_parameters_and_folder_are_unchanged():
  default = generate._params(num_videos=6, frames_per_video=24)
  assert 'preset' not in default and default['length_jitter'] == 0.25
  hard_params = generate._params(num_videos=6, frames_per_video=24, preset='hard')
  assert hard_params['preset'] == 'hard' and hard_params['preset_version'] == hard.VERSION
  assert hard_params['length_jitter'] == hard.LENGTH_JITTER


def test_hard_set_is_deterministic_and_reads_as_aff_wild2(tmp_path):
  for name in ('a', 'b'):
    generate.generate(tmp_path / name, progress=False, **TINY)
  files = sorted(p.relative_to(tmp_path / 'a') for p in (tmp_path / 'a').rglob('*') if p.is_file())
  assert len(files) > 40
  assert all((tmp_path / 'a' / f).read_bytes() == (tmp_path / 'b' / f).read_bytes() for f in files)
  index = index_lib.build_index(tmp_path / 'a', 'train', layout='mtl', num_expr_classes=8,
                                use_cache=False)
  assert len(index) > 0 and (index.expr >= -1).all()


def test_labels_are_imbalanced_subtle_and_late():
  rng = np.random.default_rng(0)
  counts, first_frames = np.zeros(8), []
  for _ in range(600):
    track = hard.track(rng, 60, -1)
    counts += np.bincount(track['expr'], minlength=8)
    starts = np.flatnonzero(np.r_[False, track['expr'][1:] != track['expr'][:-1]])
    for s in starts[starts + 12 < 60]:  # how far the face is from its segment's targets
      first_frames.append(np.abs(track['au_intensity'][s] - track['au_intensity'][s + 11]).max())
  fractions = counts / counts.sum()
  np.testing.assert_allclose(fractions, hard.EXPR_PRIOR, atol=0.02)
  assert fractions.max() / fractions.min() >= 10  # Neutral against Fear / Disgust
  # Label lag: at a segment's first frame the face is still far from the new expression.
  assert np.median(first_frames) > 0.2
  default = tracks.simulate_track(np.random.default_rng(0), 2000)
  subtle = hard.track(np.random.default_rng(0), 2000, -1)
  assert (subtle['au_intensity'] > 0.5).mean() < (default['au_intensity'] > 0.5).mean()
  assert np.abs(subtle['va']).mean() < np.abs(default['va']).mean()


def test_annotation_noise_leaves_the_faces_clean():
  rng = np.random.default_rng(1)
  clean = hard.track(rng, 4000, -1)
  noisy = hard.annotate(rng, clean)
  flipped = (noisy['au_intensity'] > 0.5) != (clean['au_intensity'] > 0.5)
  assert abs(flipped.mean() - hard.AU_FLIP) < 0.01
  bias = (noisy['va'] - clean['va']).mean(0)  # one annotator bias per video, plus noise
  assert np.abs(noisy['va'] - clean['va'] - bias).std() < 2 * hard.VA_NOISE
  assert (noisy['expr'] != clean['expr']).any() and (noisy['expr'] == clean['expr']).mean() > 0.8
  assert noisy['au_intensity'].shape == (4000, labels.NUM_AUS)
  assert clean['expr'] is not noisy['expr']  # the clean track (the rendered faces) unchanged


def test_au_base_rates_have_aff_wild2_shape():
  """In 300-frame videos AU25 (talking parts the lips) is the most common, AU7 and AU10 common,
  AU23/24/26 rare (the demo set's shorter videos get less activity: docs/benchmarks.md), and
  the activity runs show on the faces but leave valence and arousal as they were."""
  rng = np.random.default_rng(2)
  present = np.concatenate([hard.track(rng, 300, -1)['au_intensity'] > 0.5 for _ in range(200)])
  rates = dict(zip(labels.AU_NAMES, present.mean(0)))
  assert max(rates, key=rates.get) == 'AU25' and rates['AU25'] > 0.3
  assert min(rates['AU7'], rates['AU10']) > 0.15
  assert max(rates['AU23'], rates['AU24'], rates['AU26']) < 0.08
  with_activity = hard.track(np.random.default_rng(3), 500, -1)
  without = tracks.simulate_track(np.random.default_rng(3), 500, -1, hard.STYLE)
  np.testing.assert_array_equal(with_activity['va'], without['va'])
  np.testing.assert_array_equal(with_activity['expr'], without['expr'])
  assert (with_activity['au_intensity'] >= without['au_intensity']).all()
  assert (with_activity['au_intensity'] > without['au_intensity'] + 0.3).any()
