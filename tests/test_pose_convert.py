"""ViTPose conversion: Hugging Face directories and the official mmpose
layout against transformers' VitPoseForPoseEstimation, and pose models
initialised from MAE / ViT weights."""
import re

import jax
import numpy as np
import pytest
import torch
from flax import traverse_util

import convert_torch_weights
import mae_jax
from mae_jax import convert
from mae_jax.errors import CheckpointError
from mae_jax.models import create_model, unstack_blocks
from mae_jax.models.pos_embed import resize_grid, sincos_2d
from tests.pose_peers import (DEPTH, REGISTRY_TINY, hf_heatmaps,
                              save_hf_vitpose)

HEADS = ['classic', 'simple']


def _batch(n=3, seed=0):
  return np.random.default_rng(seed).standard_normal(
      (n, 256, 192, 3)).astype(np.float32)


def _convert(capsys, *argv):
  code = convert_torch_weights.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  assert code == 0, err
  return out


@pytest.fixture(scope='module', params=HEADS)
def hf_dir(request, tmp_path_factory):
  """(head, HF directory, torch model) for each head."""
  root = tmp_path_factory.mktemp(f'hf_{request.param}')
  model = save_hf_vitpose(root / 'hf', simple=request.param == 'simple')
  return request.param, root / 'hf', model


def test_hf_directory_converts_with_the_cli_to_heatmaps_within_1e4(
    hf_dir, tmp_path, capsys):
  head, directory, hf = hf_dir
  out = _convert(capsys, directory, tmp_path / 'ck')
  assert 'Hugging Face VitPoseForPoseEstimation directory' in out
  model, variables = mae_jax.load(tmp_path / 'ck')
  assert (model.head, model.img_size, model.depth) == (head, (256, 192), DEPTH)
  x = _batch()
  ours = np.asarray(model.apply(variables, x))
  ref = hf_heatmaps(hf, x)
  assert ours.shape == ref.shape == (3, 64, 48, 17)
  assert np.abs(ours - ref).max() < 1e-4
  assert np.abs(ref).max() > 0.1  # the comparison is not of near-zeros
  if head == 'classic':
    stats = variables['batch_stats']['bn_0']
    np.testing.assert_array_equal(
        stats['var'], hf.head.batchnorm1.running_var.numpy())
    assert int(stats['num_batches_tracked']) == 1234


def _mmpose_keys(head, depth):
  """The official ViTPose state_dict keys, written out from the layout
  of the official code (mmpose ViT backbone + TopdownHeatmapSimpleHead)."""
  keys = {'backbone.patch_embed.proj.weight', 'backbone.patch_embed.proj.bias',
          'backbone.pos_embed', 'backbone.last_norm.weight',
          'backbone.last_norm.bias', 'keypoint_head.final_layer.weight',
          'keypoint_head.final_layer.bias'}
  for i in range(depth):
    for part in ('norm1', 'attn.qkv', 'attn.proj', 'norm2', 'mlp.fc1',
                 'mlp.fc2'):
      keys |= {f'backbone.blocks.{i}.{part}.weight',
               f'backbone.blocks.{i}.{part}.bias'}
  if head == 'classic':
    keys |= {'keypoint_head.deconv_layers.0.weight',
             'keypoint_head.deconv_layers.3.weight'}
    for i in (1, 4):
      keys |= {f'keypoint_head.deconv_layers.{i}.{leaf}' for leaf in (
          'weight', 'bias', 'running_mean', 'running_var',
          'num_batches_tracked')}
  return keys


def _flat(variables):
  return {(c,) + p: np.asarray(v) for c, tree in variables.items()
          for p, v in traverse_util.flatten_dict(unstack_blocks(tree)).items()}


@pytest.mark.parametrize('head', HEADS)
def test_official_layout_round_trip_is_bit_exact_with_the_mmpose_keys(
    head, tmp_path, capsys):
  directory = tmp_path / 'hf'
  hf = save_hf_vitpose(directory, head == 'simple', geometry=REGISTRY_TINY)
  _convert(capsys, directory, tmp_path / 'ck')
  _convert(capsys, tmp_path / 'ck', tmp_path / 'vitpose.pth', '--to-torch')
  saved = torch.load(tmp_path / 'vitpose.pth', weights_only=True)
  assert list(saved) == ['state_dict']
  state = saved['state_dict']
  assert set(state) == _mmpose_keys(head, 4)
  if head == 'classic':
    assert state['keypoint_head.deconv_layers.1.num_batches_tracked'].dtype \
        == torch.int64
    # ConvTranspose2d weight (in, out, k, k), as HF's deconv1 holds it.
    torch.testing.assert_close(state['keypoint_head.deconv_layers.0.weight'],
                               hf.head.deconv1.weight, rtol=0, atol=0)
  qkv = state['backbone.blocks.0.attn.qkv.weight']
  attn = hf.backbone.encoder.layer[0].attention.attention
  torch.testing.assert_close(qkv, torch.cat(
      [attn.query.weight, attn.key.weight, attn.value.weight]), rtol=0, atol=0)
  # The official file converts back (its size recognised from the
  # tensors) to exactly the same variables.
  out = _convert(capsys, tmp_path / 'vitpose.pth', tmp_path / 'back')
  assert 'official ViTPose state dict (mmpose)' in out
  m1, v1 = mae_jax.load(tmp_path / 'ck')
  m2, v2 = mae_jax.load(tmp_path / 'back')
  a, b = _flat(v1), _flat(v2)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=str(k))
    assert a[k].dtype == b[k].dtype
  fields = ('img_size', 'patch_size', 'embed_dim', 'depth', 'num_heads',
            'head', 'num_joints', 'norm_eps')
  assert [getattr(m2, f) for f in fields] == [getattr(m1, f) for f in fields]
  assert head == 'simple' or m2.head_width == m1.head_width == 256
  x = np.random.default_rng(1).standard_normal((2, 128, 96, 3), np.float32)
  assert np.abs(np.asarray(m2.apply(v2, x)) - hf_heatmaps(hf, x)).max() < 1e-4


