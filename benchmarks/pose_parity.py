"""ViTPose parity: converted Hugging Face models against transformers.

For each geometry (a small one for CPU speed, and ViTPose-B's unless
--no-base) and each head (classic, simple): a seeded random
`VitPoseForPoseEstimation` at 256 x 192, patch 16 (transformers' init, then
every tensor, BatchNorm statistics included, perturbed by seeded noise so
that no layer is an identity), `save_pretrained`, converted with
`mae_jax.convert.convert_file`, loaded with `mae_jax.load`, then measured:
- heatmaps: max abs difference on a batch of 4 random 256 x 192 inputs;
- the full pipeline on skimage's astronaut (uint8) with two boxes:
  `mae_jax.pose.estimate.estimate` (blur 'transformers' and 'official',
  without and with the flip test) against `VitPoseImageProcessor` +
  model + `post_process_pose_estimation` (the flip test there: the
  mirrored inputs run with `flip_pairs` and averaged with the plain ones);
- the round trip through the official mmpose layout
  (`mae_jax.convert.export_file`, then back) bit-exact or not.
Writes docs/pose_parity.json, docs/pose_parity.md (machine, command, date,
versions) and docs/pose_example.png (the small classic model's keypoints on
the astronaut; random weights, as its caption says).

  .venv/bin/python benchmarks/pose_parity.py [--no-base] [--out-dir docs]
"""
import argparse
import datetime
import json
import os
import pathlib
import sys
import tempfile
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import traverse_util  # noqa: E402
from PIL import Image  # noqa: E402
from skimage import data as skdata  # noqa: E402
from transformers import (VitPoseBackboneConfig, VitPoseConfig,  # noqa: E402
                          VitPoseForPoseEstimation, VitPoseImageProcessor)

import mae_jax  # noqa: E402
from benchmarks.visualize_large import machine  # noqa: E402
from mae_jax import convert  # noqa: E402
from mae_jax.models import unstack_blocks  # noqa: E402
from mae_jax.pose import convert as pose_convert, estimate, figure  # noqa: E402
from mae_jax.pose.keypoints import FLIP_PAIRS  # noqa: E402
from mae_jax.torch_io import read_state_dict  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')

GEOMETRIES = {'small': dict(hidden_size=64, num_hidden_layers=2,
                            num_attention_heads=2),
              'base': dict(hidden_size=768, num_hidden_layers=12,
                           num_attention_heads=12)}
# COCO (x, y, w, h) boxes on the 512 x 512 astronaut: around the person, and
# a background patch at the top left.
BOXES = [[100.0, 20.0, 350.0, 490.0], [0.0, 0.0, 120.0, 200.0]]
PERTURB_STD = 0.02


def hf_model(geometry, head, seed):
  """Seeded random VitPoseForPoseEstimation (eval mode)."""
  torch.manual_seed(seed)
  g = GEOMETRIES[geometry]
  backbone = VitPoseBackboneConfig(
      image_size=[256, 192], patch_size=[16, 16],
      intermediate_size=4 * g['hidden_size'], layer_norm_eps=1e-6,
      out_indices=[g['num_hidden_layers']], **g)
  model = VitPoseForPoseEstimation(VitPoseConfig(
      backbone_config=backbone, use_simple_decoder=head == 'simple',
      num_labels=17)).eval()
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, t in model.state_dict().items():
      if not t.is_floating_point():
        continue
      if name.endswith('running_var'):
        t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
      else:
        t.add_(PERTURB_STD * torch.randn(t.shape, generator=gen))
  return model


def hf_keypoints(model, image, flip_test):
  """(P, 17, 3) x, y, score from transformers' processor and model."""
  proc = VitPoseImageProcessor()
  inputs = proc(images=Image.fromarray(image), boxes=[BOXES],
                return_tensors='pt')
  with torch.no_grad():
    out = model(**inputs)
    if flip_test:
      mirrored = model(pixel_values=inputs['pixel_values'].flip(-1),
                       flip_pairs=torch.tensor(FLIP_PAIRS))
      out.heatmaps = 0.5 * (out.heatmaps + mirrored.heatmaps)
  res = proc.post_process_pose_estimation(out, boxes=[BOXES])[0]
  return np.stack([np.concatenate(
      [r['keypoints'].numpy(), r['scores'].numpy()[:, None]], axis=1)
                   for r in res])


