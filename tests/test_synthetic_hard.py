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
    track = hard.track(rng, 120, -1)
    counts += np.bincount(track['expr'], minlength=8)
    starts = np.flatnonzero(np.r_[False, track['expr'][1:] != track['expr'][:-1]])
    for s in starts[starts + 12 < 120]:  # how far the face is from its segment's targets
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
  # One delay and one annotator bias per video, plus noise.
  errors = {d: noisy['va'] - hard.delayed(clean['va'], d) for d in range(15)}
  delay = min(errors, key=lambda d: errors[d].std(0).sum())
  assert hard.VA_DELAY[0] <= delay < hard.VA_DELAY[1]
  bias = errors[delay].mean(0)
  assert np.abs(errors[delay] - bias).std() < 2 * hard.VA_NOISE
  assert (noisy['expr'] != clean['expr']).any() and (noisy['expr'] == clean['expr']).mean() > 0.8
  assert noisy['au_intensity'].shape == (4000, labels.NUM_AUS)
  assert clean['expr'] is not noisy['expr']  # the clean track (the rendered faces) unchanged


def test_au_base_rates_have_aff_wild2_shape():
  """In videos of the demo set's lengths (8 to 47 frames) AU25 (talking parts the lips) is the
  most common, AU7 and AU10 common, AU23/24/26 rare, and the activity runs show on the faces
  and in valence and arousal."""
  rng = np.random.default_rng(2)
  present = np.concatenate([hard.track(rng, int(rng.integers(8, 48)), -1)['au_intensity'] > 0.5
                            for _ in range(600)])
  rates = dict(zip(labels.AU_NAMES, present.mean(0)))
  assert max(rates, key=rates.get) == 'AU25' and rates['AU25'] > 0.3
  assert min(rates['AU7'], rates['AU10']) > 0.15
  assert max(rates['AU23'], rates['AU24'], rates['AU26']) < 0.08
  with_activity = hard.track(np.random.default_rng(3), 500, -1)
  without = tracks.simulate_track(np.random.default_rng(3), 500, -1, hard.STYLE)
  np.testing.assert_array_equal(with_activity['expr'], without['expr'])
  # Valence and arousal move with the activity by the prototypes' weights.
  weights = hard.STYLE.va_scale * np.stack([tracks.VALENCE_WEIGHTS, tracks.AROUSAL_WEIGHTS], 1)
  talking = with_activity['au_intensity'][:, labels.AU_NAMES.index('AU25')] > 0.5
  raised = (with_activity['va'] - without['va'])[:, 1]
  assert raised[talking].mean() > 0.5 * weights[labels.AU_NAMES.index('AU25'), 1]
  active = [labels.AU_NAMES.index(name) for name, _, _ in hard.ACTIVITY]
  others = [i for i in range(labels.NUM_AUS) if i not in active]  # dips only lower these
  assert (with_activity['au_intensity'][:, others] <= without['au_intensity'][:, others]).all()
  assert (with_activity['au_intensity'][:, active] > without['au_intensity'][:, active] + 0.3).any()


def test_some_labels_only_time_recovers():
  """In a dip the face lets go of its expression while the EXPR label and valence / arousal
  hold: the prototype's AUs fall below presence, though the same segment showed them before
  the dip and shows them after it. The VA label is the face's of some frames ago."""
  rng = np.random.default_rng(4)
  held, looked_neutral, dipped, expressive = 0, 0, 0, 0
  for _ in range(200):
    clean = tracks.simulate_track(rng, 200, -1, hard.STYLE)
    dip = hard.dips(rng, clean['expr'])
    expressive += (clean['expr'] != 0).sum()
    dipped += (dip > 0.5).sum()
    assert (dip[clean['expr'] == 0] == 0).all()  # Neutral segments have nothing to let go of
    starts = np.flatnonzero(np.r_[True, clean['expr'][1:] != clean['expr'][:-1]])
    for start, stop in zip(starts, np.r_[starts[1:], 200]):
      cls = clean['expr'][start]
      if not 0 < cls < tracks.OTHER or not (dip[start:stop] > 0.99).any():
        continue
      proto = [labels.AU_NAMES.index(a) for a in tracks.PROTOTYPES[cls]]
      face = clean['au_intensity'][start:stop][:, proto] * (1 - hard.DIP[2] * dip[start:stop, None])
      deep = np.flatnonzero(dip[start:stop] > 0.99)
      before, after = face[:deep[0]].max(), face[deep[-1] + 1:].max()
      looked_neutral += face[deep].max() < 0.5
      held += min(before, after) > 0.5
  # About a seventh of the expressive frames of these long tracks are in a dip (version 4); the
  # segment shows its expression around it.
  assert 0.12 < dipped / expressive < 0.3
  assert looked_neutral > 100 and held > 0.9 * looked_neutral
  # The faces' AUs follow the dips; EXPR and VA are those of the track without them (VA moved
  # by the activity alone).
  rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
  with_dips = hard.track(rng_a, 600, -1)
  without = tracks.simulate_track(rng_b, 600, -1, hard.STYLE)
  dip, active = hard.dips(rng_b, without['expr']), hard.activity(rng_b, 600)
  assert dip.max() == 1
  np.testing.assert_array_equal(with_dips['expr'], without['expr'])
  face = np.maximum(without['au_intensity'] * (1 - hard.DIP[2] * dip[:, None]), active)
  np.testing.assert_allclose(with_dips['au_intensity'], face, atol=1e-6)
  weights = hard.STYLE.va_scale * np.stack([tracks.VALENCE_WEIGHTS, tracks.AROUSAL_WEIGHTS], 1)
  felt = without['va'] + (np.maximum(without['au_intensity'], active)
                          - without['au_intensity']) @ weights
  np.testing.assert_allclose(with_dips['va'], np.clip(felt, -1, 1), atol=1e-6)
  late = hard.delayed(np.arange(6)[:, None] * np.ones(2), 2)
  np.testing.assert_array_equal(late[:, 0], [0, 0, 0, 1, 2, 3])
