"""Pose figures: the image with person boxes, joints and limbs, and beside
it the heatmaps the joints were read from.

Drawn on a standalone matplotlib Figure (no pyplot, no global backend);
matplotlib (extra `viz`) is imported only when a figure is drawn.
"""
import numpy as np

from mae_jax import extras, paths
from mae_jax.figures import PANEL_INCHES, figure_png
from mae_jax.pose.keypoints import SKELETON

COLORS = ('tab:red', 'tab:blue', 'tab:green', 'tab:orange', 'tab:purple',
          'tab:cyan', 'tab:pink', 'tab:olive')  # one per person, cycled


def pose_figure(image, keypoints, heatmaps=None, boxes=None,
                score_threshold=0.3, title=None):
  """A matplotlib Figure of one image's poses.

  image: (H, W, 3) uint8 RGB. keypoints: (P, K, 3) x, y in image pixels
  and score (`mae_jax.pose.decode.decode`); joints scoring at most
  `score_threshold` are not drawn, nor limbs touching them (limbs follow
  the COCO skeleton when K is 17). boxes: optional (P, 4) COCO
  (x, y, w, h). heatmaps: optional (P, h, w, K); then a second panel shows,
  for every person, the maximum over joints of its heatmaps, persons side
  by side.
  """
  figure = extras.require('matplotlib.figure', 'viz', 'pose figures')
  image = np.asarray(image)
  keypoints = np.asarray(keypoints, np.float32)
  if keypoints.ndim != 3 or keypoints.shape[-1] != 3:
    raise ValueError(f'keypoints of shape {keypoints.shape} must be '
                     '(P, K, 3)')
  panels = 1 if heatmaps is None else 2
  fig = figure.Figure(figsize=(panels * PANEL_INCHES * 1.5,
                               PANEL_INCHES * 1.5))
  axes = fig.subplots(1, panels, squeeze=False)[0]
  ax = axes[0]
  ax.imshow(image)
  limbs = SKELETON if keypoints.shape[1] == 17 else ()
  for p, person in enumerate(keypoints):
    color = COLORS[p % len(COLORS)]
    if boxes is not None:
      x, y, w, h = np.asarray(boxes, float)[p]
      ax.add_patch(_rectangle((x, y), w, h, color))
    shown = person[:, 2] > score_threshold
    for a, b in limbs:
      if shown[a] and shown[b]:
        ax.plot(person[[a, b], 0], person[[a, b], 1], color=color,
                linewidth=1.5)
    ax.scatter(person[shown, 0], person[shown, 1], s=12, color=color,
               edgecolors='white', linewidths=0.5, zorder=3)
  ax.set_xlim(-0.5, image.shape[1] - 0.5)
  ax.set_ylim(image.shape[0] - 0.5, -0.5)
  ax.set_title(f'{len(keypoints)} person(s), joints > {score_threshold:g}',
               fontsize=9)
  if heatmaps is not None:
    peaks = np.asarray(heatmaps, np.float32).max(axis=-1)  # (P, h, w)
    gap = np.full((peaks.shape[1], 1), np.nan, np.float32)
    tiles = [t for peak in peaks for t in (peak, gap)][:-1]
    axes[1].imshow(np.concatenate(tiles, axis=1), cmap='magma')
    axes[1].set_title('max over joints of the heatmaps, per person',
                      fontsize=9)
  for ax in axes:
    ax.set_xticks([])
    ax.set_yticks([])
  top = 1 - 0.4 / (PANEL_INCHES * 1.5) if title else 1
  fig.tight_layout(rect=(0, 0, 1, top))
  if title:
    fig.suptitle(title, fontsize=10)
  return fig


def _rectangle(xy, w, h, color):
  patches = extras.require('matplotlib.patches', 'viz', 'pose figures')
  return patches.Rectangle(xy, w, h, fill=False, edgecolor=color,
                           linewidth=1.5)


def save_pose_figure(path, image, keypoints, heatmaps=None, boxes=None,
                     score_threshold=0.3, title=None):
  """Writes `pose_figure` as a PNG to `path` (local or URI) atomically;
  returns the resolved path."""
  fig = pose_figure(image, keypoints, heatmaps, boxes, score_threshold, title)
  return paths.write_atomic(path, figure_png(fig))
