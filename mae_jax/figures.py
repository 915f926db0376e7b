"""Reconstruction figures: original, masked, reconstruction, and
reconstruction with the visible patches pasted back, one row per image.

Used by the training loop (a figure every few steps), the command line
`python -m mae_jax.visualize` and the notebook. Figures are drawn on a
standalone matplotlib Figure (no pyplot, no global backend); matplotlib
(extra `viz`) is imported only when one is drawn.
"""
import io

import numpy as np

from mae_jax import extras
from mae_jax.images import IMAGENET_MEAN, IMAGENET_STD
from mae_jax.models.mae import denormalize_patches
from mae_jax.models.patches import patchify, unpatchify

PANEL_INCHES = 3  # each panel is PANEL_INCHES square
DPI = 80          # so a figure is 4 * 240 px wide and 240 px per row


def pixel_stats(channels, mean=None, std=None):
  """Per-channel float32 (mean, std), `channels` values each, that
  de-normalise images as x * std + mean: `mean`/`std` as given (length C or
  scalars); by default the ImageNet RGB statistics for 3 channels, else 0
  and 1 (images shown as they are)."""
  if mean is None and std is None and channels == 3:
    mean, std = IMAGENET_MEAN, IMAGENET_STD
  mean = np.broadcast_to(np.asarray(0.0 if mean is None else mean,
                                    np.float32), (channels,))
  std = np.broadcast_to(np.asarray(1.0 if std is None else std,
                                   np.float32), (channels,))
  return mean, std


def reconstruction_panels(imgs, pred, mask, patch_size, norm_pix_loss,
                          mean=None, std=None):
  """Four (N, H, W, 3) arrays in [0, 1] from normalised NHWC images of C
  channels, predictions (N, L, p*p*C) and mask (N, L) (1 = removed).

  A norm-pix model predicts normalised patches; each predicted patch is
  mapped back with the mean and (unbiased) variance of its target patch
  (`denormalize_patches`). Pixels are de-normalised with `pixel_stats` and
  clipped to [0, 1]. C >= 3 shows the first three channels as RGB; C = 1
  or 2 shows the first channel as gray.
  """
  imgs = np.asarray(imgs, np.float32)
  pred = np.asarray(pred, np.float32)
  mask = np.asarray(mask, np.float32)[..., None]
  _, h, w, c = imgs.shape
  mean, std = pixel_stats(c, mean, std)
  p = patch_size
  if norm_pix_loss:
    pred = np.asarray(denormalize_patches(pred, patchify(imgs, p)))
  grid = (h // p, w // p)
  recon = np.asarray(unpatchify(pred, p, grid, channels=c))
  mask_img = np.asarray(unpatchify(np.repeat(mask, p * p * c, axis=-1), p,
                                   grid, channels=c))[..., :1]

  def to_rgb(x):
    x = np.clip(x * std + mean, 0, 1)
    return x[..., :3] if c >= 3 else np.repeat(x[..., :1], 3, axis=-1)
  original = to_rgb(imgs)
  masked = original * (1 - mask_img) + 0.5 * mask_img
  recon_rgb = to_rgb(recon)
  pasted = original * (1 - mask_img) + recon_rgb * mask_img
  return original, masked, recon_rgb, pasted


def reconstruction_figure(imgs, pred, mask, patch_size, norm_pix_loss,
                          title=None, row_labels=None, mean=None, std=None):
  """A matplotlib Figure, one row per image and four titled panels per row;
  (4 * PANEL_INCHES, rows * PANEL_INCHES) inches. `mean`/`std` as in
  `reconstruction_panels`."""
  figure = extras.require('matplotlib.figure', 'viz', 'reconstruction figures')
  panels = reconstruction_panels(imgs, pred, mask, patch_size, norm_pix_loss,
                                 mean, std)
  titles = ['original', 'masked',
            'reconstruction' + (' (norm-pix, de-normalised)'
                                if norm_pix_loss else ''),
            'reconstruction + visible']
  rows = panels[0].shape[0]
  fig = figure.Figure(figsize=(4 * PANEL_INCHES, PANEL_INCHES * rows))
  axes = fig.subplots(rows, 4, squeeze=False)
  for r in range(rows):
    for c in range(4):
      ax = axes[r, c]
      ax.imshow(panels[c][r])
      ax.set_xticks([])
      ax.set_yticks([])
      if r == 0:
        ax.set_title(titles[c], fontsize=10)
    if row_labels is not None:
      axes[r, 0].set_ylabel(row_labels[r], fontsize=9)
  top = 1 - 0.3 / (PANEL_INCHES * rows) if title else 1
  fig.tight_layout(rect=(0, 0, 1, top))
  if title:
    fig.suptitle(title, fontsize=10)
  return fig


def figure_png(fig):
  """PNG bytes of a figure at DPI (e.g. for IPython.display.Image)."""
  buf = io.BytesIO()
  fig.savefig(buf, format='png', dpi=DPI)
  return buf.getvalue()


def save_reconstruction_figure(path, imgs, pred, mask, patch_size,
                               norm_pix_loss, title=None, row_labels=None,
                               mean=None, std=None):
  """Writes the `reconstruction_figure` as a PNG at DPI to `path` (a local
  path or a binary file object); returns `path`."""
  fig = reconstruction_figure(imgs, pred, mask, patch_size, norm_pix_loss,
                              title, row_labels, mean, std)
  fig.savefig(path, format='png', dpi=DPI)
  return path
