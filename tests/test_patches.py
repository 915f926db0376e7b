import numpy as np
import pytest

from mae_jax.models.patches import patchify, unpatchify


def _loop_patchify(imgs, p):
  n, height, width, c = imgs.shape
  h, w = height // p, width // p
  out = np.zeros((n, h * w, p * p * c), imgs.dtype)
  for b in range(n):
    for i in range(h):
      for j in range(w):
        for pi in range(p):
          for qj in range(p):
            for ch in range(c):
              out[b, i * w + j, (pi * p + qj) * c + ch] = (
                  imgs[b, i * p + pi, j * p + qj, ch])
  return out


@pytest.mark.parametrize('p,height,width,chans', [
    (4, 12, 12, 3), (8, 16, 16, 3), (8, 16, 24, 1), (4, 12, 8, 2)])
def test_patchify_matches_explicit_loop(p, height, width, chans):
  imgs = np.random.default_rng(0).normal(
      size=(2, height, width, chans)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(patchify(imgs, p)),
                                _loop_patchify(imgs, p))


def test_unpatchify_inverts_patchify():
  imgs = np.random.default_rng(1).normal(size=(3, 32, 32, 3)).astype(
      np.float32)
  np.testing.assert_array_equal(np.asarray(unpatchify(patchify(imgs, 8), 8)),
                                imgs)


def test_non_square_grid_and_bad_sizes():
  imgs = np.random.default_rng(2).normal(size=(1, 16, 24, 3)).astype(
      np.float32)
  np.testing.assert_array_equal(
      np.asarray(unpatchify(patchify(imgs, 8), 8, grid=(2, 3))), imgs)
  gray = imgs[..., :1]
  np.testing.assert_array_equal(
      np.asarray(unpatchify(patchify(gray, 8), 8, grid=(2, 3), channels=1)),
      gray)
  with pytest.raises(ValueError, match='not divisible by patch_size=5'):
    patchify(imgs, 5)
