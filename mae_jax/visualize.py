"""Reconstruction figures: original, masked, reconstruction, and
reconstruction with the visible patches pasted back.

The figure code is shared by the training loop, the notebook and the
command line:

  python -m mae_jax.visualize --checkpoint PATH [--image FILE_OR_FOLDER]
      [--mask-ratio 0.75 | --sweep 0.5,0.75,0.9] [--seed 0] [--out fig.png]

PATH is a mae_jax checkpoint directory, a training workdir, or an official
.pth / .pt / .safetensors file (converted in memory). Figures are drawn on a
standalone matplotlib Figure (no pyplot, no global backend).
"""
import argparse
import functools
import io
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

from mae_jax import checkpoint, images
from mae_jax.images import IMAGENET_MEAN, IMAGENET_STD, ImageError
from mae_jax.models import MaskedAutoencoder
from mae_jax.models.mae import normalize_patches
from mae_jax.models.masking import num_kept
from mae_jax.models.patches import patchify, unpatchify
from mae_jax.torch_io import CheckpointError

WEIGHT_EXTENSIONS = ('.pth', '.pt', '.safetensors')
PANEL_INCHES = 3  # each panel is PANEL_INCHES square
DPI = 80          # so a figure is 4 * 240 px wide and 240 px per row


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


def reconstruction_figure(imgs, pred, mask, patch_size, norm_pix_loss,
                          title=None, row_labels=None):
  """A matplotlib Figure, one row per image and four titled panels per row;
  (4 * PANEL_INCHES, rows * PANEL_INCHES) inches."""
  panels = reconstruction_panels(imgs, pred, mask, patch_size, norm_pix_loss)
  titles = ['original', 'masked',
            'reconstruction' + (' (norm-pix, de-normalised)'
                                if norm_pix_loss else ''),
            'reconstruction + visible']
  rows = panels[0].shape[0]
  fig = Figure(figsize=(4 * PANEL_INCHES, PANEL_INCHES * rows))
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


def save_reconstruction_figure(path, imgs, pred, mask, patch_size,
                               norm_pix_loss, title=None, row_labels=None):
  """Writes the `reconstruction_figure` as a PNG at DPI; returns `path`."""
  fig = reconstruction_figure(imgs, pred, mask, patch_size, norm_pix_loss,
                              title, row_labels)
  fig.savefig(path, dpi=DPI)
  return path


def figure_png(fig):
  """PNG bytes of a figure at DPI (e.g. for IPython.display.Image)."""
  buf = io.BytesIO()
  fig.savefig(buf, format='png', dpi=DPI)
  return buf.getvalue()


def load_model(path):
  """(MaskedAutoencoder, {'params'}) from a mae_jax checkpoint directory,
  a training workdir or an official .pth/.pt/.safetensors file (converted in
  memory, nothing written). Raises CheckpointError naming the path."""
  path = os.fspath(path)
  if path.endswith(WEIGHT_EXTENSIONS) and not os.path.isdir(path):
    from mae_jax import convert, torch_io  # pylint: disable=import-outside-toplevel
    state_dict, extras = torch_io.read_state_dict(path)
    model, params, _ = convert.from_torch(state_dict, extras=extras,
                                          source=path)
    variables = {'params': params}
  else:
    model, variables = checkpoint.load(path)
  if not isinstance(model, MaskedAutoencoder):
    raise CheckpointError(f'{path}: holds a {type(model).__name__} '
                          '(classifier) without a decoder; reconstructions '
                          'need a full MAE checkpoint')
  return model, variables


@functools.partial(jax.jit, static_argnames=('model', 'mask_ratio'))
def _forward(model, params, imgs, noise, mask_ratio):
  """pred (N, L, p*p*3), mask (N, L), per-image masked-patch MSE (N,)."""
  _, pred, mask = model.apply({'params': params}, imgs, mask_ratio=mask_ratio,
                              noise=noise)
  target = patchify(imgs, model.patch_size)
  if model.norm_pix_loss:
    target = normalize_patches(target)
  per_patch = jnp.mean((pred.astype(jnp.float32) - target) ** 2, axis=-1)
  return pred, mask, jnp.sum(per_patch * mask, -1) / jnp.sum(mask, -1)


def check_mask_ratio(model, mask_ratio):
  """Raises ValueError unless 0 < mask_ratio < 1 keeps at least one patch."""
  if not 0 < mask_ratio < 1:
    raise ValueError(f'mask ratio {mask_ratio} must lie in the open interval '
                     '(0, 1)')
  if num_kept(model.num_patches, mask_ratio) < 1:
    raise ValueError(f'mask ratio {mask_ratio} leaves no visible patch of '
                     f'{model.num_patches}')


