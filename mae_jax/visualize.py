"""Reconstruction figures: original, masked, reconstruction, and
reconstruction with the visible patches pasted back.

The figure code is shared by the training loop and the command line.
"""
import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mae_jax.models.patches import patchify, unpatchify  # noqa: E402

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def reconstruction_panels(imgs, pred, mask, patch_size, norm_pix_loss):
  """Four (N, H, W, 3) arrays in [0, 1] from normalised NHWC images,
  predictions (N, L, p*p*3) and mask (N, L) (1 = removed).

  A norm-pix model predicts normalised patches; each predicted patch is
  mapped back with the mean and (unbiased) variance of its target patch.
  """
  imgs = np.asarray(imgs, np.float32)
  pred = np.asarray(pred, np.float32)
  mask = np.asarray(mask, np.float32)[..., None]
  n, h, w, _ = imgs.shape
  p = patch_size
  if norm_pix_loss:
    target = np.asarray(patchify(imgs, p))
    mean = target.mean(-1, keepdims=True)
    std = np.sqrt(target.var(-1, ddof=1, keepdims=True) + 1e-6)
    pred = pred * std + mean
  grid = (h // p, w // p)
  recon = np.asarray(unpatchify(pred, p, grid))
  mask_img = np.asarray(unpatchify(np.repeat(mask, p * p * 3, axis=-1), p, grid))
  to_rgb = lambda x: np.clip(x * IMAGENET_STD + IMAGENET_MEAN, 0, 1)
  original = to_rgb(imgs)
  masked = original * (1 - mask_img) + 0.5 * mask_img
  recon_rgb = to_rgb(recon)
  pasted = original * (1 - mask_img) + recon_rgb * mask_img
  return original, masked, recon_rgb, pasted


def save_reconstruction_figure(path, imgs, pred, mask, patch_size,
                               norm_pix_loss, title=None, row_labels=None):
  """Writes a PNG grid, one row per image and four panels per row."""
  panels = reconstruction_panels(imgs, pred, mask, patch_size, norm_pix_loss)
  titles = ['original', 'masked',
            'reconstruction' + (' (norm-pix, de-normalised)'
                                if norm_pix_loss else ''),
            'reconstruction + visible']
  rows = panels[0].shape[0]
  fig, axes = plt.subplots(rows, 4, figsize=(12, 3 * rows), squeeze=False)
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
  fig.tight_layout(rect=(0, 0, 1, 0.97 if title else 1))
  if title:
    fig.suptitle(title)
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return path
