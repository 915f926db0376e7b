"""BatchNorm over (N, D) features with PyTorch's BatchNorm1d semantics.

The linear-probing head of the MAE paper's recipe is
`torch.nn.BatchNorm1d(D, affine=False, eps=1e-6)` (momentum 0.1). In
training it normalises with the batch mean and the biased batch variance
but keeps the running variance as an average of the *unbiased* one
(n / (n - 1) times the biased); evaluation normalises with the running
statistics. `flax.linen.BatchNorm` averages the biased variance instead, so
its running variance, used at evaluation, drifts from PyTorch's.

State lives where flax's BatchNorm keeps it: collection 'batch_stats',
variables 'mean' (zeros) and 'var' (ones), both float32 of shape (D,).
"""
import flax.linen as nn
import jax.numpy as jnp


class TorchBatchNorm1d(nn.Module):
  """BatchNorm without affine parameters, as torch.nn.BatchNorm1d.

  x (N, D) -> float32 (N, D). With train=True the running statistics are
  updated as new = (1 - momentum) * running + momentum * batch (PyTorch's
  momentum convention), the variance term being the unbiased batch
  variance; apply with mutable=['batch_stats']. Statistics are plain means
  over axis 0, so under jit a batch sharded across devices gives global
  statistics. Initialisation leaves the running statistics untouched.
  """
  eps: float = 1e-6
  momentum: float = 0.1

  @nn.compact
  def __call__(self, x, train=False):
    if x.ndim != 2:
      raise ValueError(f'TorchBatchNorm1d expects (N, D) inputs, got shape '
                       f'{x.shape}')
    dim = x.shape[1]
    mean = self.variable('batch_stats', 'mean', jnp.zeros, (dim,),
                         jnp.float32)
    var = self.variable('batch_stats', 'var', jnp.ones, (dim,), jnp.float32)
    x = x.astype(jnp.float32)
    if not train:
      return (x - mean.value) / jnp.sqrt(var.value + self.eps)
    n = x.shape[0]
    if n < 2:
      raise ValueError(f'TorchBatchNorm1d in training needs a batch of more '
                       f'than 1 sample to estimate a variance, got batch size '
                       f'{n}')
    batch_mean = jnp.mean(x, axis=0)
    centred = x - batch_mean
    biased_var = jnp.mean(jnp.square(centred), axis=0)
    if not self.is_initializing():
      m = self.momentum
      mean.value = (1 - m) * mean.value + m * batch_mean
      var.value = (1 - m) * var.value + m * biased_var * (n / (n - 1))
    return centred / jnp.sqrt(biased_var + self.eps)
