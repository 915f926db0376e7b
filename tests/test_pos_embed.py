import math

import numpy as np
import pytest

from mae_jax.models.pos_embed import resize_grid, sincos_2d


@pytest.mark.parametrize('dim,grid', [(64, 4), (768, 14), (512, 14)])
def test_table_matches_formula(dim, grid):
  table = sincos_2d(dim, grid)
  assert table.shape == (1 + grid * grid, dim)
  np.testing.assert_array_equal(table[0], 0)
  quarter = dim // 4
  rng = np.random.default_rng(0)
  for _ in range(50):
    row, col, ch = rng.integers(grid), rng.integers(grid), rng.integers(dim)
    half, within = divmod(ch, dim // 2)   # half 0: column (x), 1: row (y)
    pos = col if half == 0 else row
    fn, k = (math.sin, within) if within < quarter else (math.cos,
                                                          within - quarter)
    omega = 1.0 / 10000 ** (k / quarter)
    expected = fn(pos * omega)
    assert table[1 + row * grid + col, ch] == pytest.approx(expected, abs=1e-6)


def test_no_cls_row_option():
  assert sincos_2d(32, 3, cls_token=False).shape == (9, 32)


def test_resize_to_same_grid_is_identity():
  table = np.random.default_rng(0).normal(size=(1 + 49, 16)).astype(
      np.float32)
  np.testing.assert_array_equal(resize_grid(table, 7), table)


def test_resize_keeps_cls_row_and_constant_grid():
  table = np.ones((1 + 16, 8), np.float32)
  table[0] = 3.0
  out = resize_grid(table, 6)
  assert out.shape == (1 + 36, 8)
  np.testing.assert_array_equal(out[0], 3.0)
  # Cubic weights sum to 1, so a constant grid stays constant.
  np.testing.assert_allclose(out[1:], 1.0, atol=1e-6)


@pytest.mark.parametrize('old_grid,new_grid', [(4, (3, 5)), ((4, 6), (8, 3))])
def test_resize_to_non_square_grid_matches_torch_bicubic(old_grid, new_grid):
  import torch  # pylint: disable=import-outside-toplevel
  old_h, old_w = (old_grid, old_grid) if isinstance(old_grid, int) else old_grid
  table = np.random.default_rng(1).normal(
      size=(1 + old_h * old_w, 8)).astype(np.float32)
  out = resize_grid(table, new_grid, old_grid=old_grid)
  grid = torch.from_numpy(table[1:].reshape(1, old_h, old_w, 8)).permute(
      0, 3, 1, 2).double()
  ref = torch.nn.functional.interpolate(grid, size=new_grid, mode='bicubic',
                                        align_corners=False)
  ref = ref.permute(0, 2, 3, 1).reshape(-1, 8).numpy()
  assert out.shape == (1 + new_grid[0] * new_grid[1], 8)
  np.testing.assert_array_equal(out[0], table[0])
  np.testing.assert_allclose(out[1:], ref, rtol=0, atol=1e-5)
  with pytest.raises(ValueError, match='not a 5x5 grid'):
    resize_grid(table, new_grid, old_grid=5)
