"""Fine-tuning / linear-probe optimizers, mixup, and the sharded step."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import finetune, linprobe
from mae_jax.train import classify, optim, sharding
from mae_jax.train.mixup import mix_batch, smooth_one_hot
from mae_jax.models import create_model
from mae_jax.tree import map_with_name


def _flat(tree):
  out = {}
  map_with_name(lambda name, x: out.__setitem__(name, x), tree)
  return out


def _base_params():
  model = create_model('vit_base_patch16')
  return jax.eval_shape(model.init, jax.random.key(0),
                        jnp.zeros((1, 224, 224, 3)))['params']


def test_layer_decay_scales_follow_the_official_grouping():
  params = _base_params()
  scales = _flat(optim.layer_scales(params, depth=12, layer_decay=0.65))
  for name, scale in scales.items():
    top = name.split('/')[0]
    if top in ('cls_token', 'pos_embed', 'patch_embed'):
      layer = 0
    elif top.startswith('blocks_'):
      layer = int(top.split('_')[1]) + 1
    else:
      assert top in ('fc_norm', 'head'), name
      layer = 13
    assert scale == pytest.approx(0.65 ** (13 - layer)), name
  assert len({round(s, 12) for s in scales.values()}) == 14
  assert scales['head/kernel'] == 1.0


def test_finetune_decay_mask_excludes_1d_pos_embed_and_cls_token():
  params = _base_params()
  mask = _flat(optim.decay_mask(params, optim.FINETUNE_NO_DECAY))
  shapes = _flat(params)
  for name, decayed in mask.items():
    expected = (len(shapes[name].shape) > 1
                and name not in ('pos_embed', 'cls_token'))
    assert decayed == expected, name
  assert mask['patch_embed/kernel'] and mask['head/kernel']


def _numpy_lars(params, grads_seq, lrs, wd, momentum=0.9, trust=0.001):
  params = {k: v.astype(np.float64).copy() for k, v in params.items()}
  mu = {k: np.zeros_like(v) for k, v in params.items()}
  for grads, lr in zip(grads_seq, lrs):
    for k, p in params.items():
      g = grads[k].astype(np.float64)
      if p.ndim > 1:
        g = g + wd * p
        pn, gn = np.linalg.norm(p), np.linalg.norm(g)
        q = trust * pn / gn if pn > 0 and gn > 0 else 1.0
        g = g * q
      mu[k] = momentum * mu[k] + g
      params[k] = p - lr * mu[k]
  return params


def test_lars_matches_numpy_reference():
  rng = np.random.default_rng(0)
  params = {'kernel': rng.normal(size=(6, 4)).astype(np.float32),
            'bias': rng.normal(size=(4,)).astype(np.float32)}
  grads_seq = [{k: rng.normal(size=v.shape).astype(np.float32)
                for k, v in params.items()} for _ in range(5)]
  schedule = lambda step: 0.1 * (step + 1) / 5   # changing lr
  tx = optim.lars(schedule, params, weight_decay=0.05)
  state = tx.init(params)
  p = {k: jnp.asarray(v) for k, v in params.items()}
  for grads in grads_seq:
    updates, state = tx.update(grads, state, p)
    p = optax.apply_updates(p, updates)
  ref = _numpy_lars(params, grads_seq, [schedule(s) for s in range(5)], 0.05)
  for k in params:
    np.testing.assert_allclose(np.asarray(p[k]), ref[k], atol=1e-6)


def test_cutmix_and_mixup_label_weights_equal_mixed_areas():
  n, size, classes = 4, 32, 10
  labels = jnp.arange(n)
  # Image i is constant i + 1: a pixel's value tells which image it came from.
  images = jnp.broadcast_to((labels + 1.0)[:, None, None, None],
                            (n, size, size, 3))
  seen = set()
  for seed in range(40):
    mixed, targets, lam = mix_batch(jax.random.key(seed), images, labels,
                                    classes, smoothing=0.0)
    mixed, targets = np.asarray(mixed), np.asarray(targets)
    own = np.isclose(mixed[0, ..., 0], 1.0).mean()
    other = np.isclose(mixed[0, ..., 0], float(n)).mean()
    if own + other == pytest.approx(1.0):        # cutmix: pasted pixels
      seen.add('cutmix')
      assert targets[0, 0] == pytest.approx(own, abs=1e-6)
      assert targets[0, n - 1] == pytest.approx(other, abs=1e-6)
    else:                                        # mixup: blended values
      seen.add('mixup')
      value = mixed[0, 0, 0, 0]
      assert targets[0, 0] == pytest.approx((n - value) / (n - 1), abs=1e-5)
    assert float(lam) == pytest.approx(targets[0, 0], abs=1e-6)
  assert seen == {'cutmix', 'mixup'}


def test_label_smoothing_values():
  t = np.asarray(smooth_one_hot(jnp.array([2]), 5, 0.1))
  np.testing.assert_allclose(t, [[0.02, 0.02, 0.92, 0.02, 0.02]], atol=1e-7)


def _finetune_update(mesh_shape, probe=False):
  config = (linprobe if probe else finetune).get_config('tiny')
  mesh = sharding.make_mesh(mesh_shape, jax.devices()[:math.prod(mesh_shape)])
  t = classify.ClassifyTask(config, mesh)
  assert t.num_classes == 20
  state = t.init_state()
  images = np.asarray(jax.random.normal(jax.random.key(1), (32, 64, 64, 3)))
  labels = np.arange(32) % 20
  batch = sharding.global_batch(mesh, {'image': images[None],
                                       'label': labels[None]}, stacked=True)
  # The first update runs at lr 0 (warmup starts at 0): take two.
  for step in range(2):
    state, metrics = t.update(state, batch, jnp.int32(step))
  return jax.device_get(state), jax.device_get(metrics)


@pytest.mark.parametrize('probe', [False, True])
def test_step_on_8_devices_with_fsdp_equals_one_device(probe):
  one_state, one = _finetune_update((1, 1), probe)
  fsdp_state, fsdp = _finetune_update((1, 8), probe)
  np.testing.assert_allclose(fsdp['loss'], one['loss'], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
               fsdp_state['params'], one_state['params'])


def test_linear_probe_leaves_encoder_frozen():
  config = linprobe.get_config('tiny')
  mesh = sharding.make_mesh((1, 1), jax.devices()[:1])
  before = jax.device_get(classify.ClassifyTask(config, mesh).init_state())
  after, _ = _finetune_update((1, 1), probe=True)
  for name, x in _flat(before['params']).items():
    changed = not np.array_equal(x, _flat(after['params'])[name])
    assert changed == name.startswith('head/'), name
  assert set(_flat(before['opt_state'])) and all(
      'blocks' not in k for k in _flat(before['opt_state']))
