"""Input pipeline throughput: JPEG decode + pretraining RandomResizedCrop + flip.

Encodes ~64 ImageNet-like JPEGs (500x375 .. 640x480, quality 90) from the
photos bundled with scikit-image, then times a single-threaded tf.data
pipeline (one private thread, map num_parallel_calls=1) and reports images/s
per CPU core as one JSON line (median of --runs timed passes after a warm-up).

  python benchmarks/input_pipeline.py [--images 64] [--passes 4] [--runs 3]
      [--size 224] [--out FILE] [--profile]

--profile also times decode alone and decode + crop without the resize.
"""
import argparse
import datetime
import importlib.resources
import io
import json
import platform
import statistics
import time

import numpy as np
from PIL import Image
import tensorflow as tf

from mae_jax.data import augment

PHOTOS = ('astronaut.png', 'chelsea.png', 'coffee.png', 'rocket.jpg',
          'motorcycle_left.png', 'motorcycle_right.png', 'brick.png',
          'grass.png', 'gravel.png', 'hubble_deep_field.jpg', 'retina.jpg',
          'ihc.png', 'camera.png', 'clock_motion.png', 'coins.png', 'page.png')
SIZES = ((500, 375), (500, 333), (640, 480), (500, 400), (375, 500),
         (600, 450), (640, 427), (333, 500))  # (width, height) in pixels


def make_jpegs(n):
  """n JPEG byte strings (quality 90): photo crops resized to SIZES."""
  folder = importlib.resources.files('skimage') / 'data'
  out = []
  for i in range(n):
    photo = Image.open(folder / PHOTOS[i % len(PHOTOS)]).convert('RGB')
    width, height = SIZES[i % len(SIZES)]
    # Crop the photo to the target aspect, then resize to the target size.
    pw, ph = photo.size
    scale = min(pw / width, ph / height)
    cw, ch = int(width * scale), int(height * scale)
    left, top = (pw - cw) // 2, (ph - ch) // 2
    photo = photo.crop((left, top, left + cw, top + ch))
    photo = photo.resize((width, height), Image.BICUBIC)
    buf = io.BytesIO()
    photo.save(buf, format='JPEG', quality=90)
    out.append(buf.getvalue())
  return out


def _pipelines(size):
  """name -> per-example fn(encoded bytes, key) of the stages timed."""
  def decode(data, key):
    del key
    return augment.decode_image(data)

  def decode_crop(data, key):
    image = augment.decode_image(data)
    shape = tf.shape(image)
    top, left, h, w = augment.sample_crop_box(key, shape[0], shape[1])
    return image[top:top + h, left:left + w]

  def pretrain(data, key):
    return augment.train_transform(augment.decode_image(data), key, size)

  def pretrain_jpeg(data, key):
    return augment.train_transform_jpeg(data, key, size)

  return dict(decode=decode, decode_crop=decode_crop, pretrain=pretrain,
              pretrain_jpeg=pretrain_jpeg)


def measure(jpegs, fn, passes, runs):
  """Median images/s of `runs` timed passes (each `passes` x the files)."""
  ds = tf.data.Dataset.from_tensor_slices(tf.constant(jpegs)).repeat(passes)
  ds = ds.enumerate().map(
      lambda i, data: fn(data, augment.example_key(0, 0, i)),
      num_parallel_calls=1, deterministic=True)
  options = tf.data.Options()
  options.threading.private_threadpool_size = 1
  options.threading.max_intra_op_parallelism = 1
  ds = ds.with_options(options)

  def one_pass():
    start = time.perf_counter()
    count = 0
    for _ in ds:
      count += 1
    return count / (time.perf_counter() - start)

  one_pass()  # warm-up: tracing and first decodes
  return statistics.median(one_pass() for _ in range(runs))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--images', type=int, default=64)
  parser.add_argument('--passes', type=int, default=4)
  parser.add_argument('--runs', type=int, default=3)
  parser.add_argument('--size', type=int, default=224)
  parser.add_argument('--out', default=None, help='append the JSON line here')
  parser.add_argument('--profile', action='store_true')
  args = parser.parse_args()
  jpegs = make_jpegs(args.images)
  stages = _pipelines(args.size)
  names = list(stages) if args.profile else ['pretrain', 'pretrain_jpeg']
  result = dict(
      benchmark='input_pipeline', images=args.images, size=args.size,
      mean_jpeg_kib=round(np.mean([len(j) for j in jpegs]) / 1024, 1),
      threads=1, machine=platform.processor() or platform.machine(),
      date=datetime.date.today().isoformat(), tf=tf.__version__)
  for name in names:
    result[f'{name}_img_per_s_per_core'] = round(
        measure(jpegs, stages[name], args.passes, args.runs), 1)
  line = json.dumps(result)
  print(line)
  if args.out:
    with open(args.out, 'a') as f:
      f.write(line + '\n')


if __name__ == '__main__':
  main()
