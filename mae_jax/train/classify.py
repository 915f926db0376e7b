"""Fine-tuning and linear probing of MAE encoders, as tasks of the training
loop (mae_jax.train.loop), with top-1 / top-5 evaluation.

`config.task` chooses the recipe (He et al. 2021, "Masked Autoencoders Are
Scalable Vision Learners", appendix A.1; the official code's main_finetune.py
and main_linprobe.py):
  'finetune'  whole classifier, AdamW with layer-wise lr decay, mixup/cutmix,
              label smoothing, stochastic depth;
  'linprobe'  frozen encoder (no gradient computed for it), BatchNorm without
              affine + linear head, LARS.
Random draws (mixup, drop path) come from fold_in(key(seed), step, micro).
"""
import os

import jax
import jax.numpy as jnp
from flax import traverse_util

from mae_jax import checkpoint, convert, paths, schema
from mae_jax.errors import ConfigError
from mae_jax.models import VisionTransformer, create_model
from mae_jax.train import loop, optim, sharding
from mae_jax.train.mixup import mix_batch, smooth_one_hot, soft_cross_entropy
from mae_jax.train.task import Task, compute_fields

WHOLE = 'the whole classifier'


def build_model(config, num_classes):
  """The VisionTransformer classifier of a fine-tuning / probing config."""
  probe = config.task == 'linprobe'
  return create_model(
      config.model, num_classes=num_classes, img_size=config.data.image_size,
      in_chans=config.data.channels, global_pool=config.global_pool,
      linear_probe=probe, drop_path_rate=0.0 if probe else config.drop_path,
      **compute_fields(config))


def load_pretrained(init_from, model, rng):
  """(params, what was taken) for the classifier `model` from `init_from`:
  a classifier checkpoint (.pth or mae_jax directory) of the same shape is
  taken whole (WHOLE); otherwise its encoder fills the model and the head
  starts fresh (pos_embed resampled)."""
  path = paths.resolve(init_from)
  source = os.fspath(path)
  expected = traverse_util.flatten_dict(checkpoint.abstract_params(model))
  def fits(params):
    flat = traverse_util.flatten_dict(params)
    return set(flat) == set(expected) and all(
        tuple(flat[k].shape) == tuple(expected[k].shape) for k in flat)
  if path.is_dir():
    loaded, variables = checkpoint.load(source,
                                        scan_blocks=model.scan_blocks)
    if isinstance(loaded, VisionTransformer) and fits(variables['params']):
      return variables['params'], WHOLE
  elif not path.exists():
    raise ConfigError(f'config.init_from={init_from!r}: no such file or '
                      'directory')
  else:
    from mae_jax.torch_io import read_state_dict
    state, extras = read_state_dict(source)
    if convert.detect(state, source, model.img_size).kind.startswith(
        'classifier'):
      _, params, _ = convert.from_torch(state, None, extras, source,
                                        scan_blocks=model.scan_blocks,
                                        img_size=model.img_size)
      if fits(params):
        return params, WHOLE
  fresh = 'head and fc_norm' if model.global_pool else 'head'
  params = convert.init_classifier_from(source, model, rng)['params']
  return params, f'the encoder only ({fresh} newly initialised)'


