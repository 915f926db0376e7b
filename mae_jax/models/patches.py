"""Patch vectors in the reference layout.

A patch vector has length p*p*C, ordered (row-in-patch p, column-in-patch q,
channel c); patches follow row-major order over the h x w grid, L = h*w.
"""
import jax.numpy as jnp


def patchify(imgs, patch_size):
  """(N, H, W, C) images -> (N, L, p*p*C) patch vectors."""
  n, height, width, c = imgs.shape
  p = patch_size
  if height % p or width % p:
    raise ValueError(
        f'image size {height}x{width} is not divisible by patch_size={p}')
  h, w = height // p, width // p
  x = imgs.reshape(n, h, p, w, p, c)
  x = jnp.transpose(x, (0, 1, 3, 2, 4, 5))  # (N, h, w, p, q, c)
  return x.reshape(n, h * w, p * p * c)


def unpatchify(x, patch_size, grid=None, channels=3):
  """(N, L, p*p*C) patch vectors -> (N, H, W, C) images.

  `grid` is (h, w) in patches; by default the grid is square, h = w = sqrt(L).
  """
  n, length, dim = x.shape
  p = patch_size
  if dim != p * p * channels:
    raise ValueError(f'patch vectors of length {dim} do not match '
                     f'patch_size={p} with {channels} channels')
  if grid is None:
    h = w = int(round(length ** 0.5))
  else:
    h, w = grid
  if h * w != length:
    raise ValueError(f'{length} patches do not form a {h}x{w} grid')
  x = x.reshape(n, h, w, p, p, channels)
  x = jnp.transpose(x, (0, 1, 3, 2, 4, 5))  # (N, h, p, w, q, c)
  return x.reshape(n, h * p, w * p, channels)
