"""Top-down inference end to end: `python -m mae_jax.pose` and
`mae_jax.pose.estimate` against transformers' VitPoseImageProcessor +
VitPoseForPoseEstimation + post_process_pose_estimation on the same image
and boxes."""
import json

import jax
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import VitPoseImageProcessor

import mae_jax
from mae_jax import convert
from mae_jax.pose import estimate
from mae_jax.pose.keypoints import FLIP_PAIRS
from tests import helpers
from tests.pose_peers import save_hf_vitpose

BOXES = [[30.5, 20.0, 80.0, 150.0], [150.0, 60.0, 120.0, 90.0]]


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  """(root, HF torch model, converted checkpoint, image path, uint8 image)."""
  root = tmp_path_factory.mktemp('pose_cli')
  hf = save_hf_vitpose(root / 'hf', simple=False, seed=1)
  convert.convert_file(root / 'hf', root / 'ck')
  image = np.random.default_rng(0).integers(0, 256, (240, 320, 3), np.uint8)
  Image.fromarray(image).save(root / 'people.png')
  return root, hf, root / 'ck', root / 'people.png', image


def _hf_keypoints(hf, image, boxes, flip=False):
  """(P, 17, 2) keypoints of transformers' pipeline; with flip, its
  heatmaps averaged with the flipped-back heatmaps of mirrored inputs."""
  proc = VitPoseImageProcessor()
  inputs = proc(images=Image.fromarray(image), boxes=[boxes],
                return_tensors='pt')
  with torch.no_grad():
    out = hf(**inputs)
    if flip:
      mirrored = hf(inputs['pixel_values'].flip(-1),
                    flip_pairs=torch.tensor(FLIP_PAIRS))
      out.heatmaps = 0.5 * (out.heatmaps + mirrored.heatmaps)
  results = proc.post_process_pose_estimation(out, boxes=[boxes])[0]
  return np.stack([r['keypoints'].numpy() for r in results])


def test_pose_cli_keypoints_of_two_boxes_are_within_1px_of_transformers(
    setup):
  root, hf, ckpt, image_path, image = setup
  boxes = ';'.join(','.join(map(str, b)) for b in BOXES)
  result = helpers.run(
      ['-m', 'mae_jax.pose', '--checkpoint', 'ck', '--image', 'people.png',
       '--boxes', boxes, '--blur', 'transformers', '--out', 'fig.png',
       '--json', 'kp.json', '--image-id', '7'], cwd=root, timeout=300)
  assert result.returncode == 0, result.stderr
  results = json.loads((root / 'kp.json').read_text())
  assert [r['image_id'] for r in results] == [7, 7]
  assert all(r['category_id'] == 1 and len(r['keypoints']) == 51
             for r in results)
  ours = np.array([np.reshape(r['keypoints'], (17, 3)) for r in results])
  ref = _hf_keypoints(hf, image, BOXES)
  assert np.abs(ours[..., :2] - ref).max() < 1.0
  with Image.open(root / 'fig.png') as fig:
    assert fig.size[0] > 400
  assert 'figure: fig.png' in result.stdout


def test_flip_test_is_within_1px_of_transformers_flip_averaging(setup):
  _, hf, ckpt, _, image = setup
  model, variables = mae_jax.load(ckpt)
  out = estimate.estimate(model, variables, image, BOXES, flip_test=True,
                          blur='transformers')
  ref = _hf_keypoints(hf, image, BOXES, flip=True)
  assert np.abs(out['keypoints'][..., :2] - ref).max() < 1.0
  plain = estimate.estimate(model, variables, image, BOXES,
                            blur='transformers')
  assert np.abs(plain['heatmaps'] - out['heatmaps']).max() > 1e-3


def test_without_boxes_the_whole_image_is_one_person(setup):
  _, _, ckpt, _, image = setup
  model, variables = mae_jax.load(ckpt)
  whole = estimate.estimate(model, variables, image)
  boxed = estimate.estimate(model, variables, image, [[0, 0, 320, 240]])
  np.testing.assert_array_equal(whole['keypoints'], boxed['keypoints'])
  assert whole['keypoints'].shape == (1, 17, 3)


def test_pose_score_is_the_mean_of_joints_above_0_2_times_the_box_score():
  kp = np.zeros((17, 3))
  kp[:, 2] = 0.1
  kp[:4, 2] = [0.3, 0.5, 0.7, 0.9]
  assert estimate.pose_score(kp, box_score=0.5) == pytest.approx(0.3)
  assert estimate.pose_score(np.zeros((17, 3))) == 0.0


def test_pose_cli_refuses_a_non_pose_checkpoint_and_a_missing_image(
    setup, tmp_path):
  root, _, ckpt, image_path, _ = setup
  mae = mae_jax.create_model('mae_vit_tiny_patch8')
  params = mae.init(jax.random.key(0), np.zeros((1, 64, 64, 3), np.float32),
                    noise=np.zeros((1, 64), np.float32))['params']
  mae_jax.save(tmp_path / 'mae', mae, {'params': params})
  for args, message in (
      (['--checkpoint', tmp_path / 'mae', '--image', image_path],
       'holds a MaskedAutoencoder, not a ViTPose'),
      (['--checkpoint', ckpt, '--image', tmp_path / 'nope.png'],
       'nope.png: no such image file')):
    result = helpers.run(['-m', 'mae_jax.pose', *args, '--out',
                          tmp_path / 'f.png'], cwd=tmp_path, timeout=300)
    assert result.returncode == 2
    assert message in result.stderr and result.stderr.count('\n') == 1
    assert not (tmp_path / 'f.png').exists()