def flat_variables(variables):
  return {(c,) + p: np.asarray(v) for c, tree in variables.items()
          for p, v in traverse_util.flatten_dict(
              unstack_blocks(tree) if c == 'params' else tree).items()}


def bit_exact(a, b):
  fa, fb = flat_variables(a), flat_variables(b)
  return fa.keys() == fb.keys() and all(
      fa[k].dtype == fb[k].dtype and np.array_equal(fa[k], fb[k]) for k in fa)


def round_trip(model, variables, ckpt, tmp, by_file):
  """Export to the official .pth and back; bit-exact? By file (registry
  geometry: convert_file detects the model) or, for a geometry outside the
  registry, the .pth read back into the known model."""
  pth = os.path.join(tmp, 'official.pth')
  convert.export_file(ckpt, pth)
  if by_file:
    back_dir = os.path.join(tmp, 'back')
    convert.convert_file(pth, back_dir)
    back_model, back = mae_jax.load(back_dir)
    same_model = back_model == model
  else:
    state, _ = read_state_dict(pth)
    back = pose_convert.from_official(state, model, pth)
    same_model = True
  return bool(same_model and bit_exact(variables, back))


def measure(geometry, head, seed, image, figure_path=None):
  t0 = time.perf_counter()
  hf = hf_model(geometry, head, seed)
  row = {'geometry': geometry, 'head': head,
         **GEOMETRIES[geometry],
         'parameters': sum(p.numel() for p in hf.parameters())}
  with tempfile.TemporaryDirectory() as tmp:
    hf_dir, ckpt = os.path.join(tmp, 'hf'), os.path.join(tmp, 'ckpt')
    hf.save_pretrained(hf_dir)
    convert.convert_file(hf_dir, ckpt)
    model, variables = mae_jax.load(ckpt)
    x = np.random.default_rng(seed).standard_normal(
        (4, 3, 256, 192)).astype(np.float32)
    with torch.no_grad():
      ref = hf(pixel_values=torch.from_numpy(x)).heatmaps.numpy()
    ours = np.asarray(model.apply(variables, x.transpose(0, 2, 3, 1)))
    row['heatmap_max_abs_diff'] = float(
        np.abs(ours.transpose(0, 3, 1, 2) - ref).max())
    row['heatmap_max_abs'] = float(np.abs(ref).max())
    for flip in (False, True):
      ref_kp = hf_keypoints(hf, image, flip)
      for blur in ('transformers', 'official'):
        out = estimate.estimate(model, variables, image, np.array(BOXES),
                                flip_test=flip, blur=blur)
        kp = out['keypoints']
        key = f'{blur}{"_flip" if flip else ""}'
        px = np.abs(kp[..., :2] - ref_kp[..., :2]).max(axis=-1)
        row[f'keypoints_max_px_{key}'] = float(px.max())
        row[f'keypoints_median_px_{key}'] = float(np.median(px))
        row[f'scores_max_abs_{key}'] = float(
            np.abs(kp[..., 2] - ref_kp[..., 2]).max())
        if figure_path and blur == 'official' and not flip:
          figure.save_pose_figure(
              figure_path, image, kp, out['heatmaps'], out['boxes'],
              title='RANDOM WEIGHTS (untrained test model, '
              f'{geometry} {head} head): the joints are meaningless')
    row['round_trip_bit_exact'] = round_trip(
        model, variables, ckpt, tmp, by_file=geometry == 'base')
  row['seconds'] = round(time.perf_counter() - t0, 1)
  return row


MD_COLUMNS = (
    ('geometry', 'geometry', '{}'), ('head', 'head', '{}'),
    ('parameters', 'parameters', '{:,}'),
    ('heatmap_max_abs', 'max \\|heatmap\\|', '{:.2e}'),
    ('heatmap_max_abs_diff', 'heatmap max abs diff', '{:.2e}'),
    ('keypoints_max_px_transformers', 'keypoints max px, blur transformers',
     '{:.2e}'),
    ('keypoints_median_px_transformers', 'median px, blur transformers',
     '{:.1e}'),
    ('keypoints_max_px_transformers_flip', 'max px, transformers + flip test',
     '{:.2e}'),
    ('keypoints_max_px_official', 'keypoints max px, blur official', '{:.1f}'),
    ('keypoints_median_px_official', 'median px, blur official', '{:.2f}'),
    ('scores_max_abs_transformers', 'scores max abs diff (transformers)',
     '{:.2e}'),
    ('round_trip_bit_exact', 'official .pth round trip bit-exact', '{}'),
    ('seconds', 'seconds', '{}'))


