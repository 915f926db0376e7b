"""Converts MAE / ViT weights between PyTorch files and mae_jax checkpoints.

  python convert_torch_weights.py mae_visualize_vit_large.pth out/mae_large
  python convert_torch_weights.py mae_pretrain_vit_base.pth out/vit_base \\
      --model vit_base_patch16      # encoder-only file -> fine-tuning init
  python convert_torch_weights.py out/mae_large mae_large.pth --to-torch
"""
import argparse
import sys


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('src', help='.pth/.pt/.safetensors file, or a mae_jax '
                      'checkpoint directory with --to-torch')
  parser.add_argument('dst', help='new mae_jax checkpoint directory, or a '
                      '.pth file with --to-torch')
  parser.add_argument('--model', help='registry name, e.g. mae_vit_large_'
                      'patch16 or vit_base_patch16 (default: detected)')
  parser.add_argument('--to-torch', action='store_true',
                      help='write an official-layout .pth from SRC')
  args = parser.parse_args(argv)
  from mae_jax import convert  # pylint: disable=import-outside-toplevel
  from mae_jax.torch_io import CheckpointError  # pylint: disable=import-outside-toplevel
  try:
    if args.to_torch:
      if args.model:
        parser.error('--model applies to torch -> mae_jax conversion only')
      report = convert.export_file(args.src, args.dst)
    else:
      report = convert.convert_file(args.src, args.dst, args.model)
  except (CheckpointError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  for line in report:
    print(line)
  print(f'wrote {args.dst}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
