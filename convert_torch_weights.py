"""Converts MAE / ViT / ViTPose weights between PyTorch files and mae_jax
checkpoints.

  python convert_torch_weights.py mae_visualize_vit_large.pth out/mae_large
  python convert_torch_weights.py mae_pretrain_vit_base_full.pth out/mae_base \\
      --norm-pix-loss               # record how the weights were trained
  python convert_torch_weights.py mae_pretrain_vit_base.pth out/vit_base \\
      --model vit_base_patch16      # encoder-only file -> fine-tuning init
  python convert_torch_weights.py mae_pretrain_vit_base.pth out/vit_gray \\
      --model vit_base_patch16 --img-size 384,256 --in-chans 1
  python convert_torch_weights.py out/mae_large mae_large.pth --to-torch
  python convert_torch_weights.py vitpose-base-simple/ out/vitpose_b
      # a Hugging Face VitPoseForPoseEstimation directory (config.json +
      # model.safetensors), or an official ViTPose .pth (mmpose state_dict)
  python convert_torch_weights.py mae_pretrain_vit_base.pth out/pose_init \\
      --model vitpose_base_patch16 --head simple   # MAE encoder -> ViTPose
  python convert_torch_weights.py out/vitpose_b vitpose_b.pth --to-torch

A torch file holds no model description, so an MAE's norm_pix_loss comes from
--[no-]norm-pix-loss, else from a training checkpoint's args, else the
default (False); the summary says which. Weights holding NaN or Inf are
refused, naming the tensors, unless --allow-nonfinite.

The file's channel count comes from its patch-embedding kernel and its patch
grid from pos_embed; a non-square grid needs --img-size (the size the file
was made for). --img-size another size gives the model at that size (the
MAE's fixed sin-cos tables recomputed, a learned pos_embed resampled
bicubically); --in-chans another count adapts the patch-embedding kernel
(summed over channels for 1, else repeated cyclically and scaled by
C_file / N).
"""
import argparse
import sys


def _img_size(text):
  """'224' -> 224, '384,256' -> (384, 256)."""
  try:
    sides = tuple(int(v) for v in text.split(','))
  except ValueError:
    sides = ()
  if len(sides) not in (1, 2) or min(sides) <= 0:
    raise argparse.ArgumentTypeError(f'{text!r} is not H,W or a single size '
                                     '(positive ints)')
  return sides[0] if len(sides) == 1 else sides


def _positive(text):
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value <= 0:
    raise argparse.ArgumentTypeError(f'{text!r} is not a positive int')
  return value


def _parser():
  parser = argparse.ArgumentParser(
      description=__doc__.split('\n\n', maxsplit=1)[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('src', help='.pth/.pt/.safetensors file, a Hugging '
                      'Face VitPose directory, or a mae_jax checkpoint '
                      'directory (with --to-torch, or as the backbone of a '
                      '--model vitpose_...)')
  parser.add_argument('dst', help='new mae_jax checkpoint directory, or a '
                      '.pth file with --to-torch')
  parser.add_argument('--model', help='registry name, e.g. mae_vit_large_'
                      'patch16, vit_base_patch16 or vitpose_base_patch16 '
                      '(default: detected); a vitpose_ name for MAE / ViT '
                      'weights makes a pose model with a fresh head')
  parser.add_argument('--head', choices=('classic', 'simple'),
                      help='ViTPose heatmap head of a --model vitpose_... '
                      'initialisation (default: classic)')
  parser.add_argument('--norm-pix-loss', action=argparse.BooleanOptionalAction,
                      default=None,
                      help="MAE only: record that the weights were trained "
                      "with (or without) the norm-pix loss (default: the "
                      "file's args.norm_pix_loss if it has them, else False)")
  parser.add_argument('--img-size', type=_img_size, metavar='H,W',
                      help="image size of the converted model, H,W or one "
                      "int (default: the file's); needed for a non-square "
                      "file")
  parser.add_argument('--in-chans', type=_positive, metavar='N',
                      help="input channels of the converted model (default: "
                      "the file's); another count adapts the patch "
                      "embedding")
  parser.add_argument('--allow-nonfinite', action='store_true',
                      help='convert weights holding NaN or Inf, with a '
                      'warning, instead of refusing them')
  parser.add_argument('--to-torch', action='store_true',
                      help='write an official-layout .pth from SRC')
  return parser


def main(argv=None):
  args = _parser().parse_args(argv)
  from mae_jax import convert  # pylint: disable=import-outside-toplevel
  # pylint: disable-next=import-outside-toplevel
  from mae_jax.errors import CheckpointError, MaeJaxError
  warn = lambda message: print(f'warning: {message}', file=sys.stderr)
  try:
    if args.to_torch:
      for flag, value in (('--model', args.model),
                          ('--[no-]norm-pix-loss', args.norm_pix_loss),
                          ('--img-size', args.img_size),
                          ('--in-chans', args.in_chans),
                          ('--head', args.head)):
        if value is not None:
          raise CheckpointError(f'{flag} applies to torch -> mae_jax '
                                'conversion only (a torch state dict has no '
                                'model description)')
      report = convert.export_file(args.src, args.dst, args.allow_nonfinite,
                                   warn)
    else:
      report = convert.convert_file(args.src, args.dst, args.model,
                                    args.norm_pix_loss, args.allow_nonfinite,
                                    warn, args.img_size, args.in_chans,
                                    args.head)
  except (MaeJaxError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  for line in report:
    print(line)
  print(f'wrote {args.dst}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
