"""How much of a synthetic hard set only time recovers: its clean tracks, replayed without rendering.

  python benchmarks/hard_preset_stats.py --num_videos=480 --frames_per_video=25 --seed=0

The defaults are the demo set's (`configs/*.py:demo`). For each split's EXPR-annotated videos
the script draws the video's clean track as the generator does (`hard.track` with the
video's generator, `data/synthetic/generate.py`) and counts, over the frames with an expressive
EXPR class (not Neutral): those in a dip (the face at under half of its expression, the label
held), the expressive segments with a dip (only segments long enough get one), and over all
EXPR frames those within the slowest onset after a label change (label lag:
the face still shows the previous expression). Annotation noise and the per-task missing runs
are left out: the counts are of the clean track the faces show. Prints a markdown table.
"""
import argparse

import numpy as np

from affectjax.data.synthetic import generate, hard, tracks


def split_stats(plans: list, seed: int) -> dict:
  frames = expressive = dipped = lagged = changes = segments = dipping = 0
  for plan in plans:
    # generate._write_video's first draws from the video's generator: its clean track.
    out = hard.track(generate._video_rng(seed, plan.index), plan.num_frames, plan.forced_expr)
    expr, dip = out['expr'], out['dip']
    bounds = tracks.segment_bounds(expr)
    after = np.zeros(len(expr), bool)
    for begin, end in bounds:
      if expr[begin] != 0:  # an expressive segment (within this video)
        segments += 1
        dipping += bool((dip[begin:end] > 0.5).any())
      if begin > 0:  # a label change
        after[begin:begin + hard.STYLE.ramp[1] - 1] = True
    frames += len(expr)
    expressive += int((expr != 0).sum())
    dipped += int(((dip > 0.5) & (expr != 0)).sum())
    lagged += int(after.sum())
    changes += len(bounds) - 1
  return {'videos': len(plans), 'frames': frames, 'expressive': expressive, 'dipped': dipped,
          'lagged': lagged, 'changes': changes, 'segments': segments, 'dipping': dipping}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--num_videos', type=int, default=480)
  parser.add_argument('--frames_per_video', type=int, default=25)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  params = generate._params(args.num_videos, args.frames_per_video, args.seed, preset='hard')
  plans = generate.plan_videos(params['num_videos'], params['frames_per_video'], params['seed'],
                               params['val_fraction'], params['length_jitter'])
  print(f'hard preset version {hard.VERSION}: {args.num_videos} videos, frames_per_video '
        f'{args.frames_per_video}, seed {args.seed}; EXPR-annotated videos only')
  print('| split | videos | EXPR frames | expressive | in a dip (of expressive) | '
        'expressive segments with a dip | label changes | '
        'within an onset after a change (of EXPR frames) |')
  print('|---|---|---|---|---|---|---|---|')
  for split in generate.SPLITS:
    s = split_stats([p for p in plans if p.split == split and 'expr' in p.tasks], args.seed)
    print(f"| {split} | {s['videos']} | {s['frames']:,} | {s['expressive']:,} | "
          f"{s['dipped']:,} ({s['dipped'] / max(s['expressive'], 1):.1%}) | "
          f"{s['dipping']} of {s['segments']} | {s['changes']} | "
          f"{s['lagged']:,} ({s['lagged'] / max(s['frames'], 1):.1%}) |")


if __name__ == '__main__':
  main()
