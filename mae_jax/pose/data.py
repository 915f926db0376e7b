"""Top-down pose data: the person instances of a COCO-format keypoint set
as deterministic, process-sharded NumPy batches (no TensorFlow).

Sources (config.data.name): 'synthetic', the generated keypoint set of
mae_jax.pose.synthetic (written at first use); 'coco', a directory in the
COCO layout, DIR/annotations/person_keypoints_<split>.json and
DIR/<split>/ images.

Training (`train_batches`): micro-batch m holds the examples at positions
[m * B, (m + 1) * B) of an endless stream that visits the instances in a
new permutation every epoch (from (seed, epoch)); example j of micro-batch
m is augmented with the generator of (seed, m, j). Each process reads and
transforms only its own B / P examples, so a run is the same under any
process count and resumes bit for bit from any micro-batch. An unreadable
image is skipped (replaced by the next instance of the epoch, with a
warning) or fails the run (data.on_error).

Evaluation (`eval_batches`): every instance once, in order, padded to
whole batches with 'valid' False.
"""
import concurrent.futures
import functools
import os
import warnings

import numpy as np

from mae_jax import images as images_lib, paths
from mae_jax.errors import DataError, ImageError
from mae_jax.pose import augment, coco, synthetic, targets, topdown

_WORKERS = min(8, os.cpu_count() or 1)


def split_files(data, split):
  """(annotation JSON path, image directory) of `split` of config.data."""
  if data.name == 'synthetic':
    files = synthetic.ensure(data.data_dir)
    if split not in files:
      raise DataError(f'config.data split {split!r} is not a split of the '
                      f'synthetic keypoint set; allowed: {", ".join(files)}')
    return tuple(os.fspath(p) for p in files[split])
  root = paths.resolve(data.data_dir)
  return (os.fspath(root / 'annotations' / f'person_keypoints_{split}.json'),
          os.fspath(root / split))


def training_instances(data):
  """The person instances of config.data.split used for training."""
  return coco.load_gt_instances(*split_files(data, data.split))


def eval_instances(data):
  """(annotation JSON, instances) of config.data.eval_split: its ground-truth
  boxes, or config.data.detections' boxes above the score threshold."""
  annotations, image_dir = split_files(data, data.eval_split)
  if data.detections:
    return annotations, coco.load_detections(
        data.detections, annotations, image_dir, data.det_score_threshold)
  return annotations, coco.load_gt_instances(annotations, image_dir)


@functools.lru_cache(maxsize=1024)
def _read(path):
  return np.asarray(images_lib.read_rgb(path))


def read_image(path, on_error, warn=None):
  """(H, W, 3) uint8 image, or None when it cannot be read and on_error is
  'skip' (`warn` is told); with 'fail' the ImageError propagates."""
  try:
    return _read(os.fspath(path))
  except ImageError as e:
    if on_error == 'fail':
      raise
    (warn or warnings.warn)(f'skipped: {e}')
    return None


def _permutation(seed, epoch, count):
  return np.random.default_rng([seed, epoch]).permutation(count)


def _train_example(instance, image, rng, data, input_hw, heatmap_hw, sigma):
  """(input, heatmaps, target weight) of one instance; data.augment 'none'
  is the evaluation crop (every augmentation off)."""
  on = data.augment != 'none'
  sample = augment.train_sample(
      image, instance.keypoints, instance.box, rng, input_hw=input_hw,
      flip_prob=data.flip_prob * on, half_body_prob=data.half_body_prob * on,
      half_body_joints=data.half_body_joints,
      scale_factor=data.scale_factor * on, rot_factor=data.rot_factor * on,
      mean=data.mean, std=data.std)
  heatmaps, weight = targets.udp_heatmaps(
      sample['joints'], sample['visible'], input_hw, heatmap_hw, sigma)
  return sample['image'], heatmaps, weight


def _eval_crop(instance, image, data, input_hw):
  """The evaluation crop of the instance."""
  inputs, _, _ = topdown.model_inputs(image, instance.box[None], input_hw,
                                      data.mean, data.std)
  return inputs[0]


def train_batches(instances, data, input_hw, heatmap_hw, sigma, batch_size,
                  seed, start_micro, process_index=0, process_count=1):
  """Endless iterator of process-local training micro-batches from
  micro-batch `start_micro`: {'image' (b, H, W, 3) float32, 'target'
  (b, h, w, K) float32, 'target_weight' (b, K) float32}, b = batch_size /
  process_count. See the module docstring for the order and the draws."""
  count = len(instances)
  if not count:
    raise DataError('the training split holds no person instances with '
                    'keypoints')
  local = batch_size // process_count
  perms = {}

  def instance_at(position):
    epoch, offset = divmod(position, count)
    if epoch not in perms:
      perms.clear()
      perms[epoch] = _permutation(seed, epoch, count)
    return instances[perms[epoch][offset]]

  def example(micro, j):
    position = micro * batch_size + j
    rng = np.random.default_rng([seed, micro, j])
    for tries in range(count):
      instance = instance_at(position + tries)
      image = read_image(instance.file_name, data.on_error)
      if image is not None:
        break
    else:
      raise DataError('no image of the training split could be read')
    return _train_example(instance, image, rng, data, input_hw, heatmap_hw,
                          sigma)

  with concurrent.futures.ThreadPoolExecutor(_WORKERS) as pool:
    micro = start_micro
    while True:
      first = process_index * local
      rows = list(pool.map(lambda j, m=micro: example(m, j),
                           range(first, first + local)))
      yield {'image': np.stack([r[0] for r in rows]),
             'target': np.stack([r[1] for r in rows]),
             'target_weight': np.stack([r[2] for r in rows])}
      micro += 1


def eval_batches(instances, data, input_hw, batch_size, process_index=0,
                 process_count=1):
  """Process-local evaluation batches over every instance once, in order:
  {'image' (b, H, W, 3), 'index' (b,) int32 instance index (-1 padding),
  'valid' (b,) bool}. An unreadable image counts as invalid (skip) or
  fails (data.on_error)."""
  local = batch_size // process_count
  with concurrent.futures.ThreadPoolExecutor(_WORKERS) as pool:
    for start in range(0, len(instances), batch_size):
      ids = [start + process_index * local + j for j in range(local)]

      def crop(i):
        if i >= len(instances):
          return None
        image = read_image(instances[i].file_name, data.on_error)
        return None if image is None else _eval_crop(
            instances[i], image, data, input_hw)
      crops = list(pool.map(crop, ids))
      blank = np.zeros((*input_hw, 3), np.float32)
      yield {'image': np.stack([blank if c is None else c for c in crops]),
             'index': np.array([i if c is not None else -1
                                for i, c in zip(ids, crops)], np.int32),
             'valid': np.array([c is not None for c in crops])}