def test_official_file_of_an_unknown_size_needs_model_naming_the_shapes(
    hf_dir, tmp_path, capsys):
  _, directory, _ = hf_dir
  _convert(capsys, directory, tmp_path / 'ck')
  _convert(capsys, tmp_path / 'ck', tmp_path / 'p.pth', '--to-torch')
  code = convert_torch_weights.main([str(tmp_path / 'p.pth'),
                                     str(tmp_path / 'x')])
  err = capsys.readouterr().err
  assert code == 2 and err.count('\n') == 1
  assert 'patch 16, width 64, depth 2' in err and '--model' in err
  assert not (tmp_path / 'x').exists()


def test_transformers_default_layer_norm_eps_is_read_from_config(tmp_path):
  hf = save_hf_vitpose(tmp_path / 'hf', simple=True, layer_norm_eps=1e-12)
  convert.convert_file(tmp_path / 'hf', tmp_path / 'ck')
  model, variables = mae_jax.load(tmp_path / 'ck')
  assert model.norm_eps == 1e-12
  x = _batch(2)
  assert np.abs(np.asarray(model.apply(variables, x))
                - hf_heatmaps(hf, x)).max() < 1e-4


def test_vitpose_plus_experts_are_refused_in_both_layouts(tmp_path):
  save_hf_vitpose(tmp_path / 'hf', simple=True, num_experts=2)
  with pytest.raises(CheckpointError, match=r'num_experts=2 \(ViTPose\+'):
    convert.convert_file(tmp_path / 'hf', tmp_path / 'ck')
  state = {'backbone.blocks.0.mlp.experts.0.weight': torch.zeros(2, 2),
           'backbone.patch_embed.proj.weight': torch.zeros(64, 3, 16, 16)}
  torch.save({'state_dict': state}, tmp_path / 'plus.pth')
  with pytest.raises(CheckpointError, match=r'ViTPose\+'):
    convert.convert_file(tmp_path / 'plus.pth', tmp_path / 'ck')
  assert not (tmp_path / 'ck').exists()


def test_unexpected_missing_and_misshaped_official_keys_are_named(
    tmp_path, capsys):
  save_hf_vitpose(tmp_path / 'hf', simple=False, geometry=REGISTRY_TINY)
  _convert(capsys, tmp_path / 'hf', tmp_path / 'ck')
  _convert(capsys, tmp_path / 'ck', tmp_path / 'p.pth', '--to-torch')
  state = torch.load(tmp_path / 'p.pth', weights_only=True)['state_dict']
  state['keypoint_head.extra.weight'] = torch.zeros(1)
  del state['backbone.blocks.1.mlp.fc2.bias']
  state['backbone.blocks.0.norm1.bias'] = torch.zeros(65)
  torch.save({'state_dict': state}, tmp_path / 'bad.pth')
  with pytest.raises(CheckpointError) as e:
    convert.convert_file(tmp_path / 'bad.pth', tmp_path / 'x')
  text = str(e.value)
  assert 'missing: backbone.blocks.1.mlp.fc2.bias' in text
  assert 'unexpected: keypoint_head.extra.weight' in text
  assert 'backbone.blocks.0.norm1.bias (65,) (expected (192,))' in text
  assert not (tmp_path / 'x').exists()


# ------------------------------------------------------ init from MAE
@pytest.fixture(scope='module')
def tiny_mae_dir(tmp_path_factory):
  """A random mae_vit_tiny_patch8 (64 px: 8 x 8 grid) checkpoint."""
  root = tmp_path_factory.mktemp('mae')
  model = create_model('mae_vit_tiny_patch8')
  x = np.zeros((1, 64, 64, 3), np.float32)
  noise = np.zeros((1, model.num_patches), np.float32)
  params = model.init(jax.random.key(3), x, noise=noise)['params']
  mae_jax.save(root / 'mae', model, {'params': params})
  return root / 'mae', params


