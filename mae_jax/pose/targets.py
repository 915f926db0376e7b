"""Training targets and loss of top-down pose estimation, as in the ViTPose
COCO recipe (ViTAE-Transformer/ViTPose, mmpose's top-down target
generation with encoding 'UDP' and its JointsMSELoss with target weights).

Heatmaps follow the unbiased encoding of Huang et al., *The Devil is in the
Details* (CVPR 2020): input pixel x maps to grid x / s with the stride
s = (input size - 1) / (heatmap size - 1), so the first and last input
pixels land on the first and last grid points, matching the UDP crop
(`mae_jax.pose.topdown`) and decoding (`mae_jax.pose.decode.to_image`).
Heatmaps are NHWC, (h, w, K) per sample.
"""
import jax.numpy as jnp
import numpy as np

from mae_jax.pose.topdown import INPUT_HW

HEATMAP_HW = (64, 48)
SIGMA = 2.0


def udp_heatmaps(joints, visible, input_hw=INPUT_HW, heatmap_hw=HEATMAP_HW,
                 sigma=SIGMA):
  """UDP Gaussian heatmaps and target weights of one sample.

  joints: (K, 2) (x, y) in input pixels; visible: (K,) (0 or 1).
  Each joint's grid position mu = joint / stride (per axis; stride as in
  the module docstring) is rounded as int(mu + 0.5) (truncating toward
  zero); the window of half-width 3 * sigma around that point
  ([int(r - 3 sigma), int(r + 3 sigma + 1)) per axis) holds the
  unnormalised Gaussian exp(-|p - mu|^2 / (2 sigma^2)) centred at the
  sub-pixel mu, clipped to the grid; every other value is 0. A joint's
  weight is its visibility, set to 0 when its window lies entirely off
  the grid; a joint is drawn only when its weight exceeds 0.5.

  Returns (heatmaps (h, w, K) float32, target_weight (K,) float32).
  """
  joints = np.asarray(joints, np.float64)
  visible = np.asarray(visible, np.float32)
  if joints.ndim != 2 or joints.shape[1] != 2:
    raise ValueError(f'joints of shape {joints.shape} must be (K, 2) (x, y)')
  if visible.shape != joints.shape[:1]:
    raise ValueError(f'visible of shape {visible.shape} does not match '
                     f'joints of shape {joints.shape}')
  h, w = heatmap_hw
  size = np.array([w, h])
  stride = (np.array([input_hw[1], input_hw[0]]) - 1.0) / (size - 1.0)
  radius = 3 * sigma
  window = 2 * radius + 1                  # the Gaussian patch's extent
  taps = len(np.arange(0, window, 1))      # its sample count
  heatmaps = np.zeros((joints.shape[0], h, w), np.float32)
  weights = visible.copy()
  for k, (x, y) in enumerate(joints):
    mu = np.array([x, y]) / stride
    rounded = [int(m + 0.5) for m in mu]
    lo = [int(r - radius) for r in rounded]
    hi = [int(r + radius + 1) for r in rounded]
    if lo[0] >= w or lo[1] >= h or hi[0] < 0 or hi[1] < 0:
      weights[k] = 0
      continue
    if weights[k] <= 0.5:
      continue
    # Patch tap t sits at grid lo + t; the Gaussian's centre is tap
    # window // 2 + (mu - rounded), i.e. grid point mu when 3 sigma is an
    # integer.
    centre = [window // 2 + m - r for m, r in zip(mu, rounded)]
    xs, ys = (np.arange(max(0, lo[a]), min(hi[a], size[a], lo[a] + taps))
              for a in range(2))
    dx = xs - lo[0] - centre[0]
    dy = ys - lo[1] - centre[1]
    if len(xs) and len(ys):
      heatmaps[k, ys[0]:ys[-1] + 1, xs[0]:xs[-1] + 1] = np.exp(
          -(dx[None, :] ** 2 + dy[:, None] ** 2) / (2 * sigma ** 2))
  return np.ascontiguousarray(heatmaps.transpose(1, 2, 0)), weights


def joints_mse_loss(pred, target, target_weight):
  """The heatmap loss of the ViTPose recipe (JointsMSELoss with target
  weights, loss weight 1).

  pred, target: (N, h, w, K); target_weight: (N, K). Both heatmaps are
  multiplied by the joint's weight; each joint's squared error is
  averaged over N * h * w, and the joints' means are summed and divided
  by K, i.e. the mean over all N * h * w * K weighted squared errors.
  Returns a float32 scalar.
  """
  pred = jnp.asarray(pred, jnp.float32)
  target = jnp.asarray(target, jnp.float32)
  weight = jnp.asarray(target_weight, jnp.float32)[:, None, None, :]
  return jnp.mean(jnp.square(pred * weight - target * weight))
