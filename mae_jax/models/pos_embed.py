"""Fixed 2D sin-cos position tables and their bicubic resampling.

Tables are NumPy float32 constants: they never become trainable parameters.
"""
import numpy as np


def sincos_1d(dim, positions):
  """(M,) positions -> (M, dim) table laid out as [sin(pos*w), cos(pos*w)]."""
  if dim % 2:
    raise ValueError(f'1D sin-cos width {dim} must be even')
  omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
  omega = 1.0 / 10000 ** omega
  out = np.outer(positions.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def _grid_pair(grid_size):
  """int g -> (g, g); an (gh, gw) pair -> itself as a tuple of ints."""
  if isinstance(grid_size, (tuple, list)):
    gh, gw = grid_size
    return int(gh), int(gw)
  return int(grid_size), int(grid_size)


def sincos_2d(dim, grid_size, cls_token=True):
  """Table of shape (1 + gh*gw, dim) (or (gh*gw, dim) without cls_token).

  grid_size is g (a g x g grid) or (gh, gw): gh rows, gw columns. Positions
  run in raster (row-major) order. As in the official MAE code, the first
  dim/2 channels encode the column (x, width) index 0..gw-1 and the last
  dim/2 the row (y, height) index 0..gh-1; each half is [sin, cos] of the
  coordinate times dim/4 frequencies. The cls row is zero.
  """
  if dim % 4:
    raise ValueError(f'2D sin-cos width {dim} must be a multiple of 4')
  gh, gw = _grid_pair(grid_size)
  rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing='ij')
  table = np.concatenate(
      [sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)
  if cls_token:
    table = np.concatenate([np.zeros((1, dim)), table], axis=0)
  return table.astype(np.float32)


def _cubic_weights(in_size, out_size, a=-0.75):
  """(out, in) matrix of bicubic resampling, align_corners=False, edge clamp.

  Uses the cubic-convolution kernel with a = -0.75, as PyTorch's bicubic.
  """
  scale = in_size / out_size
  weights = np.zeros((out_size, in_size), np.float64)
  for o in range(out_size):
    src = (o + 0.5) * scale - 0.5
    i0 = int(np.floor(src))
    t = src - i0
    for k, dist in zip(range(-1, 3), (1 + t, t, 1 - t, 2 - t)):
      if dist <= 1:
        w = ((a + 2) * dist - (a + 3)) * dist * dist + 1
      else:
        w = ((a * dist - 5 * a) * dist + 8 * a) * dist - 4 * a
      weights[o, min(max(i0 + k, 0), in_size - 1)] += w
  return weights


def resize_grid(table, new_grid, num_extra_tokens=1, old_grid=None):
  """Resamples a (extra + gh*gw, D) position table to the grid `new_grid`
  (g or (gh, gw)); the old grid is `old_grid` (g or (gh, gw)), by default the
  square one the row count gives.

  The extra (cls) rows are kept unchanged; the grid part is resampled
  bicubically (align_corners=False), matching torch.nn.functional.interpolate.
  """
  table = np.asarray(table)
  extra, grid_part = table[:num_extra_tokens], table[num_extra_tokens:]
  if old_grid is None:
    side = int(round(grid_part.shape[0] ** 0.5))
    if side * side != grid_part.shape[0]:
      raise ValueError(f'position table with {grid_part.shape[0]} grid rows '
                       'is not a square grid; pass old_grid=(gh, gw)')
    old_grid = side
  old_h, old_w = _grid_pair(old_grid)
  new_h, new_w = _grid_pair(new_grid)
  if old_h * old_w != grid_part.shape[0]:
    raise ValueError(f'position table with {grid_part.shape[0]} grid rows is '
                     f'not a {old_h}x{old_w} grid')
  if (old_h, old_w) == (new_h, new_w):
    return table.copy()
  grid = grid_part.reshape(old_h, old_w, -1).astype(np.float64)
  grid = np.einsum('ai,ijd,bj->abd', _cubic_weights(old_h, new_h), grid,
                   _cubic_weights(old_w, new_w))
  grid = grid.reshape(new_h * new_w, -1).astype(table.dtype)
  return np.concatenate([extra, grid], axis=0)