def reconstruct(model, variables, imgs, mask_ratio=0.75, seed=0):
  """Runs the MAE on normalised NHWC images (N, H, W, 3).

  The mask noise is jax.random.uniform(key(seed), (N, L)), so a seed fixes
  the masks. Returns NumPy pred (N, L, p*p*3), mask (N, L) (1 = removed) and
  the per-image masked-patch MSE (N,) in the units of the model's loss target
  (normalised pixels; per-patch normalised for a norm-pix model).
  """
  check_mask_ratio(model, mask_ratio)
  imgs = jnp.asarray(imgs, jnp.float32)
  noise = jax.random.uniform(jax.random.key(seed),
                             (imgs.shape[0], model.num_patches))
  out = _forward(model, variables['params'], imgs, noise, float(mask_ratio))
  return tuple(np.asarray(x) for x in out)


def figure_title(model, source, seed):
  """Suptitle naming the checkpoint, seed and (norm-pix) de-normalisation."""
  title = f'{os.path.basename(os.path.normpath(source))}  seed {seed}'
  if model.norm_pix_loss:
    title += ('  |  norm-pix model: predicted patches de-normalised with '
              'the mean/variance of their target patches')
  return title


def visualize(checkpoint_path, image=None, mask_ratios=(0.75,), seed=0,
              out='reconstruction.png', warn=None):
  """Loads, reconstructs and writes the figure: one row per (image, ratio).

  Returns (out, rows) with rows a list of (image name, mask ratio, MSE).
  """
  paths = images.resolve(image)
  model, variables = load_model(checkpoint_path)
  for r in mask_ratios:
    check_mask_ratio(model, r)
  names, imgs = images.load_images(paths, model.img_size, warn)
  shown, preds, masks, rows = [], [], [], []
  for r in mask_ratios:
    pred, mask, mse = reconstruct(model, variables, imgs, r, seed)
    shown.append(imgs)
    preds.append(pred)
    masks.append(mask)
    rows += [(name, r, float(m)) for name, m in zip(names, mse)]
  order = np.arange(len(rows)).reshape(len(mask_ratios), -1).T.reshape(-1)
  rows = [rows[i] for i in order]
  cat = lambda xs: np.concatenate(xs)[order]
  labels = [f'{n}\nmask {r:g}, MSE {m:.4f}' for n, r, m in rows]
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  save_reconstruction_figure(out, cat(shown), cat(preds), cat(masks),
                             model.patch_size, model.norm_pix_loss,
                             figure_title(model, checkpoint_path, seed),
                             labels)
  return out, rows


def _ratios(text):
  try:
    return tuple(float(x) for x in text.split(',') if x.strip())
  except ValueError:
    raise argparse.ArgumentTypeError(
        f'{text!r} is not a comma-separated list of numbers') from None


def parse_args(argv=None):
  p = argparse.ArgumentParser(
      prog='python -m mae_jax.visualize',
      description='MAE reconstruction figure: original, masked, '
      'reconstruction, reconstruction + visible patches.')
  p.add_argument('--checkpoint', required=True,
                 help='mae_jax checkpoint dir, training workdir, or official '
                 '.pth/.pt/.safetensors file')
  p.add_argument('--image', default=None,
                 help='image file, or a folder (one row per image); default: '
                 f'the embedded {images.DEFAULT_IMAGE} from scikit-image')
  ratio = p.add_mutually_exclusive_group()
  ratio.add_argument('--mask-ratio', type=float, default=0.75)
  ratio.add_argument('--sweep', type=_ratios, default=None,
                     help='comma-separated mask ratios, one row each')
  p.add_argument('--seed', type=int, default=0, help='mask noise seed')
  p.add_argument('--out', default='reconstruction.png', help='PNG to write')
  return p.parse_args(argv)


def main(argv=None):
  """CLI entry point; returns the exit code (2 for bad inputs)."""
  args = parse_args(argv)
  ratios = args.sweep or (args.mask_ratio,)
  warn = lambda msg: print(f'warning: {msg}', file=sys.stderr)
  try:
    out, rows = visualize(args.checkpoint, args.image, ratios, args.seed,
                          args.out, warn)
  except (CheckpointError, ImageError, ValueError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'figure: {out}')
  for name, r, mse in rows:
    print(f'  {name}  mask ratio {r:g}  masked-patch MSE {mse:.6f} '
          '(normalised pixels)')
  return 0


if __name__ == '__main__':
  sys.exit(main())
