"""Person boxes -> model inputs for top-down pose estimation.

Each person box is turned into a centre and a scale (the box grown to the
model's aspect ratio, then padded), and the image region they describe is
warped to the model's input size with the unbiased (UDP) affine transform of
Huang et al., *The Devil is in the Details: Delving into Unbiased Data
Processing for Human Pose Estimation* (CVPR 2020), as the ViTPose code
(mmpose's top-down pipeline) and Hugging Face transformers' ViTPose image
processor do: bilinear sampling, zeros outside the image.

Images are (H, W, 3) uint8 RGB arrays; boxes are COCO (x, y, w, h) in image
pixels; input sizes are (H_in, W_in), (256, 192) by default.
"""
import math

import numpy as np
import scipy.linalg
import scipy.ndimage

from mae_jax.images import IMAGENET_MEAN, IMAGENET_STD

INPUT_HW = (256, 192)
PADDING = 1.25       # boxes are enlarged by this factor around their centre
PIXEL_STD = 200.0    # scales are in units of this many pixels


def box_to_center_scale(box, input_hw=INPUT_HW, padding=PADDING,
                        pixel_std=PIXEL_STD):
  """(center, scale) of a COCO box (x, y, w, h).

  center: (2,) float32 (x, y), the box centre in pixels. scale: (2,)
  float32 (w, h) in units of `pixel_std` pixels: the shorter side (relative
  to the input aspect ratio W_in / H_in) is grown to that ratio, then both
  are multiplied by `padding`.
  """
  x, y, w, h = (float(v) for v in box[:4])
  aspect = input_hw[1] / input_hw[0]
  center = np.array([x + 0.5 * w, y + 0.5 * h], np.float32)
  if w > aspect * h:
    h = w / aspect
  elif w < aspect * h:
    w = h * aspect
  scale = np.array([w / pixel_std, h / pixel_std], np.float32) * padding
  return center, scale


def warp_matrix(theta_deg, size_input, size_dst, size_target):
  """The (2, 3) float32 UDP affine matrix from input-image pixels to
  output pixels (x, y order), rotating by `theta_deg` degrees.

  size_input: (w, h) of the input plane the rotation is centred in (twice
  the box centre, so the centre is the rotation point); size_dst: (w, h) of
  the output measured in pixel steps (W_out - 1, H_out - 1); size_target:
  (w, h) in input pixels of the region mapped onto it. The region's centre
  goes to the output centre and its extent to size_dst.
  """
  theta = math.radians(theta_deg)
  cos, sin = math.cos(theta), math.sin(theta)
  sx = float(size_dst[0]) / float(size_target[0])
  sy = float(size_dst[1]) / float(size_target[1])
  half_in = (0.5 * float(size_input[0]), 0.5 * float(size_input[1]))
  half_target = (0.5 * float(size_target[0]), 0.5 * float(size_target[1]))
  m = np.zeros((2, 3), np.float32)
  m[0] = (cos * sx, -sin * sx,
          sx * (-half_in[0] * cos + half_in[1] * sin + half_target[0]))
  m[1] = (sin * sy, cos * sy,
          sy * (-half_in[0] * sin - half_in[1] * cos + half_target[1]))
  return m


def crop_matrix(center, scale, input_hw=INPUT_HW, rotation=0.0,
                pixel_std=PIXEL_STD):
  """The (2, 3) float32 `warp_matrix` mapping image pixels (x, y) to the
  (H_in, W_in) crop of the region (center, scale), rotated by `rotation`
  degrees."""
  center = np.asarray(center, np.float32)
  scale = np.asarray(scale, np.float32)
  h_in, w_in = input_hw
  return warp_matrix(rotation, center * np.float32(2),
                     (w_in - 1.0, h_in - 1.0),
                     scale * np.float32(pixel_std))


def crop(image, center, scale, input_hw=INPUT_HW, rotation=0.0,
         pixel_std=PIXEL_STD):
  """The (H_in, W_in, C) crop of `image` ((H, W, C), uint8 in, uint8 out)
  for one person: bilinear UDP warp (`crop_matrix`), zeros outside.

  Each channel is resampled by scipy.ndimage.affine_transform (order 1),
  which pulls every output pixel from the inverse map in (row, col) order
  and rounds to the image's integer type.
  """
  image = np.asarray(image)
  if image.ndim != 3:
    raise ValueError(f'image of shape {image.shape} must be (H, W, C)')
  forward = np.vstack([crop_matrix(center, scale, input_hw, rotation,
                                   pixel_std), [0, 0, 1]])
  inverse = scipy.linalg.inv(forward)
  # (x, y) -> (row, col): reverse both axes of the linear part and offset.
  matrix = inverse[:2, :2][::-1, ::-1]
  offset = inverse[:2, 2][::-1]
  return np.stack([
      scipy.ndimage.affine_transform(image[..., c], matrix, offset,
                                     output_shape=tuple(input_hw), order=1)
      for c in range(image.shape[-1])], axis=-1)


def model_inputs(image, boxes=None, input_hw=INPUT_HW, mean=IMAGENET_MEAN,
                 std=IMAGENET_STD, padding=PADDING, pixel_std=PIXEL_STD):
  """Normalised crops of every person box in one image.

  image: (H, W, 3) uint8 RGB. boxes: (P, 4) COCO (x, y, w, h); None or
  empty: the whole image is one box (0, 0, W, H).
  Returns (inputs (P, H_in, W_in, 3) float32, (crop / 255 - mean) / std;
  centers (P, 2) float32; scales (P, 2) float32), the last two for
  mapping keypoints back (`mae_jax.pose.decode.decode`).
  """
  image = np.asarray(image)
  if image.ndim != 3 or image.dtype != np.uint8:
    raise ValueError(f'image of shape {image.shape} and dtype {image.dtype} '
                     'must be (H, W, C) uint8')
  boxes = np.zeros((0, 4)) if boxes is None else np.asarray(boxes, float)
  if boxes.size == 0:
    boxes = np.array([[0.0, 0.0, image.shape[1], image.shape[0]]])
  if boxes.ndim != 2 or boxes.shape[1] != 4:
    raise ValueError(f'boxes of shape {boxes.shape} must be (P, 4) '
                     '(x, y, w, h)')
  centers, scales = zip(*(box_to_center_scale(b, input_hw, padding,
                                              pixel_std) for b in boxes))
  centers, scales = np.stack(centers), np.stack(scales)
  crops = np.stack([crop(image, c, s, input_hw, pixel_std=pixel_std)
                    for c, s in zip(centers, scales)])
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  inputs = (crops.astype(np.float32) / np.float32(255) - mean) / std
  return inputs.astype(np.float32), centers, scales
