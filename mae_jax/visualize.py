"""Reconstruction figures of a checkpoint, from the command line:

  python -m mae_jax.visualize --checkpoint PATH [--image FILE_OR_FOLDER]
      [--mask-ratio 0.75 | --sweep 0.5,0.75,0.9] [--seed 0] [--out fig.png]
      [--norm-pix-loss | --no-norm-pix-loss]

PATH is a mae_jax checkpoint directory, a training workdir, or an official
.pth / .pt / .safetensors file (converted in memory). The figures are drawn
by mae_jax.figures.

Masks: each image's mask noise is drawn from fold_in(key(seed), crc32 of the
image's normalised pixels), so an image gets the same mask whatever else is
in the batch or folder and wherever it sits there.
"""
import argparse
import functools
import os
import sys
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from mae_jax import checkpoint, extras, images, paths
from mae_jax.errors import CheckpointError, ConfigError, MaeJaxError
from mae_jax.figures import figure_png, reconstruction_figure
from mae_jax.models import MaskedAutoencoder
from mae_jax.models.mae import masked_patch_loss
from mae_jax.models.masking import num_kept

WEIGHT_EXTENSIONS = ('.pth', '.pt', '.safetensors')


def _load(path, norm_pix_loss=None):
  """(MaskedAutoencoder, variables, where its norm_pix_loss came from)."""
  shown = os.fspath(path)
  if shown.endswith(WEIGHT_EXTENSIONS) and not paths.resolve(path).is_dir():
    from mae_jax import convert, torch_io  # pylint: disable=import-outside-toplevel
    state_dict, extras_ = torch_io.read_state_dict(path)
    norm_pix_loss, where = convert.norm_pix_setting(norm_pix_loss, extras_)
    model, params, _ = convert.from_torch(state_dict, extras=extras_,
                                          source=shown)
    variables = {'params': params}
  else:
    model, variables = checkpoint.load(path)
    where = ('from the checkpoint' if norm_pix_loss is None else
             f'from --{"" if norm_pix_loss else "no-"}norm-pix-loss')
  if not isinstance(model, MaskedAutoencoder):
    raise CheckpointError(f'{shown}: holds a {type(model).__name__} '
                          '(classifier) without a decoder; reconstructions '
                          'need a full MAE checkpoint')
  if norm_pix_loss is not None:
    model = model.clone(norm_pix_loss=bool(norm_pix_loss))
  return model, variables, where


def load_model(path, norm_pix_loss=None):
  """(MaskedAutoencoder, {'params'}) from a mae_jax checkpoint directory,
  a training workdir or an official .pth/.pt/.safetensors file (converted in
  memory, nothing written). Raises CheckpointError naming the path.

  norm_pix_loss (None: what the checkpoint says; for a torch file, its
  training args, else False) sets how predictions are read."""
  return _load(path, norm_pix_loss)[:2]


@functools.partial(jax.jit, static_argnames=('model', 'mask_ratio'))
def _forward(model, params, imgs, noise, mask_ratio):
  """pred (N, L, p*p*3), mask (N, L), per-image masked-patch MSE (N,)."""
  _, pred, mask = model.apply({'params': params}, imgs, mask_ratio=mask_ratio,
                              noise=noise)
  return pred, mask, masked_patch_loss(imgs, pred, mask, model.patch_size,
                                       model.norm_pix_loss, per_example=True)


def check_mask_ratio(model, mask_ratio):
  """Raises ConfigError unless 0 < mask_ratio < 1 keeps at least one patch."""
  if not 0 < mask_ratio < 1:
    raise ConfigError(f'mask ratio {mask_ratio} must lie in the open interval '
                      '(0, 1)')
  if num_kept(model.num_patches, mask_ratio) < 1:
    raise ConfigError(f'mask ratio {mask_ratio} leaves no visible patch of '
                      f'{model.num_patches}')


def mask_noise(seed, imgs, num_patches):
  """(N, L) uniform mask noise, image i's drawn from fold_in(key(seed),
  crc32 of its float32 pixels): it depends on the image, not on the batch."""
  ids = [zlib.crc32(np.ascontiguousarray(img, np.float32).tobytes())
         for img in np.asarray(imgs)]
  keys = jax.vmap(jax.random.fold_in, (None, 0))(
      jax.random.key(seed), jnp.asarray(ids, jnp.uint32))
  return jax.vmap(lambda k: jax.random.uniform(k, (num_patches,)))(keys)


