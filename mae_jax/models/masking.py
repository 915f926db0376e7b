"""Argsort-based per-sample random masking (MAE section 3.1 semantics).

For each sample, noise ~ U[0, 1) of shape (L,); patches with the smallest
noise are kept. Given the same noise this reproduces the reference exactly.
"""
import jax
import jax.numpy as jnp


def num_kept(length, mask_ratio):
  """Number of visible patches: int(L * (1 - mask_ratio)), as the reference."""
  if not 0.0 <= mask_ratio < 1.0:
    raise ValueError(f'mask_ratio={mask_ratio} must lie in [0, 1)')
  return int(length * (1 - mask_ratio))


def random_masking(x, mask_ratio, noise):
  """Keeps the len_keep tokens with the smallest noise in each sample.

  Args:
    x: (N, L, D) tokens.
    mask_ratio: fraction of tokens removed, a Python float.
    noise: (N, L) values, one per token and sample.

  Returns:
    x_kept: (N, len_keep, D) visible tokens in shuffled order.
    mask: (N, L) float, 0 for kept and 1 for removed, original patch order.
    ids_restore: (N, L) int32, inverse permutation of ids_shuffle.
  """
  n, length, _ = x.shape
  if noise.shape != (n, length):
    raise ValueError(f'noise has shape {noise.shape}, expected {(n, length)}')
  ids_keep, mask, ids_restore = masking_indices(noise, mask_ratio)
  return gather_tokens(x, ids_keep), mask, ids_restore


def masking_indices(noise, mask_ratio):
  """The index part of `random_masking`: noise (N, L) -> ids_keep
  (N, len_keep) int32 (visible tokens in shuffled order), mask (N, L) float
  (1 = removed), ids_restore (N, L) int32."""
  n, length = noise.shape
  len_keep = num_kept(length, mask_ratio)
  ids_shuffle = jnp.argsort(noise, axis=1)
  ids_restore = jnp.argsort(ids_shuffle, axis=1)
  mask = jnp.concatenate(
      [jnp.zeros((n, len_keep), jnp.float32),
       jnp.ones((n, length - len_keep), jnp.float32)], axis=1)
  mask = jnp.take_along_axis(mask, ids_restore, axis=1)
  return (ids_shuffle[:, :len_keep].astype(jnp.int32), mask,
          ids_restore.astype(jnp.int32))


def gather_tokens(x, ids):
  """x (N, L, D), ids (N, K) -> (N, K, D): x[n, ids[n, k]]."""
  return jnp.take_along_axis(x, ids[:, :, None], axis=1)


def draw_noise(key, batch, length):
  """Uniform noise (N, L) in [0, 1) for `random_masking`."""
  return jax.random.uniform(key, (batch, length), jnp.float32)
