"""Fine-tuning and linear probing of MAE encoders, with evaluation.

`config.task` chooses the recipe (He et al. 2021, "Masked Autoencoders Are
Scalable Vision Learners", appendix A.1; the official code's main_finetune.py
and main_linprobe.py):
  'finetune'  whole classifier, AdamW with layer-wise lr decay, mixup/cutmix,
              label smoothing, stochastic depth;
  'linprobe'  frozen encoder (no gradient computed for it), BatchNorm without
              affine + linear head, LARS.
Random draws (mixup, drop path) come from fold_in(key(seed), step, micro).
"""
import contextlib
import json
import os

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from flax import traverse_util

from mae_jax import checkpoint, convert, optim, paths, sharding
from mae_jax.config_check import ConfigError, check_classifier_config
from mae_jax.failed_saves import (SaveWatch, closing, quiet_failed_saves,
                                  save_step)
from mae_jax.mixup import mix_batch, smooth_one_hot, soft_cross_entropy
from mae_jax.models import VisionTransformer, create_model, model_input_shape
from mae_jax.monitor import Monitor, mesh_text, shown
from mae_jax.trainer import (attention_impl, check_saved_config, manager,
                             schedule_for)
from mae_jax.workdir import Preemption, WorkdirLock


def build_model(config, num_classes):
  probe = config.task == 'linprobe'
  return create_model(
      config.model, num_classes=num_classes, img_size=config.data.image_size,
      in_chans=config.data.get('channels', 3),
      global_pool=config.global_pool, linear_probe=probe,
      drop_path_rate=0.0 if probe else config.drop_path,
      dtype=jnp.dtype(config.dtype),
      attention_impl=attention_impl(config.get('attention', 'default')),
      scan_blocks=config.get('scan_blocks', False))


WHOLE = 'the whole classifier'


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


def pretrained_params(init_from, model, rng):
  """Classifier params from `init_from` (see load_pretrained)."""
  return load_pretrained(init_from, model, rng)[0]


