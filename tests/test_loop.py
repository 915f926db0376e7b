"""The training loop's own guarantees, checked in-process on tiny runs:
figures do not recompile, gradient accumulation keeps one micro-batch of
activations, the host waits for the device only where it needs results,
batches are on the devices ahead of their update, and a corrupt checkpoint
is found by its checksums."""
import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mae_jax
from configs import pretrain as pretrain_config
from mae_jax.errors import CorruptCheckpointError
from mae_jax.train import loop, monitor, pretrain, sharding

pytestmark = pytest.mark.long


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


def _traced_run(tmp_path, monkeypatch, **overrides):
  """Runs a tiny pretraining; returns [(event, value, updates dispatched so
  far)] for every batch put on the devices ('put'), update dispatched
  ('update', its step) and update whose metrics were checked ('check')."""
  task = pretrain.PretrainTask(_config(**overrides), _mesh())
  events, update = [], task.update
  dispatched = lambda: sum(e[0] == 'update' for e in events)

  def traced_update(state, batch, step):
    events.append(('update', int(step), dispatched()))
    return update(state, batch, step)

  def traced_put(*args, **kwargs):
    events.append(('put', None, dispatched()))
    return put(*args, **kwargs)

  def traced_check(self, step, *args, **kwargs):
    events.append(('check', step, dispatched()))
    return check(self, step, *args, **kwargs)

  put, check = sharding.global_batch, monitor.Monitor.check_finite
  monkeypatch.setattr(task, 'update', traced_update)
  monkeypatch.setattr(sharding, 'global_batch', traced_put)
  monkeypatch.setattr(monitor.Monitor, 'check_finite', traced_check)
  loop.run(task, tmp_path / 'w')
  return events


def test_host_checks_metrics_only_at_log_and_checkpoint_steps(
    tmp_path, monkeypatch):
  # Logs every 3 updates, checkpoints every 6, 7 updates: the metrics of
  # updates 0-2 are read once 3 are dispatched, 3-5 at 6, 6 at the end;
  # between those the host never waits for a result.
  events = _traced_run(tmp_path, monkeypatch, total_steps=7,
                       log_every_steps=3, checkpoint_every_steps=6)
  checks = [(step, seen) for kind, step, seen in events if kind == 'check']
  assert checks == [(0, 3), (1, 3), (2, 3), (3, 6), (4, 6), (5, 6), (6, 7)]


def test_batches_are_on_the_devices_two_updates_ahead(tmp_path, monkeypatch):
  # ... and none is read past the last update.
  events = _traced_run(tmp_path, monkeypatch, total_steps=4)
  for i, (kind, step, _) in enumerate(events):
    if kind == 'update':
      puts = sum(e[0] == 'put' for e in events[:i])
      assert puts == min(step + 2, 4), events
  assert sum(e[0] == 'put' for e in events) == 4, events


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
