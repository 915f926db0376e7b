"""Heatmaps -> keypoints in image pixels, as ViTPose evaluates on COCO.

Heatmaps are NHWC: (P, h, w, K) for P person crops, an h x w grid (64 x 48
for a 256 x 192 input) and K joints. Decoding takes each joint's integer
argmax, refines it to sub-pixel precision with DARK in its UDP variant
(Zhang et al., *Distribution-Aware Coordinate Representation for Human Pose
Estimation*, CVPR 2020; Huang et al., *The Devil is in the Details*, CVPR
2020; mmpose's `post_dark_udp`, which the ViTPose code uses with kernel 11)
and maps the grid point back into the image with the inverse of the UDP crop
(`mae_jax.pose.topdown`).
"""
import numpy as np
import scipy.ndimage

from mae_jax.pose.topdown import PIXEL_STD

BLURS = ('official', 'transformers')


def flip_back(heatmaps, flip_pairs):
  """Heatmaps (P, h, w, K) of horizontally mirrored crops -> heatmaps of
  the original crops: the w axis reversed and the joints of every
  (left, right) pair in `flip_pairs` exchanged. NumPy or JAX arrays (it
  runs inside jitted functions too)."""
  order = np.arange(heatmaps.shape[-1])
  for left, right in flip_pairs:
    order[left], order[right] = right, left
  return heatmaps[:, :, ::-1, :][..., order]