def _lines(report, start):
  return next(l for l in report if l.startswith(start))


def test_pose_from_an_mae_checkpoint_loads_the_encoder_and_resizes_pos(
    tiny_mae_dir, tmp_path):
  src, mae_params = tiny_mae_dir
  report = convert.convert_file(src, tmp_path / 'pose',
                                'vitpose_tiny_patch8', head='simple')
  model, variables = mae_jax.load(tmp_path / 'pose')
  assert (model.head, model.img_size, model.grid_size) == (
      'simple', (128, 96), (16, 12))
  p = variables['params']
  for name in ('blocks_0', 'blocks_3', 'patch_embed'):
    jax.tree.map(np.testing.assert_array_equal, p[name], mae_params[name])
  table = sincos_2d(192, 8)  # the MAE's fixed table, cls row 0
  np.testing.assert_allclose(p['pos_embed'][0], resize_grid(table, (16, 12)),
                             rtol=0, atol=1e-7)
  np.testing.assert_array_equal(p['last_norm']['scale'], np.ones(192))
  assert 'pos_embed 8x8 -> 16x12' in _lines(report, 'loaded')
  assert re.search(r'blocks_0\.\.3', _lines(report, 'loaded'))
  assert _lines(report, 'initialised fresh') == (
      'initialised fresh: final_layer, last_norm')
  assert _lines(report, 'skipped') == (
      'skipped on purpose: cls_token, decoder_blocks_0..1, decoder_embed, '
      'decoder_norm, decoder_pred, mask_token, norm')
  x = np.random.default_rng(0).standard_normal((2, 128, 96, 3), np.float32)
  assert np.asarray(model.apply(variables, x)).shape == (2, 64, 48, 17)


def test_pose_from_an_mae_pth_and_a_classifier_gives_the_same_backbone(
    tiny_mae_dir, tmp_path):
  """MAE checkpoint -> official .pth -> ViTPose (classic) equals the pose
  made from the checkpoint itself; a classifier's learned pos_embed is
  resampled the same way."""
  src, _ = tiny_mae_dir
  convert.export_file(src, tmp_path / 'mae.pth')
  convert.convert_file(src, tmp_path / 'a', 'vitpose_tiny_patch8')
  convert.convert_file(tmp_path / 'mae.pth', tmp_path / 'b',
                       'vitpose_tiny_patch8')
  _, va = mae_jax.load(tmp_path / 'a')
  _, vb = mae_jax.load(tmp_path / 'b')
  for name in ('blocks_2', 'patch_embed', 'pos_embed'):
    jax.tree.map(np.testing.assert_array_equal, va['params'][name],
                 vb['params'][name])
  assert set(vb['batch_stats']) == {'bn_0', 'bn_1'}
  convert.convert_file(tmp_path / 'mae.pth', tmp_path / 'vit',
                       'vit_tiny_patch8')
  report = convert.convert_file(tmp_path / 'vit', tmp_path / 'c',
                                'vitpose_tiny_patch8')
  _, vc = mae_jax.load(tmp_path / 'c')
  np.testing.assert_array_equal(vc['params']['pos_embed'],
                                va['params']['pos_embed'])
  assert 'head' in _lines(report, 'skipped')  # the classifier's head


def test_pose_options_that_do_not_apply_are_refused(tiny_mae_dir, tmp_path):
  src, _ = tiny_mae_dir
  with pytest.raises(CheckpointError, match='--head applies to a ViTPose'):
    convert.convert_file(src, tmp_path / 'x', 'vit_tiny_patch8', head='simple')
  with pytest.raises(CheckpointError, match='norm-pix-loss applies to MAE'):
    convert.convert_file(src, tmp_path / 'x', 'vitpose_tiny_patch8',
                         norm_pix_loss=True)


def test_a_smaller_pretrained_patch_is_zero_padded_as_the_official_init(
    tmp_path):
  """Patch-6 MAE weights -> the patch-8 tiny ViTPose: the kernel sits in
  the middle (one row / column of zeros each side), as ViT-H/14 -> the
  patch-16 ViTPose-H."""
  mae = create_model('mae_vit_tiny_patch8', patch_size=6, img_size=48)
  params = mae.init(jax.random.key(0), np.zeros((1, 48, 48, 3), np.float32),
                    noise=np.zeros((1, 64), np.float32))['params']
  mae_jax.save(tmp_path / 'mae', mae, {'params': params})
  report = convert.convert_file(tmp_path / 'mae', tmp_path / 'pose',
                                'vitpose_tiny_patch8')
  _, variables = mae_jax.load(tmp_path / 'pose')
  kernel = variables['params']['patch_embed']['kernel']
  assert kernel.shape == (8, 8, 3, 192)
  np.testing.assert_array_equal(kernel[1:7, 1:7],
                                params['patch_embed']['kernel'])
  assert not kernel[0].any() and not kernel[:, 7].any()
  assert 'patch_embed kernel 6x6 -> 8x8 (zero-padded' in _lines(report,
                                                                'loaded')
