"""The ViTPose module against transformers' VitPoseForPoseEstimation:
backbone features, training-mode BatchNorm, block layouts, and its checks."""
import jax
import numpy as np
import pytest
import torch
from flax import traverse_util

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


def _init_params(model, x, **kwargs):
  params = model.init(jax.random.key(0), x, **kwargs)['params']
  return {'/'.join(k): np.asarray(v)
          for k, v in traverse_util.flatten_dict(params).items()}


def test_random_init_is_the_official_vitpose_backbones_from_scratch():
  """ViTPose from scratch: linear kernels N(0, 0.02) (timm's trunc_normal_),
  zero biases, the patch convolution PyTorch's default U(+-1/sqrt(fan_in))
  for kernel and bias; the MAE keeps its Xavier-uniform initialisation."""
  pose = _init_params(create_model('vitpose_tiny_patch8'),
                      np.zeros((1, 128, 96, 3), np.float32))
  for name in ('attn/qkv', 'attn/proj', 'mlp/fc1', 'mlp/fc2'):
    kernel = pose[f'blocks_0/{name}/kernel']
    assert kernel.std() == pytest.approx(0.02, rel=0.03), name
    assert not pose[f'blocks_0/{name}/bias'].any()
  bound = (8 * 8 * 3) ** -0.5
  for leaf in ('kernel', 'bias'):
    value = pose[f'patch_embed/{leaf}']
    assert np.abs(value).max() <= bound
    assert value.std() == pytest.approx(bound / 3 ** 0.5, rel=0.15), leaf
  mae_model = create_model('mae_vit_tiny_patch8')
  mae = _init_params(mae_model, np.zeros((1, 64, 64, 3), np.float32),
                     noise=np.zeros((1, 64), np.float32))
  fc1 = mae['blocks_0/mlp/fc1/kernel']
  assert fc1.std() == pytest.approx((2 / (192 + 768)) ** 0.5, rel=0.03)
  assert not mae['patch_embed/bias'].any()
  with pytest.raises(ValueError, match=r"weight_init='torch' is not one of"):
    create_model('vitpose_tiny_patch8', weight_init='torch').init(
        jax.random.key(0), np.zeros((1, 128, 96, 3), np.float32))