class ClassifierTrainer:
  """Mesh, model, optimizer and jitted train/eval steps for one task."""

  def __init__(self, config, num_classes, mesh=None):
    check_classifier_config(config)
    self.config = config
    self.mesh = mesh or sharding.make_mesh(config.mesh)
    if config.batch_size % self.mesh.devices.size:
      raise ConfigError(f'config.batch_size={config.batch_size} is not '
                        f'divisible by the {self.mesh.devices.size} devices')
    self.num_classes = num_classes
    self.model = build_model(config, num_classes)
    self.probe = config.task == 'linprobe'
    self.initialised_from = None  # what init_state took from init_from

  def setup(self, steps_per_epoch):
    c = self.config
    self.schedule, self.total_steps = schedule_for(c, steps_per_epoch)
    abstract = jax.eval_shape(self._init, jax.random.key(0))
    params = abstract['params']
    if self.probe:
      self.tx = optim.lars(self.schedule, params['head'], c.weight_decay,
                           accum_iter=c.accum_iter)
      opt_abstract = jax.eval_shape(self.tx.init, params['head'])
    else:
      self.tx = optim.finetune_optimizer(
          self.schedule, c.weight_decay, params, self.model.depth,
          c.layer_decay, clip_grad=c.clip_grad, accum_iter=c.accum_iter)
      opt_abstract = jax.eval_shape(self.tx.init, params)
    abstract = {**abstract, 'opt_state': opt_abstract}
    self.shardings, self.abstract = sharding.with_shardings(self.mesh,
                                                            abstract)
    batch = sharding.batch_sharding(self.mesh)
    rep = sharding.replicated(self.mesh)
    self.train_step = jax.jit(
        self._train_step, donate_argnums=(0,),
        in_shardings=(self.shardings, batch, batch, rep, rep),
        out_shardings=(self.shardings, rep))
    self.eval_step = jax.jit(
        self._eval_step,
        in_shardings=(self.shardings, batch, batch, batch),
        out_shardings=rep)

  def _init(self, key):
    return self.model.init(key, jnp.zeros((1, *model_input_shape(self.model))))

  def init_state(self):
    """Fresh or pretrained parameters (config.init_from), sharded."""
    c = self.config
    key = jax.random.key(c.seed)
    variables = jax.jit(self._init)(key)
    if c.init_from:
      params, what = load_pretrained(c.init_from, self.model, key)
      self.initialised_from = f'{shown(paths.resolve(c.init_from))}: {what}'
      variables = {**variables, 'params': jax.tree.map(jnp.asarray, params)}
    trainable = (variables['params']['head'] if self.probe
                 else variables['params'])
    state = {**variables, 'opt_state': self.tx.init(trainable)}
    return jax.device_put(state, self.shardings)

  def _train_step(self, state, images, labels, step, micro):
    c = self.config
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(c.seed), step),
                             micro)
    k_mix, k_drop = jax.random.split(key)
    if self.probe:
      targets = smooth_one_hot(labels, self.num_classes, 0.0)
    else:
      images, targets, _ = mix_batch(
          k_mix, images, labels, self.num_classes, c.mixup, c.cutmix,
          c.mixup_switch_prob, c.mixup_prob, c.smoothing)
    params = state['params']

    def loss_fn(trainable):
      full = {**params, 'head': trainable} if self.probe else trainable
      variables = {**state, 'params': full}
      variables.pop('opt_state')
      logits, new = self.model.apply(variables, images, train=True,
                                     rngs={'dropout': k_drop},
                                     mutable=['batch_stats'])
      return soft_cross_entropy(logits, targets), new

    trainable = params['head'] if self.probe else params
    (loss, new), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    updates, opt_state = self.tx.update(grads, state['opt_state'], trainable)
    trainable = optax.apply_updates(trainable, updates)
    out = {**state, **new, 'opt_state': opt_state,
           'params': {**params, 'head': trainable} if self.probe else trainable}
    return out, {'loss': loss, 'grad_norm': optax.tree.norm(grads),
                 'lr': self.schedule(step)}

  def _eval_step(self, state, images, labels, valid):
    variables = {k: v for k, v in state.items() if k != 'opt_state'}
    logits = self.model.apply(variables, images, train=False)
    top5 = jax.lax.top_k(logits, min(5, self.num_classes))[1]
    hit = top5 == labels[:, None]
    valid = valid.astype(jnp.float32)
    return {'top1': jnp.sum(hit[:, 0] * valid),
            'top5': jnp.sum(jnp.any(hit, axis=1) * valid),
            'count': jnp.sum(valid)}

  def evaluate(self, state, batches):
    """Top-1 / top-5 accuracy (%) over an iterator of eval batches."""
    total = {'top1': 0.0, 'top5': 0.0, 'count': 0.0}
    for batch in batches:
      b = sharding.global_batch(self.mesh, batch)
      out = jax.device_get(self.eval_step(state, b['image'], b['label'],
                                          b['valid']))
      total = {k: total[k] + float(out[k]) for k in total}
    n = max(total['count'], 1.0)
    return {'top1': 100 * total['top1'] / n, 'top5': 100 * total['top5'] / n,
            'count': int(total['count'])}

  # -- checkpoints (same layout as pretraining; `load` reads params) ---------

  def item_names(self):
    return ('params', 'opt_state', 'model', 'meta') + (
        ('batch_stats',) if self.probe else ())

  def save(self, mngr, step, state, watch):
    """Starts an async save of `step` (after `watch` reported a failure of
    the previous one)."""
    watch.started(step)
    args = {k: ocp.args.StandardSave(state[k]) for k in self.item_names()
            if k in state}
    save_step(mngr, step, ocp.args.Composite(
        model=ocp.args.JsonSave(checkpoint.model_description(self.model)),
        meta=ocp.args.JsonSave({'step': step, 'config': json.loads(
            self.config.to_json())}), **args))

  def restore(self, mngr, step):
    """(state, overrides) of `step`; a checkpoint of another config is
    refused as in pretraining (config_check.check_resume)."""
    _, overrides = check_saved_config(mngr, step, self.config, self.model)
    names = [k for k in self.item_names() if k in self.abstract]
    restored = mngr.restore(step, args=ocp.args.Composite(**{
        k: ocp.args.StandardRestore(self.abstract[k]) for k in names}))
    return {k: restored[k] for k in names}, overrides


def train(config, workdir, mesh=None):
  """Fine-tunes or probes in `workdir` (resuming it); returns final metrics.

  Holds WORKDIR/.lock while running; SIGTERM saves the current step and
  returns normally."""
  workdir = paths.resolve(workdir)
  preemption = Preemption()
  try:
    with WorkdirLock(workdir, jax.process_index()), quiet_failed_saves():
      return _train(config, workdir, mesh, preemption)
  finally:
    preemption.restore()


