"""Pretraining runs of the `tiny` config that stop at a bad config or
dataset (the faults of every task: tests/test_faults_every_task.py)."""
import re
import subprocess

import jax
import pytest

from configs import pretrain
from mae_jax.train import pretrain as pretrain_task, sharding
from mae_jax.errors import ConfigError
from tests.helpers import cpu_env, train_command


@pytest.mark.parametrize('field,value,message', [
    ('data.image_size', 60, 'config.data.image_size=60'),
    ('mask_ratio', 1.0, 'config.mask_ratio=1.0'),
    ('mask_ratio', 0.0, 'config.mask_ratio=0.0'),
    ('batch_size', 7, 'config.batch_size=7'),
    ('model', 'mae_vit_small', "config.model='mae_vit_small'"),
    ('data.name', 'folder', 'config.data.data_dir is required'),
    ('data.name', 'no_such_dataset', 'config.data.data_dir is required'),
])
def test_bad_config_is_rejected_naming_the_field(field, value, message):
  config = pretrain.get_config('tiny')
  config.update_from_flattened_dict({field: value})
  with pytest.raises(ConfigError, match=re.escape(message)):
    pretrain_task.PretrainTask(
        config, sharding.make_mesh((-1, 1), jax.devices()[:8]))


def test_unknown_tfds_name_is_named(tmp_path):
  config = pretrain.get_config('tiny')
  config.update_from_flattened_dict({'data.name': 'no_such_dataset',
                                     'data.data_dir': str(tmp_path)})
  with pytest.raises(ValueError, match='no_such_dataset'):
    pretrain_task.train(config, str(tmp_path / 'w'))


def test_cli_prints_one_line_error_without_traceback(tmp_path):
  out = subprocess.run(train_command(tmp_path / 'w', '--config.mask_ratio=1.5'),
                       env=cpu_env(8), capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 2, out.stderr[-2000:]
  assert 'config.mask_ratio=1.5 must lie in the open interval (0, 1)' in (
      out.stderr)
  assert 'Traceback' not in out.stderr
