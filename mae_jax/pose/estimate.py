"""Top-down pose estimation of one image: person boxes -> keypoints.

box -> centre / scale -> UDP affine crop (`topdown.model_inputs`) -> ViTPose
heatmaps -> optional flip test (the mirrored crops' heatmaps flipped back
and averaged, as the official test configuration does with
shift_heatmap=False) -> DARK-UDP decoding -> keypoints in image pixels
(`decode.decode`). `coco_results` writes them as COCO keypoint results.
"""
import functools

import jax
import numpy as np

from mae_jax.models.geometry import image_hw
from mae_jax.pose import decode as decode_lib, topdown
from mae_jax.pose.keypoints import FLIP_PAIRS, NUM_KEYPOINTS

VISIBILITY_THRESHOLD = 0.2  # joints scoring above it count in a pose score


@functools.lru_cache(maxsize=8)
def _heatmap_fn(model):
  """Jitted (variables, inputs) -> heatmaps of `model` (a hashable module)."""
  return jax.jit(lambda variables, x: model.apply(variables, x))


def heatmaps_of(model, variables, inputs, flip_test=False,
                flip_pairs=FLIP_PAIRS):
  """(P, H_in, W_in, C) normalised crops -> (P, h, w, K) float32 heatmaps;
  with flip_test, averaged with the flipped-back heatmaps of the mirrored
  crops (`flip_pairs`: the joints that swap, COCO's by default)."""
  run = _heatmap_fn(model)
  heatmaps = np.asarray(run(variables, inputs), np.float32)
  if flip_test:
    if flip_pairs is FLIP_PAIRS and model.num_joints != NUM_KEYPOINTS:
      raise ValueError(f'flip test of a {model.num_joints}-joint model needs '
                       'its flip_pairs (the defaults are the 17 COCO joints)')
    mirrored = np.asarray(run(variables, inputs[:, :, ::-1]), np.float32)
    heatmaps = 0.5 * (heatmaps + decode_lib.flip_back(mirrored, flip_pairs))
  return heatmaps


def estimate(model, variables, image, boxes=None, flip_test=False,
             blur='official', kernel=11, flip_pairs=FLIP_PAIRS):
  """Keypoints of the people in `image`.

  image: (H, W, 3) uint8 RGB. boxes: (P, 4) COCO (x, y, w, h) person boxes
  in pixels; None or empty: the whole image is one box. `blur` and `kernel`
  select the DARK-UDP modulation (`decode.refine_dark_udp`).
  Returns a dict: 'keypoints' (P, K, 3) float32 x, y in image pixels and
  score; 'boxes' (P, 4); 'heatmaps' (P, h, w, K); 'centers', 'scales'
  (P, 2) of the crops.
  """
  image = np.asarray(image)
  inputs, centers, scales = topdown.model_inputs(
      image, boxes, input_hw=image_hw(model.img_size))
  heatmaps = heatmaps_of(model, variables, inputs, flip_test, flip_pairs)
  keypoints = decode_lib.decode(heatmaps, centers, scales, kernel, blur)
  if boxes is None or np.size(boxes) == 0:
    boxes = [[0.0, 0.0, image.shape[1], image.shape[0]]]
  return {'keypoints': keypoints, 'boxes': np.asarray(boxes, np.float32),
          'heatmaps': heatmaps, 'centers': centers, 'scales': scales}


def pose_score(keypoints, box_score=1.0, threshold=VISIBILITY_THRESHOLD):
  """A person's score as mmpose's top-down COCO evaluation rescores it: the
  box score times the mean score of the joints above `threshold` (0 when
  none is). keypoints: (K, 3)."""
  scores = np.asarray(keypoints)[:, 2]
  kept = scores[scores > threshold]
  return float(box_score) * (float(kept.mean()) if kept.size else 0.0)


def coco_results(keypoints, image_id, box_scores=None):
  """COCO keypoint results (a list of dicts, json-able): per person
  image_id, category_id 1, keypoints [x1, y1, s1, ...] and `pose_score`."""
  keypoints = np.asarray(keypoints, np.float64)
  box_scores = np.ones(len(keypoints)) if box_scores is None else box_scores
  return [{'image_id': image_id, 'category_id': 1,
           'keypoints': [float(v) for v in kp.reshape(-1)],
           'score': pose_score(kp, s)}
          for kp, s in zip(keypoints, box_scores)]
