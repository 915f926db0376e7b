"""The ViTPose module against transformers' VitPoseForPoseEstimation:
backbone features, training-mode BatchNorm, block layouts, and its checks."""
import jax
import numpy as np
import pytest
import torch

import mae_jax
from mae_jax import convert
from mae_jax.models import ViTPose, create_model
from tests.pose_peers import WIDTH, hf_heatmaps, save_hf_vitpose


@pytest.fixture(scope='module')
def classic(tmp_path_factory):
  """(torch model, mae_jax model, variables) of one random classic model."""
  root = tmp_path_factory.mktemp('pose')
  hf = save_hf_vitpose(root / 'hf', simple=False)
  convert.convert_file(root / 'hf', root / 'ck')
  model, variables = mae_jax.load(root / 'ck')
  return hf, model, variables


def _x(n=2, seed=0):
  return np.random.default_rng(seed).standard_normal(
      (n, 256, 192, 3)).astype(np.float32)


def test_features_are_the_backbone_map_after_last_norm(classic):
  hf, model, variables = classic
  x = _x()
  ours = np.asarray(model.apply(variables, x, method=model.features))
  with torch.no_grad():
    ref = hf.backbone(torch.from_numpy(x.transpose(0, 3, 1, 2))
                      ).feature_maps[-1].numpy()
  assert ours.shape == (2, 16, 12, WIDTH)
  np.testing.assert_allclose(ours.reshape(2, -1, WIDTH), ref, atol=1e-5)


def test_training_mode_matches_torch_batchnorm_statistics(classic):
  """train=True: heatmaps from batch statistics, running mean/var updated
  with the unbiased variance and the batch counter advanced, as the torch
  model in train mode (no stochastic depth on either side)."""
  hf, model, variables = classic
  x = _x(4, seed=1)
  out, new = model.clone(drop_path_rate=0.0).apply(
      variables, x, train=True, mutable=['batch_stats'])
  hf_train = hf.train()
  try:
    ref = hf_heatmaps(hf_train, x)
  finally:
    hf.eval()
  assert np.abs(np.asarray(out) - ref).max() < 1e-4
  for ours, bn in ((new['batch_stats']['bn_0'], hf.head.batchnorm1),
                   (new['batch_stats']['bn_1'], hf.head.batchnorm2)):
    np.testing.assert_allclose(ours['mean'], bn.running_mean.numpy(),
                               atol=1e-5)
    np.testing.assert_allclose(ours['var'], bn.running_var.numpy(),
                               rtol=1e-4, atol=1e-5)
    assert int(ours['num_batches_tracked']) == int(bn.num_batches_tracked)


def test_scanned_blocks_give_the_heatmaps_of_unrolled_blocks(classic,
                                                            tmp_path):
  _, model, variables = classic
  mae_jax.save(tmp_path / 'ck', model, variables)
  scanned, sv = mae_jax.load(tmp_path / 'ck', scan_blocks=True)
  assert scanned.scan_blocks and 'blocks' in sv['params']
  x = _x(1)
  np.testing.assert_allclose(np.asarray(scanned.apply(sv, x)),
                             np.asarray(model.apply(variables, x)), atol=1e-5)


@pytest.mark.parametrize('name,heatmaps', [
    ('vitpose_tiny_patch8', (64, 48)), ('vitpose_base_patch16', (64, 48)),
    ('vitpose_huge_patch16', (64, 48))])
def test_heatmaps_are_four_times_the_patch_grid(name, heatmaps):
  """256 x 192 at patch 16 (128 x 96 at patch 8): 16 x 12 patches,
  64 x 48 heatmaps of 17 joints, for both heads (shapes only)."""
  for head in ('classic', 'simple'):
    model = create_model(name, head=head)
    x = jax.ShapeDtypeStruct((1, *model.img_size, 3), np.float32)
    out, _ = jax.eval_shape(model.init_with_output, jax.random.key(0), x)
    assert model.heatmap_size == heatmaps
    assert out.shape == (1, *heatmaps, 17)


def test_bad_head_padding_and_input_shape_are_one_line_errors():
  with pytest.raises(ValueError, match=r"head='fancy' is not one of"):
    ViTPose(head='fancy')
  with pytest.raises(ValueError, match=r'patch_padding=8 must be in'):
    ViTPose(patch_padding=8)
  model = create_model('vitpose_tiny_patch8')
  with pytest.raises(ValueError, match=r'\(N, 128, 96, 3\)'):
    model.init(jax.random.key(0), np.zeros((1, 96, 128, 3), np.float32))
