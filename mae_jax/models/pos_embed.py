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


def sincos_2d(dim, grid_size, cls_token=True):
  """Table of shape (1 + g*g, dim) (or (g*g, dim) without cls_token).

  Row-major positions; the first dim/2 channels encode the column (x) index,
  the last dim/2 the row (y) index; the cls row is zero.
  """
  if dim % 4:
    raise ValueError(f'2D sin-cos width {dim} must be a multiple of 4')
  rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size),
                           indexing='ij')
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


def resize_grid(table, new_grid, num_extra_tokens=1):
  """Resamples a (extra + g*g, D) position table to a new_grid x new_grid grid.

  The extra (cls) rows are kept unchanged; the grid part is resampled
  bicubically (align_corners=False), matching torch.nn.functional.interpolate.
  """
  table = np.asarray(table)
  extra, grid_part = table[:num_extra_tokens], table[num_extra_tokens:]
  old_grid = int(round(grid_part.shape[0] ** 0.5))
  if old_grid * old_grid != grid_part.shape[0]:
    raise ValueError(f'position table with {grid_part.shape[0]} grid rows is '
                     'not a square grid')
  if old_grid == new_grid:
    return table.copy()
  w = _cubic_weights(old_grid, new_grid)
  grid = grid_part.reshape(old_grid, old_grid, -1).astype(np.float64)
  grid = np.einsum('ai,ijd,bj->abd', w, grid, w)
  grid = grid.reshape(new_grid * new_grid, -1).astype(table.dtype)
  return np.concatenate([extra, grid], axis=0)
