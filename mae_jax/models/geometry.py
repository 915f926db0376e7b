"""Input geometry shared by the models: image size, patch grid, token maps.

`img_size` is an int (square images) or an (H, W) pair; a list, as a JSON
round trip returns it, is accepted too. The patch grid is gh x gw with
gh = H / p rows and gw = W / p columns; tokens run in raster (row-major)
order over it, so token k sits at row k // gw, column k % gw.
"""
import numbers


def normalize_img_size(img_size):
  """An int stays an int; a list or tuple of two ints becomes a tuple.

  Raises ValueError naming the value for anything else.
  """
  if isinstance(img_size, (list, tuple)):
    if len(img_size) != 2 or not all(_is_int(v) for v in img_size):
      raise ValueError(f'img_size={img_size!r} must be an int or an (H, W) '
                       'pair of ints')
    return tuple(int(v) for v in img_size)
  if not _is_int(img_size):
    raise ValueError(f'img_size={img_size!r} must be an int or an (H, W) '
                     'pair of ints')
  return int(img_size)


def _is_int(v):
  return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0


def image_hw(img_size):
  """(H, W) of an int or (H, W) img_size."""
  size = normalize_img_size(img_size)
  return size if isinstance(size, tuple) else (size, size)


def grid_hw(img_size, patch_size):
  """(gh, gw) patch grid; ValueError when a side is not a multiple of p."""
  height, width = image_hw(img_size)
  if height % patch_size or width % patch_size:
    raise ValueError(f'img_size={img_size!r} is not divisible by '
                     f'patch_size={patch_size}')
  return height // patch_size, width // patch_size


def model_input_shape(model):
  """(H, W, C) of the NHWC images `model` takes (MAE or ViT classifier)."""
  return image_hw(model.img_size) + (model.in_chans,)


def token_map(tokens, grid_size):
  """(N, 1 + gh*gw, D) tokens, cls first -> (N, gh, gw, D) map of the patch
  tokens (the cls token is dropped); grid_size is (gh, gw)."""
  gh, gw = grid_size
  n, length, dim = tokens.shape
  if length != 1 + gh * gw:
    raise ValueError(f'{length} tokens are not a cls token plus a {gh}x{gw} '
                     'grid')
  return tokens[:, 1:].reshape(n, gh, gw, dim)
