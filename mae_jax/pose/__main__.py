"""python -m mae_jax.pose: keypoints of the people in one image.

  python -m mae_jax.pose --checkpoint ckpt/vitpose_base --image people.jpg \\
      --boxes "412.8,157.6,53.1,138.0;384.4,172.2,15.1,35.7" --flip-test \\
      --out pose.png --json keypoints.json

The checkpoint is a mae_jax ViTPose directory (convert an official .pth or
a Hugging Face directory with convert_torch_weights.py first). Without
--boxes the whole image is one person box. The JSON is COCO keypoint
results; the figure shows the skeletons over the image and the heatmaps.
"""
import argparse
import json
import sys

import numpy as np


def _boxes(text):
  """'x,y,w,h;x,y,w,h' -> (P, 4) float array."""
  try:
    boxes = [[float(v) for v in part.split(',')]
             for part in text.split(';') if part.strip()]
  except ValueError:
    boxes = None
  if not boxes or any(len(b) != 4 or b[2] <= 0 or b[3] <= 0 for b in boxes):
    raise argparse.ArgumentTypeError(
        f'{text!r} is not a list of boxes x,y,w,h;x,y,w,h (w, h > 0)')
  return np.asarray(boxes, np.float32)


def parse_args(argv=None):
  p = argparse.ArgumentParser(
      prog='python -m mae_jax.pose',
      description=__doc__.split('\n\n', maxsplit=1)[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--checkpoint', required=True,
                 help='mae_jax ViTPose checkpoint directory')
  p.add_argument('--image', required=True, help='image file')
  p.add_argument('--boxes', type=_boxes, default=None,
                 help='person boxes "x,y,w,h;..." in pixels (default: the '
                 'whole image)')
  p.add_argument('--flip-test', action='store_true',
                 help='average with the flipped image\'s heatmaps')
  p.add_argument('--blur', choices=('official', 'transformers'),
                 default='official',
                 help='DARK-UDP modulation: the official code\'s (Gaussian '
                 'sigma 2 for kernel 11) or Hugging Face transformers\' '
                 '(sigma 0.8) (default: official)')
  p.add_argument('--out', default='pose.png', help='figure (PNG) to write')
  p.add_argument('--json', default=None,
                 help='COCO keypoint results JSON to write')
  p.add_argument('--image-id', type=int, default=0,
                 help='image_id written in the JSON')
  return p.parse_args(argv)


def main(argv=None):
  """CLI entry point; returns the exit code (2 for bad inputs)."""
  args = parse_args(argv)
  # pylint: disable=import-outside-toplevel
  from mae_jax import checkpoint, images, paths
  from mae_jax.errors import MaeJaxError
  from mae_jax.models import ViTPose
  from mae_jax.pose import estimate, figure
  try:
    model, variables = checkpoint.load(args.checkpoint)
    if not isinstance(model, ViTPose):
      raise MaeJaxError(f'{args.checkpoint}: holds a {type(model).__name__},'
                        ' not a ViTPose')
    image = np.asarray(images.read_rgb(args.image))
    out = estimate.estimate(model, variables, image, args.boxes,
                            args.flip_test, args.blur)
    results = estimate.coco_results(out['keypoints'], args.image_id)
    if args.json:
      paths.write_atomic(args.json, json.dumps(results, indent=1))
    figure.save_pose_figure(
        args.out, image, out['keypoints'], out['heatmaps'], out['boxes'],
        title=f'{paths.shown(args.image)}: {len(results)} person box(es)'
        + (', flip test' if args.flip_test else ''))
  except (MaeJaxError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  for i, result in enumerate(results):
    print(f'person {i}: score {result["score"]:.3f}')
  print(f'figure: {args.out}')
  if args.json:
    print(f'keypoints: {args.json}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
