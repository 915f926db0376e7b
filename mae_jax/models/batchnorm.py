"""BatchNorm with PyTorch's semantics, over the last (channel) axis.

The linear-probing head of the MAE paper's recipe is
`torch.nn.BatchNorm1d(D, affine=False, eps=1e-6)` (momentum 0.1), and
ViTPose's classic heatmap head uses `torch.nn.BatchNorm2d(256)` (affine,
eps 1e-5). In training PyTorch normalises with the batch mean and the
biased batch variance but keeps the running variance as an average of the
*unbiased* one (n / (n - 1) times the biased, n the number of values per
channel); evaluation normalises with the running statistics.
`flax.linen.BatchNorm` averages the biased variance instead, so its running
variance, used at evaluation, drifts from PyTorch's.

State lives where flax's BatchNorm keeps it: collection 'batch_stats',
variables 'mean' (zeros) and 'var' (ones), both float32 of shape (C,); with
`count_batches`, also 'num_batches_tracked' (int32 scalar), PyTorch's
counter of training batches, kept so a PyTorch checkpoint round-trips.
Affine parameters are 'scale' (ones) and 'bias' (zeros).
"""
import flax.linen as nn
import jax.numpy as jnp
import numpy as np


class TorchBatchNorm(nn.Module):
  """torch.nn.BatchNorm{1,2}d over channels-last inputs.

  x (N, ..., C) -> float32 (N, ..., C): (N, D) as BatchNorm1d, NHWC as
  BatchNorm2d. With train=True the running statistics are updated as
  new = (1 - momentum) * running + momentum * batch (PyTorch's momentum
  convention), the variance term being the unbiased batch variance; apply
  with mutable=['batch_stats']. Statistics are plain means over every axis
  but the last, so under jit a batch sharded across devices gives global
  statistics. Initialisation leaves the running statistics untouched.
  """
  eps: float = 1e-5
  momentum: float = 0.1
  affine: bool = False
  count_batches: bool = False

  @nn.compact
  def __call__(self, x, train=False):
    if x.ndim < 2:
      raise ValueError(f'TorchBatchNorm expects (N, ..., C) inputs, got shape '
                       f'{x.shape}')
    dim = x.shape[-1]
    mean = self.variable('batch_stats', 'mean', jnp.zeros, (dim,),
                         jnp.float32)
    var = self.variable('batch_stats', 'var', jnp.ones, (dim,), jnp.float32)
    if self.count_batches:
      count = self.variable('batch_stats', 'num_batches_tracked', jnp.zeros,
                            (), jnp.int32)
    x = x.astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    if not train:
      y = (x - mean.value) / jnp.sqrt(var.value + self.eps)
    else:
      n = int(np.prod(x.shape[:-1]))
      if n < 2:
        raise ValueError('TorchBatchNorm in training needs more than 1 value '
                         f'per channel to estimate a variance, got input '
                         f'shape {x.shape}')
      batch_mean = jnp.mean(x, axis=axes)
      centred = x - batch_mean
      biased_var = jnp.mean(jnp.square(centred), axis=axes)
      if not self.is_initializing():
        m = self.momentum
        mean.value = (1 - m) * mean.value + m * batch_mean
        var.value = (1 - m) * var.value + m * biased_var * (n / (n - 1))
        if self.count_batches:
          count.value = count.value + 1
      y = centred / jnp.sqrt(biased_var + self.eps)
    if self.affine:
      y = (y * self.param('scale', nn.initializers.ones, (dim,), jnp.float32)
           + self.param('bias', nn.initializers.zeros, (dim,), jnp.float32))
    return y
