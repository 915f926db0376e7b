"""The training loop's own guarantees, checked in-process on tiny runs:
figures do not recompile, gradient accumulation keeps one micro-batch of
activations, and a corrupt checkpoint is found by its checksums."""
import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mae_jax
from configs import pretrain as pretrain_config
from mae_jax.errors import CorruptCheckpointError
from mae_jax.train import loop, pretrain, sharding


def _config(**overrides):
  config = pretrain_config.get_config('tiny')
  config.update_from_flattened_dict({
      'batch_size': 8, 'data.image_size': 32, 'total_steps': 4,
      'warmup_steps': 1, 'checkpoint_every_steps': 2, 'log_every_steps': 2,
      'figure_every_steps': 0, **overrides})
  return config


def _mesh():
  return sharding.make_mesh((1, 1), jax.devices()[:1])


def test_figure_interval_compiles_the_reconstruction_once(tmp_path):
  task = pretrain.PretrainTask(_config(figure_every_steps=1), _mesh())
  loop.run(task, tmp_path / 'w')
  assert len(glob.glob(str(tmp_path / 'w' / 'figures' / '*.png'))) == 4
  assert task.reconstruct._cache_size() == 1  # pylint: disable=protected-access
  assert task.update._cache_size() == 1  # pylint: disable=protected-access


def _temp_bytes(batch_size, accum_iter):
  """(temporary bytes of the compiled update, parameter bytes) at 64x64."""
  task = pretrain.PretrainTask(
      _config(batch_size=batch_size, accum_iter=accum_iter,
              **{'data.image_size': 64}), _mesh())
  batch = {'image': jax.ShapeDtypeStruct(
      (accum_iter, batch_size, 64, 64, 3), jnp.float32,
      sharding=sharding.batch_sharding(task.mesh, stacked=True))}
  compiled = task.update.lower(task.abstract_state, batch,
                               jax.ShapeDtypeStruct((), jnp.int32)).compile()
  params = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(
      task.abstract_state['params']))
  return compiled.memory_analysis().temp_size_in_bytes, params


def test_accumulated_update_holds_the_activations_of_one_micro_batch():
  one, params = _temp_bytes(32, 1)
  accumulated, _ = _temp_bytes(32, 4)
  big, _ = _temp_bytes(128, 1)
  # 4 micro-batches in a lax.scan need what one does plus the gradient
  # sum (measured: 117 MB, 124 MB, 485 MB, parameters 9 MB).
  assert accumulated < one + 2 * params, (one, accumulated, big, params)
  assert accumulated < 0.3 * big, (one, accumulated, big, params)


def _flip_a_bit_of_the_largest_params_file(step_dir):
  files = [f for f in glob.glob(os.path.join(step_dir, 'params', '**'),
                                recursive=True) if os.path.isfile(f)]
  largest = max(files, key=os.path.getsize)
  data = bytearray(open(largest, 'rb').read())
  data[len(data) // 2] ^= 0x10
  with open(largest, 'wb') as f:
    f.write(data)


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('reference') / 'w'
  state = pretrain.train(_config(), workdir, _mesh())
  return workdir, jax.device_get(state['params'])


def test_a_flipped_bit_is_found_on_resume_which_takes_the_previous_step(
    tmp_path, reference, capsys):
  _, expected = reference
  workdir = tmp_path / 'w'
  pretrain.train(_config(), workdir, _mesh())
  _flip_a_bit_of_the_largest_params_file(str(workdir / 'checkpoints' / '4'))
  capsys.readouterr()
  state = pretrain.train(_config(), workdir, _mesh())
  out = capsys.readouterr().out
  assert 'checkpoints/4 is corrupt: params leaf ' in out
  assert f'moved it to {workdir}/corrupt_checkpoints/4' in out
  assert 'resuming at step 2/4' in out
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4']
  jax.tree.map(np.testing.assert_array_equal,
               jax.device_get(state['params']), expected)


def test_a_flipped_bit_makes_load_refuse_naming_the_leaf_unless_asked(
    tmp_path):
  workdir = tmp_path / 'w'
  pretrain.train(_config(), workdir, _mesh())
  _flip_a_bit_of_the_largest_params_file(str(workdir / 'checkpoints' / '4'))
  with pytest.raises(CorruptCheckpointError,
                     match=(r"step 4 is corrupt: params leaf '[^']+'.*"
                            r"step=N\) \(steps: \[2, 4\]\)")):
    mae_jax.load(workdir)
  _, variables = mae_jax.load(workdir, step=2)
  assert jax.tree.leaves(variables['params'])
