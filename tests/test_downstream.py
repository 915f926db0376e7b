"""The embedded labelled task (20 photographs, label = photo; a held-out
validation split that shares no pixel with training), fine-tuning and linear
probing end to end on it, and evaluation of a saved classifier.

Pretrained-versus-random accuracies are measured on the digits instead
(tests/test_downstream_digits.py, benchmarks/downstream_check.py,
docs/DOWNSTREAM.md): on this task the two differ by less than the noise of
60 evaluation crops, so no margin can be asserted.
"""
import numpy as np
import pytest

from configs import finetune, linprobe
from mae_jax.train import classify

tf = pytest.importorskip('tensorflow')
from mae_jax.data import sources  # noqa: E402

N = len(sources.EMBEDDED_FILES)
TILES = sources.EMBEDDED_EVAL_TILES
SHORT = dict(total_steps=4, warmup_steps=1, eval_every_steps=4,
             log_every_steps=2, checkpoint_every_steps=4, batch_size=16)


def _boxes(height, width, split):
  return [tuple(int(v) for v in box)
          for box in sources.embedded_boxes(height, width, split)]


def _mask(height, width, boxes):
  """Per-pixel count of the boxes covering it."""
  mask = np.zeros((height, width), np.int32)
  for top, left, h, w in boxes:
    assert h > 0 and w > 0 and top >= 0 and left >= 0
    assert top + h <= height and left + w <= width
    mask[top:top + h, left:left + w] += 1
  return mask


@pytest.mark.parametrize('shape', [(512, 512), (300, 451), (660, 550),
                                   (102, 102), (172, 448), (7, 5)])
def test_validation_tiles_share_no_pixel_with_training(shape):
  train = _mask(*shape, _boxes(*shape, 'train'))
  validation = _mask(*shape, _boxes(*shape, 'validation'))
  assert len(_boxes(*shape, 'validation')) == TILES
  assert validation.max() == 1          # the tiles do not overlap either
  assert not np.any(train & validation)
  assert np.all(train + validation == 1)  # together: the whole photo
  assert validation.sum() < train.sum()
  assert _boxes(*shape, 'all') == [(0, 0, *shape)]


def test_embedded_splits_are_crops_of_the_photos():
  whole = sources.embedded(repeats=1)
  train = sources.embedded(repeats=1, split='train')
  validation = sources.embedded(repeats=1, split='validation')
  assert (whole.num_examples, train.num_examples) == (N, N)
  assert validation.num_examples == N * TILES
  assert whole.num_classes == train.num_classes == validation.num_classes == N
  for k in (0, 3, 4, N - 1):  # square, tall, wide and wide photos
    photo, label = whole.load(tf.constant(k, tf.int64))
    photo = photo.numpy()
    boxes = {split: _boxes(*photo.shape[:2], split)
             for split in ('train', 'validation')}
    image, train_label = train.load(tf.constant(k, tf.int64))
    top, left, h, w = boxes['train'][0]
    np.testing.assert_array_equal(image, photo[top:top + h, left:left + w])
    assert int(label) == int(train_label) == k
    for t, (top, left, h, w) in enumerate(boxes['validation']):
      image, tile_label = validation.load(tf.constant(k * TILES + t,
                                                      tf.int64))
      np.testing.assert_array_equal(image, photo[top:top + h, left:left + w])
      assert int(tile_label) == k


@pytest.mark.parametrize('module', [finetune, linprobe])
def test_short_run_then_eval_only_reproduces_accuracy(module, tmp_path):
  config = module.get_config('tiny')
  assert (config.data.split, config.data.eval_split) == ('train',
                                                         'validation')
  config.update_from_flattened_dict(SHORT)
  result = classify.train(config, str(tmp_path / 'run'))
  assert result['count'] == N * TILES and 0 <= result['top1'] <= result['top5']
  if module is finetune:   # a classifier directory initialises a new run
    again = module.get_config('tiny')
    again.update_from_flattened_dict(dict(SHORT, eval_only=True))
    again.init_from = str(tmp_path / 'run')
    assert classify.train(again, str(tmp_path / 'eval')) == result
