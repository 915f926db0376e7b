"""The linear probe's BatchNorm against torch.nn.BatchNorm1d(affine=False)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mae_jax.models import create_model
from mae_jax.models.batchnorm import TorchBatchNorm1d

EPS = 1e-6
N, D = 16, 32


def _batches(count, seed=0):
  """float32 (N, D) batches with per-feature scale and offset far from 0/1."""
  rng = np.random.default_rng(seed)
  scale = rng.uniform(0.5, 4.0, D)
  offset = rng.uniform(-3.0, 3.0, D)
  return [(rng.standard_normal((N, D)) * scale + offset).astype(np.float32)
          for _ in range(count)]


def _torch_bn():
  bn = torch.nn.BatchNorm1d(D, affine=False, eps=EPS)  # momentum 0.1
  assert bn.momentum == 0.1
  return bn


def _close(a, b):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6,
                             atol=1e-6)


def test_probe_batchnorm_matches_torch_batchnorm1d_over_several_updates():
  module = TorchBatchNorm1d(eps=EPS)
  batches = _batches(6)
  variables = module.init(jax.random.key(0), batches[0])
  ref = _torch_bn().train()
  step = jax.jit(lambda v, x: module.apply(v, x, train=True,
                                           mutable=['batch_stats']))
  for x in batches:
    out, variables = step(variables, x)
    expected = ref(torch.from_numpy(x)).detach().numpy()
    _close(out, expected)
    _close(variables['batch_stats']['mean'], ref.running_mean.numpy())
    _close(variables['batch_stats']['var'], ref.running_var.numpy())
  ref.eval()
  test = _batches(1, seed=1)[0]
  _close(module.apply(variables, test),
         ref(torch.from_numpy(test)).detach().numpy())


def test_running_var_averages_the_unbiased_batch_variance_unlike_flax():
  x = _batches(1)[0]
  ours = TorchBatchNorm1d(eps=EPS)
  _, new = ours.apply(ours.init(jax.random.key(0), x), x, train=True,
                      mutable=['batch_stats'])
  unbiased = 0.9 + 0.1 * x.var(axis=0, ddof=1)
  biased = 0.9 + 0.1 * x.var(axis=0)
  _close(new['batch_stats']['var'], unbiased)
  flax_bn = nn.BatchNorm(use_running_average=False, use_bias=False,
                         use_scale=False, epsilon=EPS, momentum=0.9)
  _, flax_new = flax_bn.apply(flax_bn.init(jax.random.key(0), x), x,
                              mutable=['batch_stats'])
  _close(flax_new['batch_stats']['var'], biased)
  # n / (n - 1) = 16 / 15 on the batch term: far beyond float32 noise.
  assert np.min(np.abs(unbiased - biased) / biased) > 1e-3


def test_state_has_flax_batchnorm_names_and_init_leaves_it_untouched():
  x = _batches(1)[0]
  stats = TorchBatchNorm1d().init(jax.random.key(0), x)['batch_stats']
  assert set(stats) == {'mean', 'var'}
  assert stats['mean'].dtype == stats['var'].dtype == jnp.float32
  np.testing.assert_array_equal(stats['mean'], np.zeros(D))
  np.testing.assert_array_equal(stats['var'], np.ones(D))


def test_training_on_a_batch_of_one_raises_naming_the_batch_size():
  module = TorchBatchNorm1d()
  x = np.ones((1, D), np.float32)
  variables = module.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match='batch size 1'):
    module.apply(variables, x, train=True, mutable=['batch_stats'])
  module.apply(variables, x)  # evaluation uses running stats: fine


def test_statistics_of_a_batch_sharded_over_8_devices_are_global():
  module = TorchBatchNorm1d(eps=EPS)
  x = _batches(1)[0]
  variables = module.init(jax.random.key(0), x)
  mesh = Mesh(np.array(jax.devices()[:8]), ('data',))
  sharded = jax.device_put(x, NamedSharding(mesh, P('data')))
  out, new = jax.jit(lambda v, x: module.apply(
      v, x, train=True, mutable=['batch_stats']))(variables, sharded)
  ref = _torch_bn().train()
  _close(out, ref(torch.from_numpy(x)).detach().numpy())
  _close(new['batch_stats']['var'], ref.running_var.numpy())


def test_linear_probe_vit_updates_head_bn_var_as_torch_on_its_features():
  model = create_model('vit_tiny_patch8', num_classes=10, linear_probe=True,
                       global_pool=False)
  imgs = jax.random.normal(jax.random.key(1), (N, 64, 64, 3))
  variables = model.init(jax.random.key(0), imgs)
  rngs = {'dropout': jax.random.key(2)}
  # The same dropout key gives the same stochastic depth in both passes.
  feats = model.apply(variables, imgs, train=True, return_features=True,
                      rngs=rngs)
  _, new = model.apply(variables, imgs, train=True, rngs=rngs,
                       mutable=['batch_stats'])
  ref = torch.nn.BatchNorm1d(feats.shape[1], affine=False, eps=EPS).train()
  ref(torch.from_numpy(np.array(feats, np.float32)))
  stats = new['batch_stats']['head_bn']
  _close(stats['mean'], ref.running_mean.numpy())
  _close(stats['var'], ref.running_var.numpy())
