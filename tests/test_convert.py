"""torch <-> mae_jax conversion: round trips, fine-tuning init, norm-pix
setting, non-finite weights, bad inputs."""
import importlib.util
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from mae_jax import checkpoint, convert
from mae_jax.models import VisionTransformer
from mae_jax.torch_io import CheckpointError
from tests import torch_mae

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLI = ROOT / 'convert_torch_weights.py'
_spec = importlib.util.spec_from_file_location('convert_torch_weights', CLI)
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)

TINY = 'tiny_patch8'


def _roundtrip(tmp_path, src, *model):
  """src -> mae_jax dir -> .pth; returns the exported state dict."""
  dst, out = tmp_path / 'ckpt', tmp_path / 'out.pth'
  assert cli.main([str(src), str(dst), *model]) == 0
  assert cli.main([str(dst), str(out), '--to-torch']) == 0
  return torch.load(out, weights_only=True)['model']


def _assert_bit_exact(a, b, keys=None):
  for k in keys or a:
    assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope='module')
def tiny_mae():
  return torch_mae.make_mae(TINY)


@pytest.fixture(scope='module')
def tiny_vit_gpool():
  return torch_mae.make_vit(TINY, global_pool=True)


@pytest.fixture(scope='module')
def tiny_vit_cls():
  return torch_mae.make_vit(TINY, global_pool=False)


def test_full_mae_roundtrip(tmp_path, tiny_mae, capsys):
  src = torch_mae.save_pth(tmp_path / 'full.pth', tiny_mae.state_dict())
  out = _roundtrip(tmp_path, src)
  assert 'source kind: mae' in capsys.readouterr().out
  _assert_bit_exact(tiny_mae.state_dict(), out)
  assert set(out) == set(tiny_mae.state_dict())
  ref = torch_mae.TorchMAE(**torch_mae.mae_config(TINY))
  ref.load_state_dict(out, strict=True)


@pytest.mark.parametrize('kind', ['gpool', 'cls', 'timm_bare', 'safetensors'])
def test_classifier_roundtrip(tmp_path, kind, tiny_vit_gpool, tiny_vit_cls):
  vit = tiny_vit_cls if kind == 'cls' else tiny_vit_gpool
  state = vit.state_dict()
  if kind == 'safetensors':
    src = tmp_path / 'vit.safetensors'
    save_file(dict(state), src)
  else:
    src = torch_mae.save_pth(tmp_path / 'vit.pth', state,
                             wrap=kind != 'timm_bare')
  out = _roundtrip(tmp_path, src)
  assert set(out) == set(state)
  _assert_bit_exact(state, out)
  fresh = torch_mae.make_vit(TINY, global_pool=kind != 'cls', seed=1)
  fresh.load_state_dict(out, strict=True)


def test_training_checkpoint_roundtrip(tmp_path, capsys):
  mae = torch_mae.make_mae(TINY, seed=2)
  ckpt = torch_mae.training_checkpoint(mae)
  src = tmp_path / 'checkpoint-3.pth'
  torch.save(ckpt, src)
  out = _roundtrip(tmp_path, src)
  printed = capsys.readouterr().out
  for key in ('optimizer', 'epoch', 'scaler', 'args'):
    assert f'{key} (training state, not weights)' in printed
  assert "'norm_pix_loss': True" in printed  # taken from args
  assert "norm_pix_loss: True (from the file's args)" in printed
  _assert_bit_exact(ckpt['model'], out)


def test_encoder_only_into_classifier_roundtrip(tmp_path, tiny_mae, capsys):
  enc = torch_mae.encoder_state(tiny_mae)
  src = torch_mae.save_pth(tmp_path / 'mae_pretrain.pth', enc)
  out = _roundtrip(tmp_path, src, '--model', 'vit_tiny_patch8')
  printed = capsys.readouterr().out
  assert 'initialised fresh (fine-tuning init): fc_norm.*, head.*' in printed
  assert 'norm.bias' in printed and 'norm.weight' in printed  # skipped
  shared = [k for k in enc if not k.startswith('norm.')]
  _assert_bit_exact(enc, out, shared)
  assert torch.all(out['head.bias'] == 0)
  assert torch.all(out['fc_norm.weight'] == 1)
  assert float(out['head.weight'].std()) < 1e-4  # trunc-normal std 2e-5
  vit = torch_mae.make_vit(TINY, global_pool=True, num_classes=1000)
  vit.load_state_dict(out, strict=True)


