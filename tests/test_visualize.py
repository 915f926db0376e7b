"""Reconstruction figures: the CLI, the notebook, .pth input, bad inputs."""
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import nbclient
import nbformat
import numpy as np
import pytest
from PIL import Image

from mae_jax import (checkpoint, convert, create_model, figures, images,
                     visualize)
from mae_jax.models.mae import normalize_patches
from mae_jax.models.patches import patchify
from tests.helpers import cpu_env

pytestmark = pytest.mark.long

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ['--config.total_steps=40', '--config.batch_size=16',
         '--config.blr=1e-2', '--config.warmup_steps=5',
         '--config.figure_every_steps=0', '--config.checkpoint_every_steps=40',
         '--config.log_every_steps=20']
MSE = re.compile(r'masked-patch MSE ([0-9.]+)')
PX = figures.PANEL_INCHES * figures.DPI  # pixels per panel side


def _env():
  """One CPU device, as a user's machine without accelerators."""
  return cpu_env()


def _cli(*args):
  return subprocess.run([sys.executable, '-m', 'mae_jax.visualize', *args],
                        env=_env(), capture_output=True, text=True,
                        timeout=300, cwd=ROOT)


@pytest.fixture(scope='module')
def ckpts(tmp_path_factory):
  """{'trained': tiny workdir after 40 updates, 'init': the same model at
  initialisation}."""
  base = tmp_path_factory.mktemp('visualize')
  workdir = base / 'trained'
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'train.py'), '--config',
       os.path.join(ROOT, 'configs/pretrain.py') + ':tiny', '--workdir',
       str(workdir), *TRAIN], env=_env(), capture_output=True, text=True,
      timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  model, _ = checkpoint.load(workdir)
  size = model.img_size
  variables = model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)),
                         noise=jnp.zeros((1, model.num_patches)))
  checkpoint.save(base / 'init', model, variables)
  return {'trained': str(workdir), 'init': str(base / 'init')}


COLORS = {'L': 128, 'P': 7, 'I;16': 30000, 'RGB': (200, 30, 30),
          'RGBA': (200, 30, 30, 90), 'CMYK': (10, 200, 30, 40)}


def _png(path, size, mode):
  """Writes a one-colour image of `mode` (CMYK needs a .jpg path)."""
  Image.new(mode, size, COLORS[mode]).save(path)
  return str(path)


def test_trained_model_beats_init_and_figure_has_four_panels(ckpts, tmp_path,
                                                             capsys):
  out = _cli('--checkpoint', ckpts['trained'], '--out',
             str(tmp_path / 'trained.png'))
  assert out.returncode == 0, out.stderr[-3000:]
  assert f'figure: {tmp_path / "trained.png"}' in out.stdout
  trained = float(MSE.search(out.stdout).group(1))
  assert visualize.main(['--checkpoint', ckpts['init'], '--out',
                         str(tmp_path / 'init.png')]) == 0
  init = float(MSE.search(capsys.readouterr().out).group(1))
  assert trained < 0.7 * init, (trained, init)
  with Image.open(tmp_path / 'trained.png') as png:
    assert png.size == (4 * PX, PX)
  model, variables = visualize.load_model(ckpts['trained'])
  names, imgs = images.load_images(images.resolve(None), model.img_size)
  pred, mask, mse = visualize.reconstruct(model, variables, imgs)
  assert names == [images.DEFAULT_IMAGE]
  assert float(mse[0]) == pytest.approx(trained, abs=1e-6)
  fig = visualize.reconstruction_figure(imgs, pred, mask, model.patch_size,
                                        model.norm_pix_loss)
  assert len(fig.axes) == 4
  assert [ax.get_title() for ax in fig.axes] == [
      'original', 'masked', 'reconstruction', 'reconstruction + visible']


