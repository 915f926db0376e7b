"""Image files -> model inputs, with PIL (no TensorFlow).

`load_image` gives a float32 (size, size, 3) array: RGB, shorter side resized
to `size` (bicubic), center crop, ImageNet normalisation. Every unreadable
input raises ImageError with a one-line message naming the file. Paths may
be relative, absolute or object-store URIs (mae_jax.paths.resolve).
"""
import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mae_jax import embedded, paths
from mae_jax.errors import ImageError

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.tif', '.tiff',
                    '.webp')
DEFAULT_IMAGE = 'chelsea.png'  # the embedded photo used without --image


def default_image():
  """Path (str) of DEFAULT_IMAGE inside the installed scikit-image."""
  return next(p for p in embedded.embedded_paths()
              if os.path.basename(p) == DEFAULT_IMAGE)


def image_paths(path):
  """[path] for a file; the sorted image files (by extension) of a folder,
  each named as `path` joined with its file name."""
  shown = os.fspath(path)
  folder = paths.resolve(path)
  if not folder.exists():
    raise ImageError(f'{shown}: no such image file or folder')
  if not folder.is_dir():
    return [shown]
  files = sorted(os.path.join(shown, f.name) for f in folder.iterdir()
                 if f.name.lower().endswith(IMAGE_EXTENSIONS)
                 and f.is_file())
  if not files:
    raise ImageError(f'{shown}: folder holds no image files '
                     f'({", ".join(IMAGE_EXTENSIONS)})')
  return files


def to_rgb(img):
  """Any PIL mode -> 'RGB'. Transparent pixels go on white; 16-bit and float
  grayscale are scaled by their maximum."""
  img = ImageOps.exif_transpose(img)
  if img.mode in ('I', 'I;16', 'I;16B', 'I;16L', 'F'):
    arr = np.asarray(img, np.float32)
    top = float(arr.max()) if arr.size and arr.max() > 0 else 1.0
    img = Image.fromarray((arr / top * 255).round().astype(np.uint8), 'L')
  if img.mode == 'P':
    img = img.convert('RGBA' if 'transparency' in img.info else 'RGB')
  if img.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La'):
    rgba = img.convert('RGBA')
    white = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
    img = Image.alpha_composite(white, rgba)
  return img.convert('RGB')


def resize_crop(img, size):
  """Shorter side to `size` (bicubic), then the central size x size crop.

  Returns (image, upscaled) where upscaled says the shorter side was smaller
  than `size`.
  """
  width, height = img.size
  scale = size / min(width, height)
  new = (max(size, round(width * scale)), max(size, round(height * scale)))
  img = img.resize(new, Image.BICUBIC)
  left, top = (new[0] - size) // 2, (new[1] - size) // 2
  return img.crop((left, top, left + size, top + size)), scale > 1


def normalize(rgb):
  """uint8 (..., 3) -> float32 ImageNet-normalised."""
  return (np.asarray(rgb, np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD


def load_image(path, size, warn=None):
  """File -> float32 (size, size, 3), ImageNet-normalised.

  `warn(message)` is called when the image had to be upscaled (smaller than
  the model input).
  """
  path = os.fspath(path)
  file = paths.resolve(path)
  if not file.exists():
    raise ImageError(f'{path}: no such image file')
  if file.is_dir():
    raise ImageError(f'{path}: is a folder, not an image file')
  try:
    with file.open('rb') as f, Image.open(f) as img:
      img.load()
      rgb = to_rgb(img)
  except UnidentifiedImageError:
    raise ImageError(f'{path}: not an image file PIL can read') from None
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise ImageError(f'{path}: cannot decode image ({e})') from None
  if min(rgb.size) < 1:
    raise ImageError(f'{path}: image has no pixels ({rgb.size[0]}x'
                     f'{rgb.size[1]})')
  original = rgb.size
  rgb, upscaled = resize_crop(rgb, size)
  if upscaled and warn is not None:
    warn(f'{path}: {original[0]}x{original[1]} is smaller than the model '
         f'input {size}x{size}; upscaled (bicubic)')
  return normalize(rgb)


def resolve(path):
  """Image file paths for an image file, a folder, or None (the embedded
  default image)."""
  return [default_image()] if path is None else image_paths(path)


def load_images(paths, size, warn=None):
  """(names, float32 (N, size, size, 3)) for a list of image files."""
  arrays = [load_image(p, size, warn) for p in paths]
  return [os.path.basename(p) for p in paths], np.stack(arrays)