def test_init_classifier_interpolates_pos_embed_224_to_384(tmp_path):
  cfg = dict(patch_size=16, embed_dim=64, depth=1, num_heads=2)
  mae = torch_mae._build(lambda: torch_mae.TorchMAE(  # pylint: disable=protected-access
      img_size=224, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2,
      **cfg), seed=3)
  src = torch_mae.save_pth(tmp_path / 'enc.pth', torch_mae.encoder_state(mae))
  model = VisionTransformer(img_size=384, num_classes=5, **cfg)
  params = convert.init_classifier_from(src, model, jax.random.key(0))['params']
  table = mae.pos_embed.detach()
  grid = table[:, 1:].reshape(1, 14, 14, 64).permute(0, 3, 1, 2)
  want = F.interpolate(grid, size=(24, 24), mode='bicubic',
                       align_corners=False).permute(0, 2, 3, 1)
  want = torch.cat([table[:, :1], want.reshape(1, 576, 64)], dim=1).numpy()
  assert params['pos_embed'].shape == (1, 577, 64)
  np.testing.assert_allclose(params['pos_embed'], want, rtol=0, atol=1e-5)
  np.testing.assert_array_equal(
      params['blocks_0']['attn']['qkv']['kernel'],
      mae.blocks[0].attn.qkv.weight.detach().numpy().T)
  logits = model.apply({'params': params}, np.zeros((1, 384, 384, 3)))
  assert logits.shape == (1, 5)


def test_init_classifier_from_mae_checkpoint_dir(tmp_path, tiny_mae):
  src = torch_mae.save_pth(tmp_path / 'full.pth', tiny_mae.state_dict())
  convert.convert_file(src, tmp_path / 'mae')
  model = VisionTransformer(**{**convert.VIT_CONFIGS['vit_tiny_patch8'],
                               'global_pool': False, 'num_classes': 7})
  from_dir = convert.init_classifier_from(tmp_path / 'mae', model,
                                          jax.random.key(0))['params']
  from_pth = convert.init_classifier_from(src, model,
                                          jax.random.key(0))['params']
  jax.tree.map(np.testing.assert_array_equal, from_dir, from_pth)
  np.testing.assert_array_equal(  # cls-token variant keeps the encoder norm
      from_dir['norm']['scale'], tiny_mae.norm.weight.detach().numpy())


def test_checkpoint_load_overrides_and_workdir(tmp_path, tiny_mae):
  src = torch_mae.save_pth(tmp_path / 'full.pth', tiny_mae.state_dict())
  convert.convert_file(src, tmp_path / 'work' / 'checkpoints')
  model, variables = checkpoint.load(tmp_path / 'work', dtype=jax.numpy.bfloat16)
  assert model.dtype == jax.numpy.bfloat16 and model.embed_dim == 192
  assert isinstance(variables['params']['cls_token'], np.ndarray)


# ------------------------------------------------------------- bad inputs
def _assert_no_dst(tmp_path, dst):
  assert not dst.exists()
  assert not [p for p in os.listdir(tmp_path) if '.tmp-' in p]


def _convert_error(tmp_path, src, *model):
  dst = tmp_path / 'dst'
  with pytest.raises(CheckpointError) as err:
    convert.convert_file(src, dst, *model)
  _assert_no_dst(tmp_path, dst)
  return str(err.value)


def test_encoder_only_into_mae_fails(tmp_path, tiny_mae):
  src = torch_mae.save_pth(tmp_path / 'enc.pth',
                           torch_mae.encoder_state(tiny_mae))
  msg = _convert_error(tmp_path, src)
  assert 'no decoder' in msg and '_full.pth' in msg
  assert 'mae_visualize_vit_*.pth' in msg and str(src) in msg


