"""The synthetic Aff-Wild2: procedural face videos with visible labels, in the real set's layouts.

- `generate`: plans the videos, writes the frames and annotation files, caches whole sets
  (`generate`, `ensure_synthetic`) and the command line (`python -m affectjax.data.synthetic`);
- `tracks`: the per-frame label tracks of a video (expression segments, AU intensities, VA) and
  its nuisance (pose, lighting);
- `faces`: the face renderer that draws each action unit.
"""