def reconstruct(model, variables, imgs, mask_ratio=0.75, seed=0):
  """Runs the MAE on normalised NHWC images (N, H, W, 3).

  The mask noise is `mask_noise(seed, imgs, L)`: per image, from the seed
  and a hash of the image's pixels, so a seed fixes each image's mask
  whatever else is in `imgs`. Returns NumPy pred (N, L, p*p*3), mask (N, L)
  (1 = removed) and the per-image masked-patch MSE (N,) in the units of the
  model's loss target (normalised pixels; per-patch normalised for a
  norm-pix model).
  """
  check_mask_ratio(model, mask_ratio)
  noise = mask_noise(seed, imgs, model.num_patches)
  imgs = jnp.asarray(imgs, jnp.float32)
  out = _forward(model, variables['params'], imgs, noise, float(mask_ratio))
  return tuple(np.asarray(x) for x in out)


def figure_title(model, source, seed, where=None):
  """Suptitle naming the checkpoint, seed and (norm-pix) de-normalisation;
  `where` says where norm_pix_loss came from."""
  title = f'{os.path.basename(os.path.normpath(source))}  seed {seed}'
  if model.norm_pix_loss:
    title += ('  |  norm-pix model' + (f' ({where})' if where else '')
              + ': predicted patches de-normalised with the mean/variance of '
              'their target patches')
  return title


def visualize(checkpoint_path, image=None, mask_ratios=(0.75,), seed=0,
              out='reconstruction.png', warn=None, norm_pix_loss=None):
  """Loads, reconstructs and writes the figure: one row per (image, ratio).

  Returns (out, rows, (norm_pix_loss, where it came from)) with rows a list
  of (image name, mask ratio, MSE).
  """
  extras.require('matplotlib.figure', 'viz', 'reconstruction figures')  # early
  files = images.resolve(image)
  model, variables, where = _load(checkpoint_path, norm_pix_loss)
  for r in mask_ratios:
    check_mask_ratio(model, r)
  names, imgs = images.load_images(files, model.img_size, warn)
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
  fig = reconstruction_figure(cat(shown), cat(preds), cat(masks),
                              model.patch_size, model.norm_pix_loss,
                              figure_title(model, checkpoint_path, seed, where),
                              labels)
  paths.resolve(out).parent.mkdir(parents=True, exist_ok=True)
  paths.write_atomic(out, figure_png(fig))
  return out, rows, (model.norm_pix_loss, where)


def _ratios(text):
  try:
    return tuple(float(x) for x in text.split(',') if x.strip())
  except ValueError:
    raise argparse.ArgumentTypeError(
        f'{text!r} is not a comma-separated list of numbers') from None


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
  """Shows each default, except None (the help says what happens then)."""

  def _get_help_string(self, action):
    if action.default is None:
      return action.help
    return super()._get_help_string(action)


def parse_args(argv=None):
  p = argparse.ArgumentParser(
      prog='python -m mae_jax.visualize', formatter_class=_HelpFormatter,
      description='MAE reconstruction figure: original, masked, '
      'reconstruction, reconstruction + visible patches.')
  p.add_argument('--checkpoint', required=True,
                 help='mae_jax checkpoint dir, training workdir, or official '
                 '.pth/.pt/.safetensors file')
  p.add_argument('--image', default=None,
                 help='image file, or a folder (one row per image); default: '
                 f'the embedded {images.DEFAULT_IMAGE} from scikit-image')
  ratio = p.add_mutually_exclusive_group()
  ratio.add_argument('--mask-ratio', type=float, default=0.75,
                     help='fraction of patches removed')
  ratio.add_argument('--sweep', type=_ratios, default=None,
                     help='comma-separated mask ratios, one row each')
  p.add_argument('--seed', type=int, default=0,
                 help="mask noise seed (each image's noise also depends on "
                 'its pixels, not on the other images)')
  p.add_argument('--norm-pix-loss', action=argparse.BooleanOptionalAction,
                 default=None,
                 help='read predictions as per-patch normalised (norm-pix) '
                 'and de-normalise them; default: what the checkpoint says '
                 "(for a torch file: its training args, else off)")
  p.add_argument('--out', default='reconstruction.png', help='PNG to write')
  return p.parse_args(argv)


def main(argv=None):
  """CLI entry point; returns the exit code (2 for bad inputs)."""
  args = parse_args(argv)
  ratios = args.sweep or (args.mask_ratio,)
  warn = lambda msg: print(f'warning: {msg}', file=sys.stderr)
  try:
    out, rows, (norm_pix, where) = visualize(
        args.checkpoint, args.image, ratios, args.seed, args.out, warn,
        args.norm_pix_loss)
  except (MaeJaxError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'figure: {out}')
  print(f'norm_pix_loss: {norm_pix} ({where})')
  units = 'per-patch normalised pixels' if norm_pix else 'normalised pixels'
  for name, r, mse in rows:
    print(f'  {name}  mask ratio {r:g}  masked-patch MSE {mse:.6f} ({units})')
  return 0


if __name__ == '__main__':
  sys.exit(main())