def test_sweep_and_folder_give_one_row_each(ckpts, tmp_path, capsys):
  folder = tmp_path / 'imgs'
  folder.mkdir()
  _png(folder / 'gray.png', (80, 70), 'L')
  _png(folder / 'rgba.png', (90, 64), 'RGBA')
  (folder / 'notes.txt').write_text('not an image')
  out = tmp_path / 'sheet.png'
  assert visualize.main(['--checkpoint', ckpts['trained'], '--image',
                         str(folder), '--sweep', '0.5,0.9', '--out',
                         str(out)]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[1] == 'norm_pix_loss: False (from the checkpoint)'
  assert [l.split()[0] for l in lines[2:]] == ['gray.png'] * 2 + [
      'rgba.png'] * 2
  assert len(MSE.findall('\n'.join(lines))) == 4
  with Image.open(out) as png:
    assert png.size == (4 * PX, 4 * PX)


def test_norm_pix_model_says_so_in_the_title(ckpts):
  model, _ = visualize.load_model(ckpts['init'])
  title = visualize.figure_title(model.clone(norm_pix_loss=True), 'x', 0)
  assert 'de-normalised' in title
  assert 'norm-pix' not in visualize.figure_title(model, 'x', 0)


def test_notebook_runs_top_to_bottom(ckpts, monkeypatch):
  monkeypatch.setenv('MAE_CHECKPOINT', ckpts['trained'])
  nb = nbformat.read(os.path.join(ROOT, 'notebooks', 'mae_visualize.ipynb'),
                     as_version=4)
  for cell in nb.cells:  # committed outputs (benchmarks/run_notebook.py) are replaced
    if cell.cell_type == 'code':
      cell.outputs = []
  nbclient.NotebookClient(
      nb, kernel_name='python3', timeout=300,
      resources={'metadata': {'path': os.path.join(ROOT, 'notebooks')}}
  ).execute()
  pngs = [o['data']['image/png'] for c in nb.cells if c.cell_type == 'code'
          for o in c.outputs if 'image/png' in o.get('data', {})]
  assert len(pngs) == 4 and all(len(p) > 1000 for p in pngs)


def test_pth_input_matches_converted_directory(tmp_path):
  torch_mae = pytest.importorskip('tests.torch_mae')
  pth = torch_mae.save_pth(
      tmp_path / 'mae_tiny.pth',
      torch_mae.make_mae('tiny_patch8', seed=3).state_dict())
  convert.convert_file(pth, tmp_path / 'converted')
  outs = []
  for path in (pth, tmp_path / 'converted'):
    model, variables = visualize.load_model(path)
    _, imgs = images.load_images(images.resolve(None), model.img_size)
    outs.append(visualize.reconstruct(model, variables, imgs, 0.75, seed=5))
  assert sorted(os.listdir(tmp_path)) == ['converted', 'mae_tiny.pth']
  for a, b in zip(*outs):
    np.testing.assert_array_equal(a, b)


def test_fixed_seed_reproduces_mask_and_figure(ckpts):
  model, variables = visualize.load_model(ckpts['init'])
  _, imgs = images.load_images(images.resolve(None), model.img_size)
  runs = [visualize.reconstruct(model, variables, imgs, 0.75, seed)
          for seed in (7, 7, 8)]
  for a, b in zip(runs[0], runs[1]):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(runs[0][1], runs[2][1])
  pngs = [visualize.figure_png(visualize.reconstruction_figure(
      imgs, pred, mask, model.patch_size, model.norm_pix_loss))
          for pred, mask, _ in runs[:2]]
  assert pngs[0] == pngs[1]


def test_missing_image_or_checkpoint_cli_message_without_traceback(ckpts,
                                                                  tmp_path):
  bad = tmp_path / 'nope.png'
  for args, message in [
      (['--checkpoint', ckpts['init'], '--image', str(bad)],
       f'error: {bad}: no such image file or folder'),
      (['--checkpoint', str(tmp_path / 'none')],
       f'error: {tmp_path / "none"}: no such checkpoint directory')]:
    out = _cli(*args, '--out', str(tmp_path / 'x.png'))
    assert out.returncode == 2
    assert out.stderr.strip() == message  # one line, no traceback
  assert not (tmp_path / 'x.png').exists()


def test_non_image_file_is_one_line(ckpts, tmp_path, capsys):
  bad = tmp_path / 'fake.png'
  bad.write_text('hello')
  assert visualize.main(['--checkpoint', ckpts['init'], '--image', str(bad),
                         '--out', str(tmp_path / 'x.png')]) == 2
  assert capsys.readouterr().err.strip() == (
      f'error: {bad}: not an image file PIL can read')


def test_cli_imports_neither_tensorflow_nor_torch(ckpts, tmp_path):
  code = ('import sys; from mae_jax import visualize; '
          f'rc = visualize.main(["--checkpoint", {ckpts["init"]!r}, '
          f'"--out", {str(tmp_path / "x.png")!r}]); '
          'print(rc, "tensorflow" in sys.modules, "torch" in sys.modules)')
  out = subprocess.run([sys.executable, '-c', code], env=_env(),
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert out.stdout.splitlines()[-1] == '0 False False', out.stderr[-2000:]


@pytest.mark.parametrize('mode', ['L', 'RGBA', 'P', 'CMYK', 'I;16'])
def test_other_modes_are_converted_to_rgb(tmp_path, mode):
  path = tmp_path / ('img.jpg' if mode == 'CMYK' else 'img.png')
  _png(path, (70, 90), mode)
  arr = images.load_image(path, 64)
  assert arr.shape == (64, 64, 3) and arr.dtype == np.float32
  rgb = arr * images.IMAGENET_STD + images.IMAGENET_MEAN
  assert rgb.min() >= -1e-6 and rgb.max() <= 1 + 1e-6
  if mode in ('L', 'I;16'):  # gray stays gray
    np.testing.assert_allclose(rgb[..., 0], rgb[..., 2], atol=1e-6)


def test_small_image_is_upscaled_with_a_warning(tmp_path):
  warnings = []
  arr = images.load_image(_png(tmp_path / 's.png', (20, 20), 'RGB'), 64,
                          warnings.append)
  assert arr.shape == (64, 64, 3)
  assert warnings == [f'{tmp_path / "s.png"}: 20x20 is smaller than the '
                      'model input 64x64; upscaled (bicubic)']


@pytest.mark.parametrize('args,message', [
    (['--checkpoint', '/no/such/weights.pth'],
     'error: /no/such/weights.pth: no such file'),
    (['--mask-ratio', '1.0'],
     'error: mask ratio 1.0 must lie in the open interval (0, 1)'),
])
def test_bad_checkpoint_or_ratio_is_one_line(ckpts, tmp_path, capsys, args,
                                             message):
  if args[0] != '--checkpoint':
    args = ['--checkpoint', ckpts['init'], *args]
  assert visualize.main([*args, '--out', str(tmp_path / 'x.png')]) == 2
  assert capsys.readouterr().err.strip() == message


def test_resize_crop_keeps_the_center():
  img = Image.new('RGB', (300, 100), (0, 0, 0))
  img.paste((255, 255, 255), (100, 0, 200, 100))
  out, upscaled = images.resize_crop(img, 50)
  assert out.size == (50, 50) and not upscaled
  assert np.asarray(out)[5:45, 5:45].min() >= 250


@pytest.fixture(scope='module')
def tiny_init(tmp_path_factory):
  """A freshly initialised mae_vit_tiny_patch8 checkpoint (norm_pix_loss
  False), no training."""
  path = tmp_path_factory.mktemp('tiny_init') / 'ckpt'
  model = create_model('mae_vit_tiny_patch8')
  variables = model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)),
                         noise=jnp.zeros((1, model.num_patches)))
  checkpoint.save(path, model, variables)
  return str(path)