def test_unknown_key_and_wrong_shape_listed(tmp_path, tiny_mae):
  state = dict(tiny_mae.state_dict())
  state['blocks.0.attn.extra.weight'] = torch.zeros(3, 3)
  state['decoder_norm.weight'] = torch.ones(5)
  del state['decoder_pred.bias']
  msg = _convert_error(tmp_path, torch_mae.save_pth(tmp_path / 'x.pth', state))
  assert 'unexpected: blocks.0.attn.extra.weight' in msg
  assert 'missing: decoder_pred.bias' in msg
  assert 'decoder_norm.weight (5,) (expected (128,))' in msg


def test_learned_pos_embed_refused_for_mae(tmp_path, tiny_mae):
  state = dict(tiny_mae.state_dict())
  state['decoder_pos_embed'] = state['decoder_pos_embed'] + 1e-3
  msg = _convert_error(tmp_path, torch_mae.save_pth(tmp_path / 'x.pth', state))
  assert 'decoder_pos_embed is not the fixed 2D sin-cos table' in msg


def test_truncated_file(tmp_path, tiny_mae):
  good = torch_mae.save_pth(tmp_path / 'good.pth', tiny_mae.state_dict())
  src = tmp_path / 'truncated.pth'
  src.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
  msg = _convert_error(tmp_path, src)
  assert str(src) in msg and 'truncated or corrupt' in msg


class _Evil:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f'touch {self.marker}',))


def test_malicious_pickle_refused(tmp_path):
  marker = tmp_path / 'pwned'
  src = tmp_path / 'evil.pth'
  torch.save({'model': {'cls_token': torch.zeros(1)}, 'x': _Evil(marker)}, src)
  msg = _convert_error(tmp_path, src)
  assert 'refused to load' in msg and str(src) in msg
  assert not marker.exists()


def test_unknown_model_size(tmp_path):
  mae = torch_mae._build(lambda: torch_mae.TorchMAE(  # pylint: disable=protected-access
      img_size=32, patch_size=8, embed_dim=96, depth=2, num_heads=2,
      decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2), seed=0)
  src = torch_mae.save_pth(tmp_path / 'odd.pth', mae.state_dict())
  msg = _convert_error(tmp_path, src)
  assert 'unknown model size (patch 8, width 96, depth 2)' in msg
  assert 'base_patch16 (patch 16, width 768, depth 12)' in msg


def test_load_errors_name_the_path(tmp_path):
  with pytest.raises(CheckpointError, match='nowhere: no such checkpoint'):
    checkpoint.load(tmp_path / 'nowhere')
  (tmp_path / 'empty').mkdir()
  with pytest.raises(CheckpointError, match='empty: not a mae_jax checkpoint'):
    checkpoint.load(tmp_path / 'empty')


