"""The default image set: photographs shipped inside scikit-image.

TensorFlow-free, so the visualisation tools can use it without the data
pipeline. scikit-image is imported only to locate its data folder; without it
the error names the install extra that brings it.
"""
import importlib.resources

from mae_jax import extras

# Photographs shipped inside the scikit-image wheel (no download needed);
# synthetic images (chessboard, color, logo, phantom, horse) are left out.
EMBEDDED_FILES = (
    'astronaut.png', 'brick.png', 'camera.png', 'cell.png', 'chelsea.png',
    'clock_motion.png', 'coffee.png', 'coins.png', 'grass.png', 'gravel.png',
    'hubble_deep_field.jpg', 'ihc.png', 'microaneurysms.png', 'moon.png',
    'motorcycle_left.png', 'motorcycle_right.png', 'page.png', 'retina.jpg',
    'rocket.jpg', 'text.png')


def embedded_folder():
  """The installed scikit-image `data` folder (a Traversable)."""
  skimage = extras.require('skimage', 'viz', 'the embedded sample photos')
  return importlib.resources.files(skimage) / 'data'


def embedded_paths():
  """Paths (str) of EMBEDDED_FILES inside the installed scikit-image.

  Raises FileNotFoundError naming the first file that is missing.
  """
  folder = embedded_folder()
  paths = []
  for name in EMBEDDED_FILES:
    path = folder / name
    if not path.is_file():
      raise FileNotFoundError(f'embedded image {str(path)!r} is missing from '
                              'the installed scikit-image')
    paths.append(str(path))
  return paths