def _noise_png(path, seed):
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 256, (72, 80, 3), np.uint8)).save(path)


def test_same_image_gets_the_same_mask_whatever_else_is_in_the_folder(
    tiny_init, tmp_path, capsys):
  three, one = tmp_path / 'three', tmp_path / 'one'
  three.mkdir()
  one.mkdir()
  for seed, name in enumerate(['a.png', 'b.png', 'c.png']):
    _noise_png(three / name, seed)
  _noise_png(one / 'b.png', 1)
  model, variables = visualize.load_model(tiny_init)
  masks = {}
  for folder in (three, one):
    names, imgs = images.load_images(images.resolve(folder), model.img_size)
    _, mask, _ = visualize.reconstruct(model, variables, imgs, 0.75, seed=4)
    masks[folder.name] = dict(zip(names, mask))
  np.testing.assert_array_equal(masks['three']['b.png'], masks['one']['b.png'])
  assert not np.array_equal(masks['three']['a.png'], masks['three']['b.png'])
  mse = {}
  for folder in (three, one):
    assert visualize.main(['--checkpoint', tiny_init, '--image', str(folder),
                           '--seed', '4', '--out', str(tmp_path / 'x.png')]) == 0
    rows = [l for l in capsys.readouterr().out.splitlines() if MSE.search(l)]
    mse[folder.name] = {l.split()[0]: float(MSE.search(l).group(1))
                        for l in rows}
  # same mask; only the batch size differs (float summation order)
  assert mse['three']['b.png'] == pytest.approx(mse['one']['b.png'], rel=1e-5)


def test_norm_pix_panels_invert_the_target_normalisation():
  imgs = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(
      np.float32) * 0.5
  pred = normalize_patches(patchify(jnp.asarray(imgs), 8))
  mask = np.ones((2, 16), np.float32)
  original, _, recon, _ = figures.reconstruction_panels(imgs, pred, mask, 8,
                                                        True)
  np.testing.assert_allclose(recon, original, atol=1e-5)
  _, _, raw, _ = figures.reconstruction_panels(imgs, pred, mask, 8, False)
  assert np.abs(raw - original).max() > 0.1  # without it: far off