def split_of(data_cfg, split):
  """Context in which the input pipeline reads `split` of data_cfg's source.

  The pipeline passes data.split to folder and TFDS sources itself but not to
  the embedded photos, whose split ('train' | 'validation' | 'all', see
  sources.embedded) is set by this context."""
  if data_cfg['name'] != 'embedded':
    return contextlib.nullcontext()
  from mae_jax.data import sources
  return sources.embedded_split(split)


def _train(config, workdir, mesh, preemption):
  from mae_jax.data import pipeline  # the only TensorFlow user

  with split_of(config.data, config.data.split):
    num_classes = config.num_classes or pipeline.num_classes(config.data)
    steps_per_epoch = pipeline.steps_per_epoch(
        config.data, config.batch_size * config.accum_iter,
        jax.process_count())
  t = ClassifierTrainer(config, num_classes, mesh)
  t.setup(steps_per_epoch)
  mngr = manager(workdir / 'checkpoints', config.keep_checkpoints,
                 t.item_names())
  with closing(mngr):
    return _loop(t, mngr, workdir, pipeline, preemption)


def _loop(t, mngr, workdir, pipeline, preemption):
  config = t.config
  process, processes = jax.process_index(), jax.process_count()
  start = mngr.latest_step()
  overrides = []
  if start is None:
    state, start = t.init_state(), 0
  else:
    state, overrides = t.restore(mngr, start)
  monitor = Monitor(workdir, t.total_steps, config, active=process == 0,
                    start_step=start)
  eval_cfg = dict(config.data.to_dict(), split=config.data.eval_split,
                  repeats=1)
  def evaluate(step, state):
    with split_of(eval_cfg, eval_cfg['split']):
      batches = pipeline.make_iterator(
          eval_cfg, config.batch_size, seed=config.seed, train=False,
          process_index=process, process_count=processes)
    result = t.evaluate(state, batches)
    monitor.log_eval(step, result)
    return result

  try:
    if config.eval_only:
      return evaluate(start, state)
    monitor.note(f'{config.task}: {"resuming at" if start else "starting"} '
                 f'step {start}/{t.total_steps}, {t.num_classes} classes, '
                 f'workdir {shown(workdir)}, mesh {mesh_text(t.mesh)}')
    if overrides:
      monitor.note('resuming with changed fields (config.resume_override): '
                   + '; '.join(overrides))
    if t.initialised_from:
      monitor.note(f'initialised from {t.initialised_from}')
    elif not start:
      monitor.note('initialised at random (config.init_from is not set)')
    return _steps(t, mngr, state, start, monitor, evaluate, pipeline,
                  preemption)
  finally:
    monitor.close()


def _steps(t, mngr, state, start, monitor, evaluate, pipeline, preemption):
  config = t.config
  with split_of(config.data, config.data.split):
    data = pipeline.make_iterator(
        config.data, config.batch_size, seed=config.seed,
        start_step=start * config.accum_iter,
        process_index=jax.process_index(),
        process_count=jax.process_count())
  result, watch = None, SaveWatch(mngr)
  for step in range(start, t.total_steps):
    for micro in range(config.accum_iter):
      b = sharding.global_batch(t.mesh, next(data))
      state, metrics = t.train_step(state, b['image'], b['label'],
                                    jnp.int32(step), jnp.int32(micro))
      monitor.add(metrics)
    if step == start:
      monitor.started(step + 1)
    watch.poll()
    done = step + 1
    stop = preemption.reached(done)
    save = (done % config.checkpoint_every_steps == 0
            or done == t.total_steps or stop)
    if done % config.log_every_steps == 0 or done == t.total_steps:
      record = monitor.log(done)  # means over the interval: any bad step
      monitor.check_finite(step, record, last_good=mngr.latest_step())
    if save:
      monitor.check_finite(step, jax.device_get(metrics),
                           last_good=mngr.latest_step())
      t.save(mngr, done, state, watch)
    if done % config.eval_every_steps == 0 or done == t.total_steps:
      with monitor.paused():
        result = evaluate(done, state)
    if stop:
      watch.finish()
      monitor.note(f'preempted (SIGTERM): saved step {done}/{t.total_steps}; '
                   'run the same command to resume')
      return result
  watch.finish()
  top1 = f'; top-1 {result["top1"]:.2f}%' if result else ''
  monitor.note(f'done: {config.task} step {t.total_steps}{top1}; checkpoints '
               f'in {shown(mngr.directory)}, metrics in '
               f'{shown(monitor.workdir / "metrics.jsonl")} and '
               f'{shown(monitor.workdir / "tb")}')
  return result
