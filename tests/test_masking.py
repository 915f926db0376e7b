import jax
import numpy as np
import pytest

from mae_jax.models.masking import num_kept, random_masking


def _tokens(n, length, d=5):
  return np.random.default_rng(0).normal(size=(n, length, d)).astype(
      np.float32)


@pytest.mark.parametrize('ratio', [0.0, 0.5, 0.75, 0.9])
def test_keeps_exact_count_and_inverse_permutation(ratio):
  n, length = 4, 49
  noise = jax.random.uniform(jax.random.key(0), (n, length))
  x_kept, mask, ids_restore = random_masking(_tokens(n, length), ratio, noise)
  keep = int(length * (1 - ratio))
  assert x_kept.shape == (n, keep, 5)
  np.testing.assert_array_equal(np.asarray(mask).sum(1), length - keep)
  ids_shuffle = np.argsort(np.asarray(noise), axis=1)
  np.testing.assert_array_equal(
      np.take_along_axis(ids_shuffle, np.asarray(ids_restore), 1),
      np.tile(np.arange(length), (n, 1)))


def test_mask_from_given_noise_matches_hand_computation():
  noise = np.array([[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.4, 0.6]], np.float32)
  x = _tokens(2, 4)
  x_kept, mask, _ = random_masking(x, 0.5, noise)
  # Smallest noise kept: sample 0 keeps patches 1, 3; sample 1 keeps 0, 2.
  np.testing.assert_array_equal(np.asarray(mask), [[1, 0, 1, 0], [0, 1, 0, 1]])
  np.testing.assert_array_equal(np.asarray(x_kept[0]), x[0, [1, 3]])
  np.testing.assert_array_equal(np.asarray(x_kept[1]), x[1, [0, 2]])


def test_masks_differ_across_samples_and_keys():
  n, length = 8, 64
  def mask_for(key):
    noise = jax.random.uniform(key, (n, length))
    return np.asarray(random_masking(_tokens(n, length), 0.75, noise)[1])
  m0, m1 = mask_for(jax.random.key(0)), mask_for(jax.random.key(1))
  assert len({row.tobytes() for row in m0}) == n
  assert not np.array_equal(m0, m1)


def test_bad_ratio_and_noise_shape():
  with pytest.raises(ValueError, match='mask_ratio=1.0'):
    num_kept(10, 1.0)
  with pytest.raises(ValueError, match='noise has shape'):
    random_masking(_tokens(2, 4), 0.5, np.zeros((4,), np.float32))