def test_norm_pix_switch_overrides_the_checkpoint_and_says_so(
    tiny_init, tmp_path, capsys):
  for args, line in (([], 'norm_pix_loss: False (from the checkpoint)'),
                     (['--norm-pix-loss'],
                      'norm_pix_loss: True (from --norm-pix-loss)')):
    assert visualize.main(['--checkpoint', tiny_init, *args, '--out',
                           str(tmp_path / 'x.png')]) == 0
    out = capsys.readouterr().out
    assert line in out.splitlines()
  assert 'per-patch normalised pixels' in out
  model, _ = visualize.load_model(tiny_init, norm_pix_loss=True)
  assert model.norm_pix_loss
  title = visualize.figure_title(model, tiny_init, 0, 'from --norm-pix-loss')
  assert 'norm-pix model (from --norm-pix-loss): predicted patches ' \
      'de-normalised' in title


def test_torch_training_checkpoint_sets_norm_pix_unless_switched(tmp_path,
                                                                 capsys):
  torch_mae = pytest.importorskip('tests.torch_mae')
  torch = pytest.importorskip('torch')
  src = tmp_path / 'checkpoint-3.pth'
  torch.save(torch_mae.training_checkpoint(
      torch_mae.make_mae('tiny_patch8')), src)  # args.norm_pix_loss=True
  for args, line in (([], "norm_pix_loss: True (from the file's args)"),
                     (['--no-norm-pix-loss'],
                      "norm_pix_loss: False (from --no-norm-pix-loss; the "
                      "file's args say True)")):
    assert visualize.main(['--checkpoint', str(src), *args, '--out',
                           str(tmp_path / 'x.png')]) == 0
    assert line in capsys.readouterr().out.splitlines()


def test_help_shows_the_defaults(capsys):
  with pytest.raises(SystemExit):
    visualize.parse_args(['--help'])
  text = ' '.join(capsys.readouterr().out.split())
  for default in ('(default: 0.75)', '(default: 0)',
                  '(default: reconstruction.png)', '--no-norm-pix-loss'):
    assert default in text


def test_missing_matplotlib_is_one_line_naming_the_extra(tiny_init, tmp_path):
  code = ("import sys; sys.modules['matplotlib'] = None\n"
          'from mae_jax import visualize\n'
          f'sys.exit(visualize.main(["--checkpoint", {tiny_init!r}, "--out", '
          f'{str(tmp_path / "x.png")!r}]))')
  out = subprocess.run([sys.executable, '-c', code], env=_env(),
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert out.returncode == 2, out.stderr[-2000:]
  assert out.stderr.strip() == (
      'error: matplotlib.figure is not installed; it is needed for '
      "reconstruction figures: pip install 'mae_jax[viz]'")


def test_figures_module_imports_no_cli_checkpoint_or_torch_code():
  """mae_jax.figures alone: the package's __init__ (which loads the
  checkpoint API) is not run, so only what figures itself needs loads."""
  code = ('import importlib.util, sys, types\n'
          "package = types.ModuleType('mae_jax')\n"
          "package.__path__ = importlib.util.find_spec('mae_jax')"
          '.submodule_search_locations\n'
          "sys.modules['mae_jax'] = package\n"
          'import mae_jax.figures\n'
          "print(sorted(m for m in ('mae_jax.visualize', 'mae_jax.checkpoint', "
          "'mae_jax.convert', 'mae_jax.torch_io', 'matplotlib', 'torch', "
          "'tensorflow') if m in sys.modules))")
  out = subprocess.run([sys.executable, '-c', code], env=_env(),
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == '[]'


def test_saved_figure_is_a_png_with_one_row_per_image(tmp_path):
  rng = np.random.default_rng(1)
  imgs = rng.normal(size=(3, 32, 32, 3)).astype(np.float32)
  pred = rng.normal(size=(3, 16, 8 * 8 * 3)).astype(np.float32)
  mask = np.zeros((3, 16), np.float32)
  mask[:, ::2] = 1
  path = figures.save_reconstruction_figure(
      str(tmp_path / 'f.png'), imgs, pred, mask, 8, True, title='step 7')
  with Image.open(path) as png:
    assert png.format == 'PNG'
    assert png.size == (4 * PX, 3 * PX)


def test_figure_replaces_an_old_file_whole_and_leaves_no_temporary(
    tiny_init, tmp_path):
  out = tmp_path / 'figs' / 'r.png'
  out.parent.mkdir()
  out.write_bytes(b'an older figure')
  assert visualize.main(['--checkpoint', tiny_init, '--out', str(out)]) == 0
  assert os.listdir(out.parent) == ['r.png']
  with Image.open(out) as png:
    assert png.format == 'PNG'


def test_image_above_max_pixels_is_refused_without_decoding(tmp_path):
  path = tmp_path / 'huge.png'
  Image.new('1', (images.MAX_PIXELS // 8000 + 1, 8000)).save(path)
  with pytest.raises(images.ImageError, match=(
      r'huge.png: too large: 11185x8000 is more than '
      r'MAX_PIXELS=89478485 pixels$')):
    images.load_image(path, 64)