def _run_cli(*args):
  return subprocess.run([sys.executable, str(CLI), *map(str, args)],
                        capture_output=True, text=True, cwd=ROOT, check=False,
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu'})


def test_cli_user_errors_exit_2_without_traceback(tmp_path, tiny_mae, capsys):
  enc = torch_mae.save_pth(tmp_path / 'enc.pth',
                           torch_mae.encoder_state(tiny_mae))
  evil = tmp_path / 'evil.pth'
  torch.save({'model': {}, 'x': _Evil(tmp_path / 'pwned')}, evil)
  for src, words in ((enc, 'no decoder'), (evil, 'refused to load')):
    proc = _run_cli(src, tmp_path / 'dst')
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith('error: ') and words in proc.stderr
    assert 'Traceback' not in proc.stderr
    _assert_no_dst(tmp_path, tmp_path / 'dst')
  for args, words in (([tmp_path / 'absent.pth'], 'no such file'),
                      ([enc, '--model', 'vit_giant'], 'unknown model name')):
    assert cli.main([*map(str, args[:1]), str(tmp_path / 'dst'),
                     *args[1:]]) == 2
    assert words in capsys.readouterr().err
    _assert_no_dst(tmp_path, tmp_path / 'dst')


# ------------------------------------------------------------- norm-pix
def test_norm_pix_switch_is_recorded_and_reported(tmp_path, tiny_mae, capsys):
  src = torch_mae.save_pth(tmp_path / 'full.pth', tiny_mae.state_dict())
  assert cli.main([str(src), str(tmp_path / 'on'), '--norm-pix-loss']) == 0
  assert 'norm_pix_loss: True (from --norm-pix-loss)' in capsys.readouterr().out
  model, _ = checkpoint.load(tmp_path / 'on')
  assert model.norm_pix_loss is True
  assert cli.main([str(src), str(tmp_path / 'off')]) == 0
  assert ('norm_pix_loss: False (default; pass --norm-pix-loss if the weights '
          'were trained with it)') in capsys.readouterr().out
  assert checkpoint.load(tmp_path / 'off')[0].norm_pix_loss is False
  assert cli.main([str(tmp_path / 'on'), str(tmp_path / 'on.pth'),
                   '--to-torch']) == 0
  assert 'norm_pix_loss: True (from the checkpoint; a state dict cannot hold ' \
      'it: pass --norm-pix-loss' in capsys.readouterr().out


def test_norm_pix_switch_overrides_the_files_args(tmp_path, capsys):
  src = tmp_path / 'checkpoint-3.pth'
  torch.save(torch_mae.training_checkpoint(torch_mae.make_mae(TINY)), src)
  assert cli.main([str(src), str(tmp_path / 'dst'), '--no-norm-pix-loss']) == 0
  assert ("norm_pix_loss: False (from --no-norm-pix-loss; the file's args say "
          'True)') in capsys.readouterr().out
  assert checkpoint.load(tmp_path / 'dst')[0].norm_pix_loss is False


def test_norm_pix_switch_is_refused_for_classifiers_and_to_torch(
    tmp_path, tiny_vit_gpool, tiny_mae, capsys):
  vit = torch_mae.save_pth(tmp_path / 'vit.pth', tiny_vit_gpool.state_dict())
  assert cli.main([str(vit), str(tmp_path / 'dst'), '--norm-pix-loss']) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: ') and len(err.strip().splitlines()) == 1
  assert 'vit_tiny_patch8 is a classifier, which has no pixel loss' in err
  _assert_no_dst(tmp_path, tmp_path / 'dst')
  src = torch_mae.save_pth(tmp_path / 'full.pth', tiny_mae.state_dict())
  convert.convert_file(src, tmp_path / 'mae')
  assert cli.main([str(tmp_path / 'mae'), str(tmp_path / 'x.pth'),
                   '--to-torch', '--no-norm-pix-loss']) == 2
  assert ('--[no-]norm-pix-loss applies to torch -> mae_jax conversion only'
          in capsys.readouterr().err)
  assert not (tmp_path / 'x.pth').exists()


# ------------------------------------------------------------- non-finite
QKV = 'blocks.0.attn.qkv.weight'
QKV_PATH = 'mae_jax blocks_0/attn/qkv/kernel: 1 NaN, 0 Inf of 110592 values'


def _with_nan(state):
  state = {k: v.clone() for k, v in state.items()}
  state[QKV][3, 5] = float('nan')
  return state


def test_nonfinite_weight_is_refused_naming_the_tensor(tmp_path, tiny_mae):
  src = torch_mae.save_pth(tmp_path / 'nan.pth',
                           _with_nan(tiny_mae.state_dict()))
  proc = _run_cli(src, tmp_path / 'dst')
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.count('\n') == 1 and proc.stderr.startswith('error: ')
  assert f'non-finite weights in {QKV} ({QKV_PATH})' in proc.stderr
  assert '--allow-nonfinite' in proc.stderr
  _assert_no_dst(tmp_path, tmp_path / 'dst')


def test_allow_nonfinite_converts_both_ways_with_warnings(tmp_path, tiny_mae,
                                                          capsys):
  src = torch_mae.save_pth(tmp_path / 'nan.pth',
                           _with_nan(tiny_mae.state_dict()))
  dst, out = tmp_path / 'dst', tmp_path / 'out.pth'
  assert cli.main([str(src), str(dst), '--allow-nonfinite']) == 0
  err = capsys.readouterr().err
  assert err.startswith('warning: ') and f'{QKV} ({QKV_PATH})' in err
  _, variables = checkpoint.load(dst)
  kernel = variables['params']['blocks_0']['attn']['qkv']['kernel']
  assert np.isnan(kernel[5, 3]) and np.isnan(kernel).sum() == 1
  assert cli.main([str(dst), str(out), '--to-torch']) == 2  # refused back
  err = capsys.readouterr().err
  assert err.startswith('error: ') and f'{QKV} ({QKV_PATH})' in err
  assert not out.exists()
  assert cli.main([str(dst), str(out), '--to-torch', '--allow-nonfinite']) == 0
  assert f'{QKV} ({QKV_PATH})' in capsys.readouterr().err
  back = torch.load(out, weights_only=True)['model'][QKV]
  assert torch.isnan(back[3, 5]) and int(torch.isnan(back).sum()) == 1


def test_numpy_arrays_convert_like_torch_tensors(tiny_mae):
  """What a .safetensors file read without torch gives: NumPy arrays."""
  state = tiny_mae.state_dict()
  _, from_np, _ = convert.from_torch({k: v.numpy() for k, v in state.items()})
  _, from_torch, _ = convert.from_torch(dict(state))
  jax.tree.map(np.testing.assert_array_equal, from_np, from_torch)


def test_safetensors_converts_without_torch(tmp_path, tiny_mae,
                                            tiny_vit_gpool):
  mae_src, vit_src = tmp_path / 'mae.safetensors', tmp_path / 'vit.safetensors'
  save_file(dict(tiny_mae.state_dict()), mae_src)
  save_file({k: v.bfloat16() for k, v in tiny_vit_gpool.state_dict().items()},
            vit_src)
  code = (
      "import sys; sys.modules['torch'] = None  # any torch import fails\n"
      'from mae_jax import checkpoint, convert\n'
      f'convert.convert_file({str(mae_src)!r}, {str(tmp_path / "mae")!r},\n'
      '                      norm_pix_loss=True)\n'
      f'convert.convert_file({str(vit_src)!r}, {str(tmp_path / "vit")!r})\n'
      f'print(checkpoint.load({str(tmp_path / "mae")!r})[0].norm_pix_loss)\n')
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True,
                        text=True, cwd=ROOT, check=False,
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split() == ['True']
  _, variables = checkpoint.load(tmp_path / 'vit')
  kernel = variables['params']['blocks_1']['mlp']['fc1']['kernel']
  want = tiny_vit_gpool.blocks[1].mlp.fc1.weight.detach().bfloat16().float()
  assert kernel.dtype == np.float32
  np.testing.assert_array_equal(kernel, want.numpy().T)


def test_to_torch_without_torch_is_one_line_naming_the_extra(tmp_path,
                                                             tiny_mae):
  src = torch_mae.save_pth(tmp_path / 'full.pth', tiny_mae.state_dict())
  convert.convert_file(src, tmp_path / 'mae')
  code = ("import sys; sys.modules['torch'] = None\n"
          f'sys.path.insert(0, {str(ROOT)!r})\n'
          'import convert_torch_weights as cli\n'
          f'sys.exit(cli.main([{str(tmp_path / "mae")!r}, '
          f'{str(tmp_path / "x.pth")!r}, "--to-torch"]))')
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True,
                        text=True, cwd=ROOT, check=False,
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip() == (
      'error: torch is not installed; it is needed for writing .pth files: '
      "pip install 'mae_jax[torch]'")
  assert not (tmp_path / 'x.pth').exists()
