"""TorchBatchNorm against torch: the linear probe's BatchNorm1d(affine=False)
and the pose head's BatchNorm2d (affine, counting batches)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mae_jax.models import create_model
from mae_jax.models.batchnorm import TorchBatchNorm

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
  module = TorchBatchNorm(eps=EPS)
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
  ours = TorchBatchNorm(eps=EPS)
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
  stats = TorchBatchNorm(eps=1e-6).init(jax.random.key(0), x)['batch_stats']
  assert set(stats) == {'mean', 'var'}
  assert stats['mean'].dtype == stats['var'].dtype == jnp.float32
  np.testing.assert_array_equal(stats['mean'], np.zeros(D))
  np.testing.assert_array_equal(stats['var'], np.ones(D))


def test_training_on_a_batch_of_one_raises_naming_the_shape():
  module = TorchBatchNorm(eps=1e-6)
  x = np.ones((1, D), np.float32)
  variables = module.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="more than 1 value"):
    module.apply(variables, x, train=True, mutable=['batch_stats'])
  module.apply(variables, x)  # evaluation uses running stats: fine


def test_statistics_of_a_batch_sharded_over_8_devices_are_global():
  module = TorchBatchNorm(eps=EPS)
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


def test_pose_head_batchnorm_matches_torch_batchnorm2d_with_affine_and_counter():
  """NHWC input, scale/bias set away from 1/0, three training updates, then
  evaluation: outputs, running statistics and num_batches_tracked equal
  torch.nn.BatchNorm2d's on the NCHW layout."""
  rng = np.random.default_rng(3)
  c = 8
  module = TorchBatchNorm(affine=True, count_batches=True)  # eps 1e-5
  xs = [(rng.standard_normal((4, 5, 6, c)) * 2 + 1).astype(np.float32)
        for _ in range(3)]
  variables = module.init(jax.random.key(0), xs[0])
  scale = rng.uniform(0.5, 2, c).astype(np.float32)
  bias = rng.uniform(-1, 1, c).astype(np.float32)
  variables = {'params': {'scale': scale, 'bias': bias},
               'batch_stats': variables['batch_stats']}
  ref = torch.nn.BatchNorm2d(c).train()
  with torch.no_grad():
    ref.weight.copy_(torch.from_numpy(scale))
    ref.bias.copy_(torch.from_numpy(bias))
  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
  nhwc = lambda t: t.detach().numpy().transpose(0, 2, 3, 1)
  for x in xs:
    out, stats = module.apply(variables, x, train=True,
                              mutable=['batch_stats'])
    variables = {**variables, **stats}
    np.testing.assert_allclose(out, nhwc(ref(nchw(x))), rtol=1e-5, atol=1e-5)
  st = variables['batch_stats']
  _close(st['mean'], ref.running_mean.numpy())
  _close(st['var'], ref.running_var.numpy())
  assert int(st['num_batches_tracked']) == int(ref.num_batches_tracked) == 3
  ref.eval()
  np.testing.assert_allclose(module.apply(variables, xs[0]),
                             nhwc(ref(nchw(xs[0]))), rtol=1e-5, atol=1e-5)
