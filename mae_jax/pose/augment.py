"""Random training samples for top-down pose estimation, as the ViTPose COCO
recipe (ViTAE-Transformer/ViTPose, its mmpose top-down train pipeline) builds
them: random horizontal flip, half-body crop, random scale and rotation, the
unbiased (UDP) affine crop of Huang et al. (CVPR 2020) and ImageNet
normalisation, in that order.

Evaluation needs no sample function of its own: `topdown.model_inputs` is
the evaluation crop (no augmentation, same UDP affine and normalisation).
Heatmap targets are made from the returned joints by
`mae_jax.pose.targets.udp_heatmaps`.
"""
import numpy as np

from mae_jax.images import IMAGENET_MEAN, IMAGENET_STD
from mae_jax.pose import topdown
from mae_jax.pose.keypoints import FLIP_PAIRS

# COCO joints 0-10 (face, shoulders, elbows, wrists) make the upper body of
# the half-body crop; the others (hips, knees, ankles) the lower body.
UPPER_BODY = tuple(range(11))
HALF_BODY_PADDING = 1.5  # half-body boxes are enlarged by this factor
ROT_PROB = 0.6  # chance that the sampled rotation is applied


def flip(image, joints, visible, center, flip_pairs=FLIP_PAIRS):
  """Mirror a sample horizontally, as the official random flip does.

  image: (H, W, C); joints: (K, 2) (x, y) pixels; visible: (K,); center:
  (2,). Returns (image[:, ::-1], joints, visible, center): the joints of
  every (left, right) pair exchanged (positions and visibility), x -> W - 1
  - x, then joints with visibility 0 set to (0, 0); the centre's
  x -> W - 1 - x.
  """
  width = image.shape[1]
  order = np.arange(len(joints))
  for left, right in flip_pairs:
    order[left], order[right] = right, left
  visible = visible[order]
  joints = joints[order].copy()
  joints[:, 0] = width - 1 - joints[:, 0]
  joints = joints * visible[:, None]
  center = np.array([width - center[0] - 1, center[1]], np.float32)
  return image[:, ::-1], joints.astype(np.float32), visible, center


def half_body_box(joints, visible, rng, input_hw=topdown.INPUT_HW,
                  upper_body=UPPER_BODY):
  """(center, scale) of the half-body crop, or None when too few joints.

  The visible joints are split into upper body (`upper_body` ids) and
  lower body. The upper half is chosen when a standard normal draw is
  below 0.5 and it has more than 2 joints; else the lower half when it
  has more than 2; else the upper half, if it has at least 2. The box is
  the chosen joints' extent grown to the input aspect ratio W_in / H_in
  (short side lengthened) around their mean, times 1.5, in units of
  `topdown.PIXEL_STD` pixels.
  """
  ids = np.flatnonzero(visible > 0)
  upper = [joints[i] for i in ids if i in upper_body]
  lower = [joints[i] for i in ids if i not in upper_body]
  if rng.standard_normal() < 0.5 and len(upper) > 2:
    chosen = upper
  elif len(lower) > 2:
    chosen = lower
  else:
    chosen = upper
  if len(chosen) < 2:
    return None
  chosen = np.asarray(chosen, np.float32)
  center = chosen.mean(axis=0)
  w, h = chosen.max(axis=0) - chosen.min(axis=0)
  aspect = input_hw[1] / input_hw[0]
  if w > aspect * h:
    h = w / aspect
  elif w < aspect * h:
    w = h * aspect
  scale = np.array([w / topdown.PIXEL_STD, h / topdown.PIXEL_STD], np.float32)
  return center.astype(np.float32), scale * np.float32(HALF_BODY_PADDING)


def random_scale_rotation(rng, scale_factor=0.5, rot_factor=40,
                          rot_prob=ROT_PROB):
  """(scale multiplier, rotation in degrees) as the official random
  scale/rotation draws them: the multiplier 1 + scale_factor * N(0, 1)
  clipped to [1 - scale_factor, 1 + scale_factor]; the angle
  rot_factor * N(0, 1) clipped to [-2 rot_factor, 2 rot_factor], kept when
  a uniform draw is <= rot_prob, else 0."""
  factor = np.clip(rng.standard_normal() * scale_factor + 1,
                   1 - scale_factor, 1 + scale_factor)
  angle = np.clip(rng.standard_normal() * rot_factor, -2 * rot_factor,
                  2 * rot_factor)
  return float(factor), float(angle) if rng.random() <= rot_prob else 0.0


def train_sample(image, keypoints, box, rng, input_hw=topdown.INPUT_HW,
                 flip_pairs=FLIP_PAIRS, flip_prob=0.5, half_body_prob=0.3,
                 half_body_joints=8, scale_factor=0.5, rot_factor=40,
                 rot_prob=ROT_PROB, mean=IMAGENET_MEAN, std=IMAGENET_STD):
  """One randomly augmented training sample of one person.

  image: (H, W, 3) uint8 RGB; keypoints: (K, 3) COCO (x, y, v), v in
  {0, 1, 2}; box: (4,) COCO (x, y, w, h); rng: np.random.Generator.

  Steps, in the official order: the box's centre and scale
  (`topdown.box_to_center_scale`); with probability `flip_prob` the flip
  (`flip`); when more than `half_body_joints` joints are labelled, with
  probability `half_body_prob` the half-body box (`half_body_box`)
  replaces the box; the scale is multiplied and a rotation drawn
  (`random_scale_rotation`); the UDP crop (`topdown.crop`, rotation
  included) maps image and joints to the input; (crop / 255 - mean) / std.

  Returns a dict: 'image' (H_in, W_in, 3) float32; 'joints' (K, 2)
  float32, every joint mapped by `topdown.crop_matrix` into input pixels;
  'visible' (K,) float32, 1 where v > 0 (the input may still leave a
  labelled joint out: `targets.udp_heatmaps` gives it weight 0);
  'center', 'scale' (2,) float32 and 'rotation' (degrees) of the crop;
  'flipped' (bool).
  """
  image = np.asarray(image)
  if image.ndim != 3 or image.dtype != np.uint8:
    raise ValueError(f'image of shape {image.shape} and dtype {image.dtype} '
                     'must be (H, W, C) uint8')
  keypoints = np.asarray(keypoints, np.float32)
  if keypoints.ndim != 2 or keypoints.shape[1] != 3:
    raise ValueError(f'keypoints of shape {keypoints.shape} must be (K, 3) '
                     '(x, y, v)')
  joints = keypoints[:, :2].copy()
  visible = np.minimum(1.0, keypoints[:, 2]).astype(np.float32)
  center, scale = topdown.box_to_center_scale(box, input_hw)

  flipped = bool(rng.random() <= flip_prob)
  if flipped:
    image, joints, visible, center = flip(image, joints, visible, center,
                                          flip_pairs)
  if visible.sum() > half_body_joints and rng.random() < half_body_prob:
    half = half_body_box(joints, visible, rng, input_hw)
    if half is not None:
      center, scale = half
  factor, rotation = random_scale_rotation(rng, scale_factor, rot_factor,
                                           rot_prob)
  scale = (scale * factor).astype(np.float32)

  crop = topdown.crop(image, center, scale, input_hw, rotation)
  matrix = topdown.crop_matrix(center, scale, input_hw, rotation)
  joints = joints @ matrix[:, :2].T + matrix[:, 2]
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  inputs = (crop.astype(np.float32) / np.float32(255) - mean) / std
  return {'image': inputs.astype(np.float32),
          'joints': joints.astype(np.float32), 'visible': visible,
          'center': center, 'scale': scale, 'rotation': rotation,
          'flipped': flipped}
