"""Image files -> model inputs, with PIL (no TensorFlow).

`load_image` gives a float32 (H, W, C) array: resized (bicubic, aspect
kept) to the smallest size that covers `size` (an int S is (S, S): the
shorter side becomes S), center crop, per-channel normalisation (default
ImageNet RGB; one mean/std value: grayscale, PIL's 'L' conversion).
Every unreadable input raises ImageError with a one-line message naming the
file. Paths may be relative, absolute or object-store URIs
(mae_jax.paths.resolve).
"""
import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mae_jax import embedded, paths
from mae_jax.errors import ImageError
from mae_jax.models.geometry import image_hw

# ImageNet statistics of [0, 1] RGB pixels: the default mean / std.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Image files by name: the formats both PIL and the training input's decoder
# (tf.io.decode_image) read.
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp')
MAX_PIXELS = 89_478_485  # larger images are refused (PIL's MAX_IMAGE_PIXELS)
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
  """Resize (bicubic, aspect kept) so that (H, W) = image_hw(size) just
  fits (an int size: the shorter side becomes size), then the central
  H x W crop.

  Returns (image, upscaled) where upscaled says the image was enlarged.
  """
  out_h, out_w = image_hw(size)
  width, height = img.size
  scale = max(out_h / height, out_w / width)
  new = (max(out_w, round(width * scale)), max(out_h, round(height * scale)))
  img = img.resize(new, Image.BICUBIC)
  left, top = (new[0] - out_w) // 2, (new[1] - out_h) // 2
  return img.crop((left, top, left + out_w, top + out_h)), scale > 1


def normalize(pixels, mean=IMAGENET_MEAN, std=IMAGENET_STD):
  """uint8 (..., C) -> float32 normalised per channel (mean, std: C values
  each, statistics of [0, 1] pixels)."""
  return ((np.asarray(pixels, np.float32) / 255.0
           - np.asarray(mean, np.float32)) / np.asarray(std, np.float32))


def read_rgb(path):
  """Image file -> PIL 'RGB' image (any mode converted by `to_rgb`); every
  unreadable, empty or oversized file raises ImageError naming it."""
  path = os.fspath(path)
  file = paths.resolve(path)
  if not file.exists():
    raise ImageError(f'{path}: no such image file')
  if file.is_dir():
    raise ImageError(f'{path}: is a folder, not an image file')
  try:
    # sizes above MAX_PIXELS are refused below: PIL need not warn of them
    with warnings.catch_warnings(
        action='ignore', category=Image.DecompressionBombWarning), \
        file.open('rb') as f, Image.open(f) as img:
      rgb = None if img.width * img.height > MAX_PIXELS else to_rgb(img)
      size_text = f'{img.width}x{img.height}'
  except UnidentifiedImageError:
    raise ImageError(f'{path}: not an image file PIL can read') from None
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise ImageError(f'{path}: cannot decode image ({e})') from None
  if rgb is None:
    raise ImageError(f'{path}: too large: {size_text} is more than '
                     f'MAX_PIXELS={MAX_PIXELS} pixels')
  if min(rgb.size) < 1:
    raise ImageError(f'{path}: image has no pixels ({rgb.size[0]}x'
                     f'{rgb.size[1]})')
  return rgb


def load_image(path, size, warn=None, mean=IMAGENET_MEAN, std=IMAGENET_STD):
  """File -> float32 (H, W, C) normalised with mean / std; C = len(mean):
  3 is RGB, 1 grayscale (PIL 'L').

  `warn(message)` is called when the image had to be upscaled (smaller than
  the model input).
  """
  rgb = read_rgb(path)
  original = rgb.size
  if len(mean) == 1:  # grayscale before resizing, as mae_jax.data does
    rgb = rgb.convert('L')
  img, upscaled = resize_crop(rgb, size)
  if upscaled and warn is not None:
    height, width = image_hw(size)
    warn(f'{os.fspath(path)}: {original[0]}x{original[1]} is smaller than '
         f'the model input {width}x{height}; upscaled (bicubic)')
  pixels = np.asarray(img)
  return normalize(pixels[..., None] if pixels.ndim == 2 else pixels, mean,
                   std)


def resolve(path):
  """Image file paths for an image file, a folder, or None (the embedded
  default image)."""
  return [default_image()] if path is None else image_paths(path)


def load_images(paths, size, warn=None, mean=IMAGENET_MEAN,
                std=IMAGENET_STD):
  """(names, float32 (N, H, W, C)) for a list of image files (see
  load_image)."""
  arrays = [load_image(p, size, warn, mean, std) for p in paths]
  return [os.path.basename(p) for p in paths], np.stack(arrays)