def markdown(report):
  lines = ['# ViTPose parity against Hugging Face transformers', '',
           f'Measured {report["date"]} on {report["machine"]}; '
           f'`{report["command"]}`; ' + ', '.join(
               f'{k} {v}' for k, v in report['versions'].items()) + '.', '',
           report['method'], '',
           '| ' + ' | '.join(c[1] for c in MD_COLUMNS) + ' |',
           '|' + '---|' * len(MD_COLUMNS)]
  for row in report['rows']:
    lines.append('| ' + ' | '.join(fmt.format(row[k])
                                   for k, _, fmt in MD_COLUMNS) + ' |')
  lines += ['', f'Total wall time {report["wall_seconds"]} s. '
            + report.get('note', '')]
  return '\n'.join(lines).rstrip() + '\n'


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out-dir', default=str(ROOT / 'docs'),
                      help='where pose_parity.json/.md and pose_example.png '
                      'go (default: docs/)')
  parser.add_argument('--no-base', action='store_true',
                      help='skip the ViTPose-B geometry (768 wide, 12 deep)')
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  out = pathlib.Path(args.out_dir)
  out.mkdir(parents=True, exist_ok=True)
  image = skdata.astronaut()
  t0 = time.perf_counter()
  rows = []
  geometries = ('small',) if args.no_base else ('small', 'base')
  for geometry in geometries:
    for head in ('classic', 'simple'):
      fig = (out / 'pose_example.png'
             if (geometry, head) == ('small', 'classic') else None)
      rows.append(measure(geometry, head, args.seed, image, fig))
      print(json.dumps(rows[-1]), flush=True)
  report = {
      'date': datetime.datetime.now(datetime.timezone.utc).strftime(
          '%Y-%m-%d %H:%M UTC'),
      'machine': machine(),
      'command': ' '.join(['python benchmarks/pose_parity.py',
                           *sys.argv[1:]]),
      'versions': {'jax': jax.__version__, 'torch': torch.__version__,
                   'transformers': transformers.__version__},
      'method': (
          'Seeded random VitPoseForPoseEstimation models at 256 x 192, patch '
          f'16 (transformers\' init plus N(0, {PERTURB_STD}) noise on every '
          'tensor, BatchNorm running variances uniform in [0.5, 1.5]), '
          'saved with save_pretrained, converted with '
          'mae_jax.convert.convert_file and loaded with mae_jax.load; fp32 '
          'on CPU. Heatmaps: a batch of 4 random N(0, 1) inputs. Keypoints: '
          'skimage astronaut (512 x 512 uint8), boxes '
          f'{BOXES} (COCO x, y, w, h), mae_jax.pose.estimate.estimate vs '
          'VitPoseImageProcessor + post_process_pose_estimation, in image '
          'pixels. The "blur official" columns compare the official DARK '
          'blur (sigma 2) with transformers\' (sigma 0.8; the other '
          'keypoint columns use it on both sides): they measure how far '
          'transformers deviates from the official decoding, not an error '
          'of the conversion; on random heatmaps (no Gaussian peak, values '
          'often <= 0 and clipped to 0.001 before the log) the DARK Newton '
          'step is ill-conditioned, hence their large maxima. Round trip: '
          'export to the official mmpose .pth and back (base geometry '
          'through convert_file; the small geometry, which is not in the '
          'registry, read back into its known model).'),
      'rows': rows,
      'wall_seconds': round(time.perf_counter() - t0, 1)}
  if args.no_base:
    report['note'] = 'The ViTPose-B geometry was skipped (--no-base).'
  (out / 'pose_parity.json').write_text(json.dumps(report, indent=1) + '\n')
  (out / 'pose_parity.md').write_text(markdown(report))
  print(markdown(report))


if __name__ == '__main__':
  main()