class ClassifyTask(Task):
  """Fine-tuning or linear probing of `config` (configs/finetune.py,
  configs/linprobe.py); `num_classes` 0 takes the dataset's."""

  batch_keys = ('image', 'label')

  def __init__(self, config, mesh=None):
    schema.check(config)
    from mae_jax.data import pipeline  # the only TensorFlow user
    self.num_classes = config.num_classes or pipeline.num_classes(config.data)
    self.probe = config.task == 'linprobe'
    self.eval_only = config.eval_only
    self.items = ('params', 'opt_state') + (
        ('batch_stats',) if self.probe else ())
    self.initialised_from = None  # what init_state took from init_from
    super().__init__(config, mesh)
    batch = sharding.batch_sharding(self.mesh)
    self.eval_step = jax.jit(
        self._eval_step, in_shardings=(self.shardings, batch, batch, batch),
        out_shardings=sharding.replicated(self.mesh))

  def build_model(self):
    return build_model(self.config, self.num_classes)

  def init_variables(self, key):
    return self.model.init(key, self.input_zeros())

  def example_spec(self):
    return {**super().example_spec(), 'label': ((), jnp.int32)}

  def pretrained(self, key):
    if not self.config.init_from:
      return None
    params, what = load_pretrained(self.config.init_from, self.model, key)
    self.initialised_from = (
        f'{paths.shown(paths.resolve(self.config.init_from))}: {what}')
    return {'params': params}

  def trainable(self, variables):
    params = variables['params']
    return params['head'] if self.probe else params

  def with_trainable(self, variables, trainable):
    if self.probe:
      trainable = {**variables['params'], 'head': trainable}
    return {**variables, 'params': trainable}

  def optimizer(self, abstract_trainable):
    c = self.config
    if self.probe:
      return optim.lars(self.schedule, abstract_trainable, c.weight_decay)
    return optim.finetune_optimizer(
        self.schedule, c.weight_decay, abstract_trainable, self.model.depth,
        c.layer_decay, clip_grad=c.clip_grad)

  def loss(self, trainable, variables, batch, step, micro):
    c = self.config
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(c.seed), step),
                             micro)
    k_mix, k_drop = jax.random.split(key)
    images, labels = batch['image'], batch['label']
    if self.probe:
      targets = smooth_one_hot(labels, self.num_classes, 0.0)
    else:
      images, targets, _ = mix_batch(
          k_mix, images, labels, self.num_classes, c.mixup, c.cutmix,
          c.mixup_switch_prob, c.mixup_prob, c.smoothing)
    logits, new = self.model.apply(
        self.with_trainable(variables, trainable), images, train=True,
        rngs={'dropout': k_drop}, mutable=['batch_stats'])
    return soft_cross_entropy(logits, targets), dict(new)

  # -- evaluation ------------------------------------------------------------

  def _eval_step(self, state, images, labels, valid):
    variables = {k: v for k, v in state.items() if k != 'opt_state'}
    logits = self.model.apply(variables, images, train=False)
    top5 = jax.lax.top_k(logits, min(5, self.num_classes))[1]
    hit = top5 == labels[:, None]
    valid = valid.astype(jnp.float32)
    return {'top1': jnp.sum(hit[:, 0] * valid),
            'top5': jnp.sum(jnp.any(hit, axis=1) * valid),
            'count': jnp.sum(valid)}

  def evaluate(self, state, step):
    """Top-1 / top-5 accuracy (%) on config.data.eval_split."""
    del step
    total = {'top1': 0.0, 'top5': 0.0, 'count': 0.0}
    for batch in self.batches(0, split=self.config.data.eval_split):
      b = sharding.global_batch(self.mesh, batch)
      out = jax.device_get(self.eval_step(state, b['image'], b['label'],
                                          b['valid']))
      total = {k: total[k] + float(out[k]) for k in total}
    n = max(total['count'], 1.0)
    return {'top1': 100 * total['top1'] / n, 'top5': 100 * total['top5'] / n,
            'count': int(total['count'])}

  def summary(self, result):
    if not result:
      return ''
    return (f'top-1 {result["top1"]:.2f}% top-5 {result["top5"]:.2f}% on '
            f'{result["count"]} images')

  def notes(self, start):
    lines = [f'{self.config.task}: {self.num_classes} classes']
    if self.initialised_from:
      lines.append(f'initialised from {self.initialised_from}')
    elif not start:
      lines.append('initialised at random (config.init_from is not set)')
    return lines


def train(config, workdir, mesh=None):
  """Fine-tunes or probes in `workdir` (resuming it); returns the last
  evaluation result ({'top1', 'top5', 'count'}), or None if none ran."""
  _, result = loop.run(ClassifyTask(config, mesh), workdir)
  return result
