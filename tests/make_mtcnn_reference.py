"""Writes tests/data/mtcnn_reference.npz: the reference `mtcnn` package's outputs that
tests/test_mtcnn.py compares the JAX port (affectjax.face) with.

Run from the repository root, with the TensorFlow virtualenv (never imported by the package or
the tests):

  nice /work/venv_tfds/bin/python tests/make_mtcnn_reference.py \
      [--astronaut .../site-packages/skimage/data/astronaut.png]

Written with: mtcnn 1.0.0, tensorflow-cpu 2.21.0, keras 3.15.1, numpy 2.4.6, Pillow 13.0.0,
Python 3.11 (CPU). The astronaut image is scikit-image 0.26.0's data/astronaut.png, read with
Pillow (the same array as skimage.data.astronaut()).

Contents (inputs are uint8 images, normalised by the nets' callers as (x - 127.5) / 128):
  pnet_in12 [2,12,12,3], pnet_in40x50 [1,40,50,3] uint8 and P-Net's outputs on them:
    pnet12_reg [2,1,1,4], pnet12_prob [2,1,1,2], pnet40x50_reg [1,15,20,4], ..._prob [1,15,20,2]
  rnet_in [4,24,24,3] uint8 (3 random, 1 the astronaut's face) -> rnet_reg [4,4], rnet_prob [4,2]
  onet_in [3,48,48,3] uint8 (2 random, 1 the face) -> onet_reg [3,4], onet_lm [3,10],
    onet_prob [3,2]
  area_in [1,37,53,3] uint8 -> area_out_a [1,26,37,3], area_out_b [1,7,10,3]: the normalised
    image resized by tf.image.resize(method=AREA), as the pyramid does (scales 0.709, 0.2)
  crop_boxes [3,5] (image id, x1, y1, x2, y2 in pixels, partly outside the image) ->
    crop_out [3,24,24,3]: mtcnn.utils.images.extract_patches on the normalised area_in
  astronaut_det [F,16]: detect_faces(box_format='xyxy', output_type='numpy') on astronaut.png:
    image id, x1, y1, x2, y2, confidence, 5 landmark x then 5 landmark y (left_eye, right_eye,
    nose, mouth_left, mouth_right); astronaut_pnet [P,6] and astronaut_rnet [R,6]: the boxes
    (image id, x1, y1, x2, y2, score) after the P-Net and R-Net stages
  pair_det [F,16]: the same on `pair_image` (two astronauts side by side, 256x512, each the
    2x2 mean of astronaut.png rounded half up: built here and in the test from the PNG alone)
"""
import argparse
import os

import numpy as np

DEFAULT_ASTRONAUT = '/work/venv/lib/python3.11/site-packages/skimage/data/astronaut.png'
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'mtcnn_reference.npz')


def pair_image(astronaut: np.ndarray) -> np.ndarray:
  """Two half-size astronauts side by side: uint8 [256, 512, 3]."""
  x = astronaut.astype(np.int32).reshape(256, 2, 256, 2, 3).sum(axis=(1, 3))
  half = ((x + 2) // 4).astype(np.uint8)
  return np.concatenate([half, half], axis=1)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--astronaut', default=DEFAULT_ASTRONAUT)
  parser.add_argument('--out', default=OUT)
  args = parser.parse_args()
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from mtcnn import MTCNN  # pylint: disable=import-outside-toplevel
  from mtcnn.utils import images as mimages  # pylint: disable=import-outside-toplevel

  astronaut = np.asarray(Image.open(args.astronaut).convert('RGB'))
  assert astronaut.shape == (512, 512, 3), astronaut.shape
  detector = MTCNN()
  pnet, rnet, onet = (stage.model for stage in detector.stages)
  rng = np.random.default_rng(20261130)
  norm = lambda u: ((u.astype(np.float32) - 127.5) / 128).astype(np.float32)
  out = {}

  out['pnet_in12'] = rng.integers(0, 256, (2, 12, 12, 3), dtype=np.uint8)
  out['pnet_in40x50'] = rng.integers(0, 256, (1, 40, 50, 3), dtype=np.uint8)
  for key, name in (('pnet_in12', 'pnet12'), ('pnet_in40x50', 'pnet40x50')):
    reg, prob = pnet(norm(out[key]))
    out[f'{name}_reg'], out[f'{name}_prob'] = np.asarray(reg), np.asarray(prob)

  face = astronaut[60:175, 175:270]  # around the face, [115, 95, 3]
  face_at = lambda s: np.asarray(Image.fromarray(face).resize((s, s), Image.BILINEAR))[None]
  out['rnet_in'] = np.concatenate([rng.integers(0, 256, (3, 24, 24, 3), dtype=np.uint8),
                                   face_at(24)])
  out['rnet_reg'], out['rnet_prob'] = (np.asarray(a) for a in rnet(norm(out['rnet_in'])))
  out['onet_in'] = np.concatenate([rng.integers(0, 256, (2, 48, 48, 3), dtype=np.uint8),
                                   face_at(48)])
  out['onet_reg'], out['onet_lm'], out['onet_prob'] = (
      np.asarray(a) for a in onet(norm(out['onet_in'])))

  out['area_in'] = rng.integers(0, 256, (1, 37, 53, 3), dtype=np.uint8)
  area_norm = mimages.normalize_images(out['area_in'])  # float64, as detect_faces passes it
  out['area_out_a'] = np.asarray(mimages.scale_images(area_norm, 0.709))
  out['area_out_b'] = np.asarray(mimages.scale_images(area_norm, 0.2))
  out['crop_boxes'] = np.asarray([[0, 3.3, 4.7, 30.2, 28.9], [0, -6.5, 10.25, 20.0, 36.75],
                                  [0, 40.6, -3.1, 58.9, 15.2]])
  out['crop_out'] = np.asarray(mimages.extract_patches(area_norm, out['crop_boxes'], (24, 24)))

  def stages(image):
    """(P-Net stage boxes, R-Net stage boxes, final detections) on one uint8 image."""
    batch, _, _ = mimages.standarize_batch([image], normalize=True)
    shapes = np.asarray([image.shape])
    p = detector.stages[0](images_normalized=batch, images_oshapes=shapes)
    # (the next stage overwrites the scores of the array it gets: hence the copies)
    r = detector.stages[1](images_normalized=batch, bboxes_batch=p.copy())
    det = detector.detect_faces(image, box_format='xyxy', output_type='numpy')
    return p, r, np.asarray(det)

  out['astronaut_pnet'], out['astronaut_rnet'], out['astronaut_det'] = stages(astronaut)
  out['pair_det'] = stages(pair_image(astronaut))[2]
  print({k: v.shape for k, v in out.items()})
  print('astronaut', out['astronaut_det'])
  print('pair', out['pair_det'])
  print('versions: tensorflow', tf.__version__, 'numpy', np.__version__)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  np.savez_compressed(args.out, **out)
  print('wrote', args.out, os.path.getsize(args.out), 'bytes')


if __name__ == '__main__':
  main()