def argmax_coords(heatmaps):
  """Integer peak of every joint's heatmap.

  heatmaps: (P, h, w, K). Returns (coords (P, K, 2) float32 (x, y) grid
  positions of the maximum (the first in raster order on ties), -1 where
  the maximum is <= 0; scores (P, K) float32, the maximum).
  """
  heatmaps = np.asarray(heatmaps, np.float32)
  p, h, w, k = heatmaps.shape
  flat = heatmaps.transpose(0, 3, 1, 2).reshape(p, k, h * w)
  index = flat.argmax(axis=-1)
  scores = flat.max(axis=-1)
  coords = np.stack([index % w, index // w], axis=-1).astype(np.float32)
  coords[scores <= 0] = -1
  return coords, scores


def blur_sigma_mode(blur, kernel):
  """(sigma, scipy border mode) of the Gaussian blur named `blur`:

  'official': mmpose's cv2.GaussianBlur(kernel x kernel, sigma 0), whose
  sigma follows OpenCV's rule 0.3 * ((kernel - 1) / 2 - 1) + 0.8 (2.0 for
  kernel 11) and whose border is reflect-101 (scipy 'mirror').
  'transformers': Hugging Face's ViTPose post-processing, sigma 0.8 and
  scipy's default border 'reflect', whatever the kernel.
  """
  if blur == 'official':
    return 0.3 * ((kernel - 1) * 0.5 - 1) + 0.8, 'mirror'
  if blur == 'transformers':
    return 0.8, 'reflect'
  raise ValueError(f'blur={blur!r} is not one of {", ".join(BLURS)}')


def blur_heatmaps(heatmaps, kernel=11, blur='official'):
  """Heatmaps (P, h, w, K) float32 blurred over h and w by the Gaussian
  named `blur` (`blur_sigma_mode`), truncated to kernel x kernel taps
  (radius (kernel - 1) // 2)."""
  sigma, mode = blur_sigma_mode(blur, kernel)
  return scipy.ndimage.gaussian_filter(
      np.asarray(heatmaps, np.float32), sigma, mode=mode,
      radius=(kernel - 1) // 2, axes=(1, 2))


def refine_dark_udp(coords, heatmaps, kernel=11, blur='official'):
  """DARK-UDP sub-pixel refinement of integer peaks.

  coords: (P, K, 2) integer (x, y) peaks from `argmax_coords`; heatmaps:
  (P, h, w, K). Each heatmap is blurred (`blur_heatmaps`), clipped to
  [0.001, 50] and logged, then padded by one edge pixel; the gradient g
  and Hessian H of the log-heatmap at the peak by central finite
  differences give one Newton step,
  coords - (H + eps I)^-1 g (eps: float32 machine epsilon). Joints at -1
  (maximum <= 0) are returned unchanged, as is a joint whose H + eps I is
  singular. Returns (P, K, 2) float64.

  blur='official' is the ViTPose/mmpose post-processing (sigma 2.0 for
  kernel 11, reflect-101 border); blur='transformers' reproduces Hugging
  Face transformers' ViTPose post-processing, which deviates from it: its
  blur has sigma 0.8 for every kernel size (only the radius follows the
  kernel) and reflects the border including the edge pixel, so its
  keypoints differ slightly from the official ones.
  """
  coords = np.asarray(coords, np.float64)
  heatmaps = np.asarray(heatmaps, np.float32)
  p, h, w, k = heatmaps.shape
  if coords.shape != (p, k, 2):
    raise ValueError(f'coords of shape {coords.shape} do not match '
                     f'heatmaps of shape {heatmaps.shape}: need ({p}, {k}, 2)')
  blurred = blur_heatmaps(heatmaps, kernel, blur)
  logs = np.pad(np.log(np.clip(blurred, 0.001, 50)),
                ((0, 0), (1, 1), (1, 1), (0, 0)), mode='edge')
  found = coords[..., 0] >= 0
  col = np.where(found, coords[..., 0], 0).astype(int) + 1
  row = np.where(found, coords[..., 1], 0).astype(int) + 1
  persons = np.arange(p)[:, None]
  joints = np.arange(k)[None, :]

  def at(dy, dx):  # log-heatmap at (peak row + dy, peak col + dx)
    return logs[persons, row + dy, col + dx, joints].astype(np.float64)

  centre, right, left = at(0, 0), at(0, 1), at(0, -1)
  down, up = at(1, 0), at(-1, 0)
  gx = 0.5 * (right - left)
  gy = 0.5 * (down - up)
  eps = float(np.finfo(np.float32).eps)
  hxx = right - 2 * centre + left + eps
  hyy = down - 2 * centre + up + eps
  hxy = 0.5 * (at(1, 1) - right - down + 2 * centre - left - up
               + at(-1, -1))
  det = hxx * hyy - hxy * hxy
  ok = found & (det != 0)
  det = np.where(ok, det, 1.0)
  step = np.stack([(hyy * gx - hxy * gy) / det,
                   (hxx * gy - hxy * gx) / det], axis=-1)
  return coords - np.where(ok[..., None], step, 0.0)


def to_image(coords, centers, scales, heatmap_hw, pixel_std=PIXEL_STD):
  """Heatmap-grid (x, y) -> image pixels, the inverse of the UDP crop:
  grid point 0 lands on the region's first edge, point size - 1 on its
  last, so one grid step is scale * pixel_std / (size - 1) pixels.

  coords: (P, K, 2); centers, scales: (P, 2) (x, y) and (w, h) from
  `mae_jax.pose.topdown.model_inputs`; heatmap_hw: (h, w) of the grid.
  Returns (P, K, 2) float64.
  """
  coords = np.asarray(coords, np.float64)
  centers = np.asarray(centers, np.float64)[:, None, :]
  extent = np.asarray(scales, np.float64)[:, None, :] * pixel_std
  steps = np.array([heatmap_hw[1] - 1.0, heatmap_hw[0] - 1.0])
  return coords * extent / steps + centers - 0.5 * extent


def decode(heatmaps, centers, scales, kernel=11, blur='official',
           pixel_std=PIXEL_STD):
  """Keypoints (P, K, 3) float32 from heatmaps (P, h, w, K): x, y in image
  pixels (argmax, `refine_dark_udp`, `to_image`) and the score, the
  heatmap's maximum. centers, scales: (P, 2) as `model_inputs` gives them.
  A joint whose maximum is <= 0 has no peak; its position is meaningless
  (its score says so)."""
  heatmaps = np.asarray(heatmaps, np.float32)
  coords, scores = argmax_coords(heatmaps)
  coords = refine_dark_udp(coords, heatmaps, kernel, blur)
  xy = to_image(coords, centers, scales, heatmaps.shape[1:3], pixel_std)
  return np.concatenate([xy, scores[..., None]], axis=-1).astype(np.float32)
