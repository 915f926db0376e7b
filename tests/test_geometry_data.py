"""Input pipeline and configs for (H, W) images, grayscale or RGB, with
per-channel data.mean / data.std."""
import json
import re

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from configs import finetune, pretrain
from mae_jax import images, schema
from mae_jax.data import augment, pipeline
from mae_jax.errors import ConfigError
from tests import helpers

COLOUR = (200, 100, 50)
SIZE = (64, 48)  # H, W


def _constant_folder(tmp_path):
  """DIR/train/a/ with two PNGs of one colour (120x80 and 50x90 pixels)."""
  folder = tmp_path / 'train' / 'a'
  folder.mkdir(parents=True)
  for name, (w, h) in (('x.png', (80, 120)), ('y.png', (90, 50))):
    Image.new('RGB', (w, h), COLOUR).save(folder / name)
  return tmp_path


@pytest.mark.parametrize('channels, mean, std', [
    (3, (0.1, 0.2, 0.3), (0.5, 0.25, 0.125)),
    (1, (0.25,), (0.5,)),
])
@pytest.mark.parametrize('augment_name', ['pretrain', 'linprobe', None])
def test_batches_have_the_configured_shape_and_statistics(
    tmp_path, channels, mean, std, augment_name):
  cfg = schema.config('pretrain', data=dict(
      name='folder', data_dir=str(_constant_folder(tmp_path)),
      image_size=SIZE, channels=channels, mean=mean, std=std,
      augment=augment_name or 'pretrain')).data
  train = augment_name is not None  # None: the eval resize + center crop
  batch = next(pipeline.make_iterator(cfg, 2, seed=0, train=train))
  assert batch['image'].shape == (2, *SIZE, channels)
  pixel = Image.new('RGB', (1, 1), COLOUR)
  if channels == 1:
    pixel = pixel.convert('L')  # PIL's grayscale, as the pipeline's
  pixel = np.asarray(pixel, np.float32).reshape(channels)
  want = (pixel / 255 - np.array(mean)) / np.array(std)
  np.testing.assert_allclose(batch['image'],
                             np.broadcast_to(want, batch['image'].shape),
                             atol=1e-5)


def test_grayscale_conversion_is_pil_l():
  rgb = np.random.default_rng(0).integers(0, 256, (17, 23, 3), np.uint8)
  got = augment.to_channels(tf.constant(rgb), 1).numpy()
  want = np.asarray(Image.fromarray(rgb).convert('L'))
  assert got.dtype == np.uint8
  np.testing.assert_array_equal(got[..., 0], want)


def test_non_square_eval_resizes_so_the_crop_fits_then_center_crops():
  """(H, W) = (64, 48) from 300x400 (h x w): int(64 / 0.875) = 73 and
  int(48 / 0.875) = 54 must fit; the height binds (73 / 300 > 54 / 400), so
  the image is resized to 73 x floor(73 * 400 / 300) = 73 x 97 (PIL
  bicubic) and its central 64 x 48 kept."""
  image = np.random.default_rng(1).integers(0, 256, (300, 400, 3), np.uint8)
  out = augment.eval_transform(image, SIZE, mean=(0, 0, 0), std=(1, 1, 1))
  resized = np.asarray(Image.fromarray(image).resize((97, 73), Image.BICUBIC))
  top, left = round((73 - 64) / 2), round((97 - 48) / 2)
  want = resized[top:top + 64, left:left + 48] / np.float32(255)
  np.testing.assert_array_equal(out.numpy(), want.astype(np.float32))


@pytest.mark.parametrize('name', augment.TRAIN_AUGMENTS)
def test_non_square_training_crops_have_the_configured_size(name):
  image = np.random.default_rng(2).integers(0, 256, (90, 70, 3), np.uint8)
  key = augment.example_key(0, 0, 3)
  out = augment.get_train_transform(name)(image, key, SIZE, (0.5,), (0.5,))
  assert out.shape == (*SIZE, 1)


def test_default_batch_is_the_imagenet_normalisation_of_the_same_crop():
  """The default config normalises with the ImageNet RGB statistics, bit for
  bit as (x / 255 - mean) / std of the crop the pipeline makes."""
  data = pretrain.get_config('tiny').data
  assert (data.image_size, data.channels) == (64, 3)
  default = next(pipeline.make_iterator(data, 4, seed=0))['image']
  raw_cfg = dict(data.to_dict(), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
  raw = next(pipeline.make_iterator(raw_cfg, 4, seed=0))['image']  # x / 255
  imagenet = ((raw - np.array([0.485, 0.456, 0.406], np.float32))
              / np.array([0.229, 0.224, 0.225], np.float32))
  np.testing.assert_array_equal(default, imagenet)


@pytest.mark.parametrize('field, value, message', [
    ('image_size', (64, 44), 'config.data.image_size=(64, 44) is not a '
     'multiple of the patch size 8'),
    ('image_size', 'abc', "config.data.image_size='abc' must be a positive"),
    ('channels', 2, 'config.data.channels=2 is not supported'),
    ('mean', (0.5,),
     'config.data.mean=(0.5,) must hold config.data.channels=3'),
    ('std', (1.0, 1.0, 0.0), 'config.data.std=(1.0, 1.0, 0.0) must be '
     'positive'),
])
def test_bad_image_fields_are_named(field, value, message):
  for config in (pretrain.get_config('tiny'), finetune.get_config('tiny')):
    config.data[field] = value
    with pytest.raises(ConfigError, match='^' + re.escape(message)):
      schema.check(config)


def test_non_square_grayscale_mae_trains_from_the_command_line(tmp_path):
  """tiny with --config.data.image_size=(64,48) and one channel: 20 updates
  on the embedded photos, the loss falls and a figure is written."""
  out = helpers.train(
      tmp_path, tmp_path / 'w', '--config.data.image_size=(64,48)',
      '--config.data.channels=1', '--config.data.mean=(0.5,)',
      '--config.data.std=(0.25,)', '--config.total_steps=20',
      '--config.log_every_steps=5', '--config.warmup_steps=5',
      '--config.checkpoint_every_steps=20')
  assert out.returncode == 0, out.stderr[-2000:]
  records = [json.loads(line) for line in
             (tmp_path / 'w' / 'metrics.jsonl').read_text().splitlines()]
  losses = [r['loss'] for r in records if 'loss' in r]
  assert len(losses) == 4
  assert losses[-1] < 0.8 * losses[0], losses
  assert (tmp_path / 'w' / 'figures' / 'step_0000020.png').is_file()


def test_load_image_gives_non_square_grayscale_model_inputs(tmp_path):
  """mae_jax.images (the PIL path of figures from image files): a 90x50
  (w x h) file for a (64, 48) input is scaled by max(64 / 50, 48 / 90) to
  115x64 and center-cropped; one mean/std value gives PIL's grayscale."""
  path = tmp_path / 'c.png'
  rgb = np.random.default_rng(3).integers(0, 256, (50, 90, 3), np.uint8)
  Image.fromarray(rgb).save(path)
  warnings = []
  got = images.load_image(path, SIZE, warnings.append, (0.5,), (0.25,))
  gray = Image.fromarray(rgb).convert('L').resize((115, 64), Image.BICUBIC)
  left = (115 - 48) // 2
  want = np.asarray(gray, np.float32)[:, left:left + 48, None]
  np.testing.assert_allclose(got, (want / 255 - 0.5) / 0.25, atol=1e-6)
  assert warnings == [f'{path}: 90x50 is smaller than the model input 48x64; '
                      'upscaled (bicubic)']
