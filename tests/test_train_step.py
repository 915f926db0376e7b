"""Sharded train step: meshes, FSDP layout, accumulation, lr, decay mask."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import pretrain as pretrain_config
from mae_jax.train import optim, pretrain, sharding
from mae_jax.train.task import schedule_for
from mae_jax.models import create_model

pytestmark = pytest.mark.long


def _config(**kw):
  c = pretrain_config.get_config('tiny')
  with c.unlocked():
    c.batch_size = 16
    c.total_steps = 10
    c.warmup_steps = 2
    for k, v in kw.items():
      setattr(c, k, v)
  return c


def _images(n, seed=0):
  return np.asarray(jax.random.normal(jax.random.key(seed), (n, 64, 64, 3)))


def _one_update(config, mesh_shape, images_list):
  mesh = sharding.make_mesh(mesh_shape, jax.devices()[:math.prod(mesh_shape)])
  t = pretrain.PretrainTask(config, mesh)
  state = t.init_state()
  init = jax.device_get(state['params'])
  batch = sharding.global_batch(mesh, {'image': np.stack(images_list)},
                                stacked=True)
  # The first update runs at lr 0 (warmup starts at 0): take two.
  for step in range(2):
    state, metrics = t.update(state, batch, jnp.int32(step))
  moved = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - b).max(),
                       state['params'], init)
  assert min(jax.tree.leaves(moved)) > 0  # every parameter was updated
  return state, metrics


@pytest.fixture(scope='module')
def reference():
  return _one_update(_config(), (1, 1), [_images(16)])


@pytest.mark.parametrize('mesh_shape', [(8, 1), (1, 8), (2, 4)])
def test_same_update_on_every_mesh(reference, mesh_shape):
  ref_state, ref_metrics = reference
  state, metrics = _one_update(_config(), mesh_shape, [_images(16)])
  np.testing.assert_allclose(metrics['loss'], ref_metrics['loss'], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      np.asarray(a), np.asarray(b), atol=1e-5), state['params'],
               ref_state['params'])


def test_fsdp_holds_an_eighth_of_the_parameters_per_device():
  state, _ = _one_update(_config(), (1, 8), [_images(16)])
  leaves = jax.tree.leaves(state['params'])
  total = sum(x.nbytes for x in leaves)
  per_device = {}
  for x in leaves:
    for shard in x.addressable_shards:
      per_device[shard.device] = per_device.get(shard.device, 0) + (
          shard.data.nbytes)
  assert len(per_device) == 8
  for nbytes in per_device.values():
    assert nbytes < total / 8 * 1.1, (nbytes, total)


def test_accumulation_equals_large_batch():
  images = _images(32, seed=5)
  big_state, big = _one_update(_config(batch_size=32), (1, 1), [images])
  acc_state, acc = _one_update(_config(batch_size=8, accum_iter=4), (1, 1),
                               [images[i * 8:(i + 1) * 8] for i in range(4)])
  np.testing.assert_allclose(acc['loss'], big['loss'], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      np.asarray(a), np.asarray(b), atol=1e-5), acc_state['params'],
               big_state['params'])


def test_lr_schedule_matches_spec_formula():
  config = _config()
  with config.unlocked():
    config.total_steps, config.warmup_steps = 0, 0
    config.epochs, config.warmup_epochs, config.min_lr = 10, 2, 1e-6
    config.batch_size, config.accum_iter, config.blr = 64, 2, 1.5e-4
  steps_per_epoch = 7
  schedule, total = schedule_for(config, steps_per_epoch)
  assert total == 70
  lr = 1.5e-4 * 128 / 256
  for step in (0, 3, 13, 14, 15, 40, 69):
    e = step / steps_per_epoch
    if e < 2:
      expected = lr * e / 2
    else:
      expected = 1e-6 + (lr - 1e-6) * 0.5 * (
          1 + math.cos(math.pi * (e - 2) / (10 - 2)))
    assert float(schedule(step)) == pytest.approx(expected, rel=1e-5,
                                                  abs=1e-12)


def test_weight_decay_mask_on_base_model():
  model = create_model('mae_vit_base_patch16')
  shapes = jax.eval_shape(model.init, {'params': jax.random.key(0)},
                          jnp.zeros((1, 224, 224, 3)),
                          noise=jnp.zeros((1, 196)))['params']
  mask = optim.decay_mask(shapes)
  flat = {'/'.join(str(k.key) for k in path): v for path, v in
          jax.tree_util.tree_leaves_with_path(mask)}
  assert flat['cls_token'] and flat['mask_token']
  assert flat['patch_embed/kernel'] and not flat['patch_embed/bias']
  assert flat['blocks_0/attn/qkv/kernel']
  assert not flat['blocks_0/attn/qkv/bias']
  assert not flat['blocks_0/norm1/scale'] and not flat['norm/bias']
  assert flat['decoder_pred/kernel'] and not flat['decoder_norm/scale']
  for path, x in jax.tree_util.tree_leaves_with_path(shapes):
    name = '/'.join(str(k.key) for k in path)
    assert flat[name] == (x.ndim > 1 and not name.endswith('bias')), name
  # 12 + 8 blocks x 4 matrices, plus patch embed, decoder embed/pred, 2 tokens
  assert sum(flat.values()) == 20 * 4 + 5
