"""ViTPose training and evaluation as a task of the training loop
(mae_jax.train.loop): top-down 2D pose on COCO-format keypoints.

The official COCO recipe (Xu et al. 2022, "ViTPose"; the official
ViTPose_{base,large,huge}_coco_256x192.py): UDP Gaussian heatmap targets
(sigma 2), the joints MSE loss weighted by target weight, AdamW with
layer-wise lr decay (no decay for 1-D parameters and pos_embed),
gradient-norm clipping at 1, linear warm-up then step decay. The training
transforms are mae_jax.pose.augment's, every draw from (seed, micro-batch,
example) (mae_jax.pose.data). Evaluation: the eval split's boxes (ground
truth or a detector's), flip test, DARK-UDP decoding, COCO OKS AP through
pycocotools after OKS NMS, and PCK@0.2 of the box size; figures show the predicted
skeletons of the first held-out images.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from mae_jax import checkpoint, paths, schema
from mae_jax.errors import ConfigError
from mae_jax.figures import figure_png
from mae_jax.models import ViTPose, create_model
from mae_jax.models.geometry import image_hw
from mae_jax.pose import convert as pose_convert, data as pose_data, decode
from mae_jax.pose import estimate, figure as pose_figure, metrics, topdown
from mae_jax.pose.keypoints import FLIP_PAIRS, NUM_KEYPOINTS
from mae_jax.pose.targets import joints_mse_loss
from mae_jax.train import loop, optim, sharding
from mae_jax.train.task import Task, compute_fields

FIGURE_PERSONS = 8  # the figure shows the first image among these boxes


def build_model(config):
  """The ViTPose of a pose config."""
  return create_model(
      config.model, img_size=config.data.image_size, head=config.head,
      num_joints=config.num_joints, drop_path_rate=config.drop_path,
      **compute_fields(config))


def load_pretrained(init_from, model, rng):
  """(variables, what was taken) for `model` from `init_from`: a ViTPose
  checkpoint of the same shape whole, else MAE / ViT weights as the
  backbone (mae_jax.pose.convert.init_from_encoder)."""
  path = paths.resolve(init_from)
  if not path.exists():
    raise ConfigError(f'config.init_from={init_from!r}: no such file or '
                      'directory')
  if path.is_dir() and checkpoint.is_checkpoint(path):
    loaded, variables = checkpoint.load(os.fspath(path),
                                        scan_blocks=model.scan_blocks)
    if isinstance(loaded, ViTPose):
      fields = ('img_size', 'patch_size', 'embed_dim', 'depth', 'head',
                'num_joints')
      if all(getattr(loaded, f) == getattr(model, f) for f in fields):
        return dict(variables), 'the whole pose model'
  variables, report = pose_convert.init_from_encoder(os.fspath(path), model,
                                                     rng)
  return variables, '; '.join(report)


class PoseTask(Task):
  """ViTPose training of `config` (configs/pose.py)."""

  batch_keys = ('image', 'target', 'target_weight')

  def __init__(self, config, mesh=None):
    schema.check(config)
    if config.flip_test and config.num_joints != NUM_KEYPOINTS:
      raise ConfigError(f'config.flip_test needs the {NUM_KEYPOINTS} COCO '
                        'joints (their flip pairs); config.num_joints='
                        f'{config.num_joints}: set flip_test=False')
    self.eval_only = config.eval_only
    self.initialised_from = None
    self._train_instances = None
    self._eval = None
    self.input_hw = image_hw(config.data.image_size)
    self.items = ('params', 'opt_state') + (
        ('batch_stats',) if config.head == 'classic' else ())
    super().__init__(config, mesh)
    batch = sharding.batch_sharding(self.mesh)
    self.heatmaps = jax.jit(
        self._heatmaps, in_shardings=(self.shardings, batch),
        out_shardings=sharding.replicated(self.mesh))

  def build_model(self):
    return build_model(self.config)

  # -- data ------------------------------------------------------------------

  def train_instances(self):
    if self._train_instances is None:
      self._train_instances = pose_data.training_instances(self.config.data)
    return self._train_instances

  def eval_set(self):
    """(annotation JSON, evaluation instances)."""
    if self._eval is None:
      self._eval = pose_data.eval_instances(self.config.data)
    return self._eval

  def steps_per_epoch(self):
    c = self.config
    return max(1, len(self.train_instances()) // (c.batch_size
                                                  * c.accum_iter))

  def batches(self, start_micro, split=None):
    del split
    c = self.config
    return pose_data.train_batches(
        self.train_instances(), c.data, self.input_hw,
        self.model.heatmap_size, c.sigma, c.batch_size, c.seed, start_micro,
        jax.process_index(), jax.process_count())

  def make_schedule(self):
    c = self.config
    spe = self.steps_per_epoch  # read only where epochs are counted
    total = c.total_steps or int(c.epochs * spe())
    warmup = c.warmup_steps or (int(c.warmup_epochs * spe())
                                if c.warmup_epochs else 0)
    peak = optim.scaled_lr(c.blr, c.batch_size * c.accum_iter)
    return optim.warmup_step_decay(peak, warmup, total, c.lr_decay_at,
                                   c.lr_decay_factor, c.warmup_ratio), total

  # -- training ----------------------------------------------------------------

  def init_variables(self, key):
    return self.model.init(key, jnp.zeros((1, *self.input_hw, 3)))

  def example_spec(self):
    k, (h, w) = self.config.num_joints, self.model.heatmap_size
    return {'image': ((*self.input_hw, 3), jnp.float32),
            'target': ((h, w, k), jnp.float32),
            'target_weight': ((k,), jnp.float32)}

  def pretrained(self, key):
    if not self.config.init_from:
      return None
    variables, what = load_pretrained(self.config.init_from, self.model, key)
    self.initialised_from = (
        f'{paths.shown(paths.resolve(self.config.init_from))}: {what}')
    return {k: v for k, v in variables.items() if k in self.items}

  def optimizer(self, abstract_trainable):
    c = self.config
    return optim.finetune_optimizer(
        self.schedule, c.weight_decay, abstract_trainable,
        c.layer_decay_depth, c.layer_decay, clip_grad=c.clip_grad)

  def loss(self, trainable, variables, batch, step, micro):
    key = jax.random.fold_in(jax.random.fold_in(
        jax.random.key(self.config.seed), step), micro)
    out, new = self.model.apply(
        self.with_trainable(variables, trainable), batch['image'],
        train=True, rngs={'dropout': key}, mutable=['batch_stats'])
    loss = joints_mse_loss(out.astype(jnp.float32), batch['target'],
                           batch['target_weight'])
    return loss, dict(new)

  # -- evaluation ----------------------------------------------------------

  def _heatmaps(self, state, images):
    variables = {k: v for k, v in state.items() if k != 'opt_state'}
    out = self.model.apply(variables, images).astype(jnp.float32)
    if self.config.flip_test:
      mirrored = self.model.apply(variables, images[:, :, ::-1])
      swapped = decode.flip_back(mirrored.astype(jnp.float32), FLIP_PAIRS)
      out = 0.5 * (out + swapped)
    return out

  def predict(self, state, limit=None):
    """(instances, keypoints (n, K, 3) in image pixels) of the first `limit`
    evaluation instances (all by default), on every process."""
    _, instances = self.eval_set()
    instances = instances[:limit] if limit else instances
    c = self.config
    rows = {}
    for batch in pose_data.eval_batches(
        instances, c.data, self.input_hw, c.batch_size, jax.process_index(),
        jax.process_count()):
      b = sharding.global_batch(self.mesh, {'image': batch['image']})
      heat = np.asarray(self.heatmaps(state, b['image']))
      index = np.asarray(multihost_utils.process_allgather(
          batch['index'], tiled=True))
      for i, h in zip(index, heat):
        if i >= 0:
          rows[int(i)] = h
    kept = sorted(rows)
    if not kept:
      return [], np.zeros((0, c.num_joints, 3), np.float32)
    boxes = [instances[i] for i in kept]
    centers, scales = zip(*(topdown.box_to_center_scale(inst.box,
                                                        self.input_hw)
                            for inst in boxes))
    keypoints = decode.decode(np.stack([rows[i] for i in kept]),
                              np.stack(centers), np.stack(scales),
                              blur=c.blur)
    return boxes, keypoints

  def evaluate(self, state, step):
    """COCO OKS AP / AR (in [0, 1]) and PCK@0.2 on config.data.eval_split."""
    del step
    annotations, _ = self.eval_set()
    instances, keypoints = self.predict(state)
    results = []
    for inst, kp in zip(instances, keypoints):
      results += estimate.coco_results(kp[None], inst.image_id,
                                       [inst.score])
      _, scale = topdown.box_to_center_scale(inst.box, self.input_hw)
      results[-1]['area'] = float(np.prod(scale * topdown.PIXEL_STD))
    # As the official evaluation: OKS NMS (threshold 0.9) over each image's
    # poses, then COCOeval.
    out = metrics.coco_keypoint_ap(annotations, metrics.oks_nms(results))
    if not self.config.data.detections and instances:
      out['PCK'] = metrics.pck(
          keypoints[..., :2], np.stack([i.keypoints for i in instances]),
          np.stack([i.box for i in instances]))
    out['count'] = len(instances)
    return out

  def summary(self, result):
    if not result:
      return ''
    text = (f'OKS AP {result["AP"]:.3f} (AP50 {result["AP50"]:.3f}, AR '
            f'{result["AR"]:.3f})')
    if 'PCK' in result:
      text += f', PCK@0.2 {result["PCK"]:.3f}'
    return text + f' on {result["count"]} person boxes'

  def figure(self, state, step, monitor):
    """The predicted skeletons of the first held-out image's people."""
    instances, keypoints = self.predict(state, FIGURE_PERSONS)
    if not instances:
      return False
    first = [i for i, inst in enumerate(instances)
             if inst.image_id == instances[0].image_id]
    image = pose_data.read_image(instances[0].file_name, 'fail')
    fig = pose_figure.pose_figure(
        image, keypoints[first],
        boxes=np.stack([instances[i].box for i in first]),
        title=f'step {step}: {paths.shown(instances[0].file_name)}')
    monitor.write_figure(step, figure_png(fig), 'pose')
    return True

  def notes(self, start):
    c = self.config
    lines = [f'pose: {len(self.train_instances())} training instances, '
             f'{c.num_joints} joints, head {c.head}']
    if self.initialised_from:
      lines.append(f'initialised from {self.initialised_from}')
    elif not start:
      lines.append('initialised at random (config.init_from is not set)')
    return lines

  def outputs(self, workdir):
    if not self.config.figure_every_steps:
      return []
    return [f'figures in {paths.shown(workdir / "figures")}']


def train(config, workdir, mesh=None):
  """Trains (or resumes, or with eval_only evaluates) a pose model in
  `workdir`; returns the last evaluation result, or None."""
  _, result = loop.run(PoseTask(config, mesh), workdir)
  return result
