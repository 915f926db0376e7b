"""train.py manners: config typos, --help, which errors are one line.

Every run here stops before anything is compiled."""
import os
import subprocess
import sys

import pytest

from configs import common, pretrain
from mae_jax import errors, extras, images, schema, torch_io
from mae_jax.train import checkpoints, monitor, workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, 'train.py')


def _env():
  return dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1')


def _run(args, timeout=300):
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(),
                        capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize('config,override,message', [
    ('pretrain.py:tiny', ['--config.batch_sze=3'],
     "--config.batch_sze: unknown config field 'batch_sze'; did you mean "
     "'batch_size'?"),
    ('pretrain.py:base', ['--config.data.nme', 'folder'],
     "--config.data.nme: unknown config field 'data.nme'; did you mean "
     "'data.name'?"),
    ('finetune.py:tiny', ['--config.layer_dcay=0.5'],
     "--config.layer_dcay: unknown config field 'layer_dcay'; did you mean "
     "'layer_decay'?"),
    ('pretrain.py:tiny', ['--noconfig.remap'],
     "--noconfig.remap: unknown config field 'remap'; did you mean 'remat'?"),
])
def test_config_typo_is_one_line_with_a_suggestion(tmp_path, config, override,
                                                   message):
  out = _run([TRAIN, '--config', f'configs/{config}', '--workdir',
              str(tmp_path / 'w'), *override])
  assert out.returncode == 2, out.stderr[-2000:]
  assert out.stderr.strip() == f'error: {message}'
  assert not (tmp_path / 'w').exists()


def test_config_typo_in_a_flagfile_is_one_line(tmp_path):
  flagfile = tmp_path / 'flags.txt'
  flagfile.write_text('--config=configs/pretrain.py:tiny\n'
                      '--config.mask_ration=0.5\n')
  out = _run([TRAIN, f'--flagfile={flagfile}', '--workdir',
              str(tmp_path / 'w')])
  assert out.returncode == 2, out.stderr[-2000:]
  assert out.stderr.strip() == (
      "error: --config.mask_ration: unknown config field 'mask_ration'; did "
      "you mean 'mask_ratio'?")


def test_help_lists_the_config_variants_and_where_fields_are_documented():
  text = _run([TRAIN, '--help']).stdout  # absl exits 1 after --help
  assert f'configs/pretrain.py:{"|".join(pretrain.VARIANTS)}' in text
  for name in ('finetune', 'linprobe'):
    assert f'configs/{name}.py:{"|".join(common.SIZES)}' in text
  assert 'documented' in text and 'README.md' in text
  assert '--config.FIELD=VALUE' in text


# train.main with pretrain.train replaced by one that raises `error`.
RAISING_RUN = '''
import sys
sys.path.insert(0, {root!r})
sys.argv = ['train.py', '--config', 'configs/pretrain.py:tiny',
            '--workdir', {workdir!r}]
import train
from absl import app
from mae_jax.train import pretrain
from mae_jax.errors import ConfigError
from mae_jax.errors import DataError
from mae_jax.train.monitor import NonFiniteError

def run(config, workdir):
  raise {error}

pretrain.train = run
app.run(train.main, flags_parser=train.parse_flags)
'''


@pytest.mark.parametrize('error,code,one_line', [
    ("ConfigError('config.blr=-1 must be > 0')", 2, True),
    ("FileNotFoundError('data/x: no such folder')", 2, True),
    ("DataError('data/x: holds no image files')", 2, True),
    ("NonFiniteError('loss is NaN at update 3')", 1, True),
    ("ValueError('an internal bug')", 1, False),
    ("KeyError('an internal bug')", 1, False),
])
def test_only_project_errors_become_one_line(tmp_path, error, code, one_line):
  script = RAISING_RUN.format(root=ROOT, workdir=str(tmp_path / 'w'),
                              error=error)
  out = _run(['-c', script])
  assert out.returncode == code, out.stderr[-2000:]
  message = error.split("'")[1]
  if one_line:
    assert out.stderr.strip().splitlines()[-1] == f'error: {message}'
    assert 'Traceback' not in out.stderr
  else:
    assert 'Traceback (most recent call last)' in out.stderr
    assert 'an internal bug' in out.stderr.splitlines()[-1]
    assert 'error: ' not in out.stderr


@pytest.mark.parametrize('override,message', [
    ('--config.mesh=(3,5)', 'error: mesh=(3, 5) needs 15 devices but'),
    ('--config.data.augment=bogus', "error: unknown data.augment='bogus'"),
])
def test_bad_config_value_found_late_is_one_line(tmp_path, override, message):
  out = _run([TRAIN, '--config', 'configs/finetune.py:tiny', '--workdir',
              str(tmp_path / 'w'), override])
  assert out.returncode == 2, out.stderr[-2000:]
  assert out.stderr.strip().splitlines()[-1].startswith(message)
  assert 'Traceback' not in out.stderr
  assert out.stderr.count('error: ') == 1


def test_every_project_error_is_a_mae_jax_error_at_its_old_names_too():
  classes = [c for c in vars(errors).values()
             if isinstance(c, type) and c.__module__ == errors.__name__]
  assert len(classes) >= 9  # MaeJaxError and the eight below
  assert all(issubclass(c, errors.MaeJaxError) for c in classes)
  assert schema.ConfigError is errors.ConfigError
  assert torch_io.CheckpointError is errors.CheckpointError
  assert images.ImageError is errors.ImageError
  assert workdir.WorkdirLocked is errors.WorkdirLocked
  assert checkpoints.CheckpointSaveError is errors.CheckpointSaveError
  assert monitor.NonFiniteError is errors.NonFiniteError
  assert extras.MissingExtraError is errors.MissingExtraError
  # The built-in bases stay, so `except ValueError` and the like still work.
  for cls, base in ((errors.ConfigError, ValueError),
                    (errors.DataError, ValueError),
                    (errors.ImageError, errors.DataError),
                    (errors.CheckpointError, ValueError),
                    (errors.WorkdirLocked, RuntimeError),
                    (errors.CheckpointSaveError, OSError),
                    (errors.NonFiniteError, FloatingPointError),
                    (errors.MissingExtraError, ImportError)):
    assert issubclass(cls, base), (cls, base)
