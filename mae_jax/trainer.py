"""MAE pretraining: one jitted, sharded train step and the loop around it.

Counting: `step` is the number of optimizer updates done; each update
consumes `accum_iter` micro-batches of `batch_size` images. Every random draw
is derived from (seed, step): the mask noise of update `step` is drawn for
the whole effective batch, so each example gets its own mask under any mesh,
any process count and any accumulation split.
"""
import functools
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from mae_jax import checkpoint, optim, paths, sharding
from mae_jax.config_check import (ConfigError, check_pretrain_config,
                                  check_resume)
from mae_jax.failed_saves import (  # CheckpointSaveError: for train.py
    CheckpointSaveError, SaveWatch, closing, quiet_failed_saves, save_step)
from mae_jax.models import create_model, model_input_shape
from mae_jax.monitor import Monitor, NonFiniteError, mesh_text, shown
from mae_jax.workdir import Preemption, WorkdirLock

ITEMS = ('params', 'opt_state', 'model', 'meta')


def attention_impl(name, backend=None):
  """config.attention -> the model's attention_impl. 'default' is 'chunked'
  on CPU (faster there, docs/BENCHMARKS.md) and XLA's own choice elsewhere."""
  if name != 'default':
    return name
  return 'chunked' if (backend or jax.default_backend()) == 'cpu' else None


def build_model(config):
  return create_model(config.model, img_size=config.data.image_size,
                      in_chans=config.data.get('channels', 3),
                      norm_pix_loss=config.norm_pix_loss,
                      dtype=jnp.dtype(config.dtype),
                      attention_impl=attention_impl(config.attention),
                      remat=config.remat,
                      fuse_patch_gather=config.get('fuse_patch_gather', True),
                      scan_blocks=config.get('scan_blocks', False))


def schedule_for(config, steps_per_epoch):
  """(lr schedule over updates, total updates)."""
  effective = config.batch_size * config.accum_iter
  peak = optim.scaled_lr(config.blr, effective)
  total = config.total_steps or config.epochs * steps_per_epoch
  warmup = config.warmup_steps or int(config.warmup_epochs * steps_per_epoch)
  return optim.warmup_cosine(peak, warmup, total, config.min_lr), total


def mask_noise(seed, step, micro, micro_batch, accum_iter, length):
  """(micro_batch, L) uniform noise: rows [micro*B, (micro+1)*B) of the
  noise of update `step`, drawn for the whole effective batch."""
  key = jax.random.fold_in(jax.random.key(seed), step)
  noise = jax.random.uniform(key, (micro_batch * accum_iter, length))
  return jax.lax.dynamic_slice_in_dim(noise, micro * micro_batch, micro_batch)


def _skip_accumulated(old, new, ok, last):
  """(state, skipped) of a skip_nonfinite micro-step under optax.MultiSteps.

  A non-finite micro-batch enters the accumulator as NaN gradients, so the
  accumulator itself says, at every later micro-step of the same update,
  that the update is bad; parameters are held meanwhile (the NaN would
  reach them through MultiSteps' zero-scaled updates). At the last
  micro-step a bad update is dropped: parameters, the wrapped optimizer's
  state and the update count are those of before the update, and the
  accumulator is empty again (mini_step is already back to 0). `new` is the
  state MultiSteps produced from `old`; returns the state to keep and
  whether the update was dropped.
  """
  before, after = old['opt_state'], new['opt_state']
  if not isinstance(before, optax.MultiStepsState):
    raise TypeError('skip_nonfinite with accum_iter > 1 expects an '
                    f'optax.MultiSteps state, got {type(before).__name__}')
  bad = ~ok | ~jnp.isfinite(optax.tree.norm(before.acc_grads))
  drop = bad & last

  def pick(use_old, a, b):
    return jax.tree.map(lambda x, y: jnp.where(use_old, y, x), a, b)

  opt_state = after._replace(
      gradient_step=pick(drop, after.gradient_step, before.gradient_step),
      inner_opt_state=pick(drop, after.inner_opt_state,
                           before.inner_opt_state),
      acc_grads=jax.tree.map(lambda a: jnp.where(drop, jnp.zeros_like(a), a),
                             after.acc_grads))
  return {'params': pick(bad, new['params'], old['params']),
          'opt_state': opt_state}, drop


def manager(directory, keep, item_names):
  """Async manager of `directory`; unfinished (`*.orbax-checkpoint-tmp*`)
  steps of a killed run are deleted on start and never read."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, enable_async_checkpointing=True, create=True,
      cleanup_tmp_directories=True)
  return ocp.CheckpointManager(directory, options=options,
                               item_names=item_names)


def check_saved_config(mngr, step, config, model):
  """(meta, overrides) of checkpoint `step`, after config_check.check_resume
  compared its saved config and model description with `config` and
  `model` (refusing a run they would change)."""
  saved = mngr.restore(step, args=ocp.args.Composite(
      model=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
  overrides = check_resume(config, saved['meta'].get('config', {}),
                           checkpoint.model_description(model),
                           saved['model'], shown(mngr.directory / str(step)))
  return saved['meta'], overrides


class Trainer:
  """Holds the mesh, the model, the jitted step and the checkpoint manager."""

  def __init__(self, config, workdir, mesh=None):
    check_pretrain_config(config)
    self.config = config
    self.workdir = paths.resolve(workdir)
    self.mesh = mesh or sharding.make_mesh(config.mesh)
    devices = self.mesh.devices.size
    if config.batch_size % devices:
      raise ConfigError(f'config.batch_size={config.batch_size} is not '
                        f'divisible by the {devices} devices of the mesh')
    self.model = build_model(config)
    self.length = self.model.num_patches

  # -- state ---------------------------------------------------------------

  def setup(self, steps_per_epoch):
    """Builds the optimizer, the sharded state and the jitted step."""
    config = self.config
    self.schedule, self.total_steps = schedule_for(config, steps_per_epoch)
    abstract = checkpoint.abstract_params(self.model)
    self.tx = optim.pretrain_optimizer(
        self.schedule, config.weight_decay, abstract, config.b1, config.b2,
        config.accum_iter)
    abstract_state = {
        'params': abstract,
        'opt_state': jax.eval_shape(self.tx.init, abstract)}
    self.state_shardings, self.abstract_state = sharding.with_shardings(
        self.mesh, abstract_state)
    batch = sharding.batch_sharding(self.mesh)
    replicated = sharding.replicated(self.mesh)
    self.train_step = jax.jit(
        self._train_step, donate_argnums=(0,),
        in_shardings=(self.state_shardings, batch, replicated, replicated),
        out_shardings=(self.state_shardings, replicated))

  def init_state(self):
    """Fresh parameters and optimizer state, created sharded."""
    key = jax.random.key(self.config.seed)
    def init():
      imgs = jnp.zeros((1, *model_input_shape(self.model)))
      noise = jnp.zeros((1, self.length))
      params = self.model.init({'params': key}, imgs, noise=noise)['params']
      return {'params': params, 'opt_state': self.tx.init(params)}
    return jax.jit(init, out_shardings=self.state_shardings)()

  def _train_step(self, state, images, step, micro):
    """One micro-step: forward, backward and (every accum_iter) an update.

    With config.skip_nonfinite, an update whose loss or gradient norm is not
    finite is skipped whole: parameters and optimizer state stay as they
    were before it, and metrics['skipped'] is 1 on its last micro-step (so
    it is counted once). With accum_iter > 1 a non-finite micro-batch drops
    the update of all accum_iter micro-batches it belongs to (see
    _skip_accumulated); the micro-step count keeps its pace, so the next
    update starts on time with an empty accumulator.
    """
    config = self.config
    noise = mask_noise(config.seed, step, micro, images.shape[0],
                       config.accum_iter, self.length)
    noise = jax.lax.with_sharding_constraint(
        noise, sharding.batch_sharding(self.mesh))

    def loss_fn(params):
      loss, _, _ = self.model.apply({'params': params}, images,
                                    mask_ratio=config.mask_ratio, noise=noise)
      return loss

    loss, grads = jax.value_and_grad(loss_fn)(state['params'])
    metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads),
               'lr': self.schedule(step)}
    ok = jnp.isfinite(metrics['loss']) & jnp.isfinite(metrics['grad_norm'])
    accumulated = config.skip_nonfinite and config.accum_iter > 1
    if accumulated:  # a bad micro-batch marks the accumulator (NaN)
      grads = jax.tree.map(lambda g: jnp.where(ok, g, jnp.nan), grads)
    updates, opt_state = self.tx.update(grads, state['opt_state'],
                                        state['params'])
    params = optax.apply_updates(state['params'], updates)
    new = {'params': params, 'opt_state': opt_state}
    if accumulated:
      new, skipped = _skip_accumulated(state, new, ok,
                                       micro == config.accum_iter - 1)
      metrics['skipped'] = skipped.astype(jnp.float32)
    elif config.skip_nonfinite:  # keep the old state: no update is applied
      new = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, state)
      metrics['skipped'] = 1.0 - ok.astype(jnp.float32)
    return new, metrics

  # -- checkpoints -----------------------------------------------------------

  def manager(self):
    return manager(self.workdir / 'checkpoints',
                   self.config.keep_checkpoints, ITEMS)

  def save(self, mngr, step, state, watch, skipped=0):
    """Starts an async save of `step`; refuses non-finite parameters.
    `watch` (SaveWatch) first reports a failure of the previous save."""
    if not bool(self.params_finite(state['params'])):
      raise NonFiniteError(
          f'parameters after update {step} are not finite; not saving them; '
          f'the last good checkpoint is step {mngr.latest_step()}')
    watch.started(step)
    meta = {'step': step, 'skipped': skipped,
            'config': json.loads(self.config.to_json())}
    save_step(mngr, step, ocp.args.Composite(
        params=ocp.args.StandardSave(state['params']),
        opt_state=ocp.args.StandardSave(state['opt_state']),
        model=ocp.args.JsonSave(checkpoint.model_description(self.model)),
        meta=ocp.args.JsonSave(meta)))

  @functools.partial(jax.jit, static_argnums=0)
  def params_finite(self, params):
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x))
                              for x in jax.tree.leaves(params)]))

  def restore(self, mngr, step):
    """(state, meta, overrides) of `step` on this trainer's mesh; a
    checkpoint of another model or config is refused, naming the fields
    that differ; `overrides` lists those config.resume_override allowed."""
    meta, overrides = check_saved_config(mngr, step, self.config, self.model)
    restored = mngr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(self.abstract_state['params']),
        opt_state=ocp.args.StandardRestore(self.abstract_state['opt_state'])))
    state = {'params': restored['params'], 'opt_state': restored['opt_state']}
    return state, meta, overrides

  # -- loop ------------------------------------------------------------------

  def run_update(self, state, micro_batches, step):
    """Applies `accum_iter` micro-batches (global jax.Arrays) as one update."""
    metrics = []
    for micro, images in enumerate(micro_batches):
      state, m = self.train_step(state, images, jnp.int32(step),
                                 jnp.int32(micro))
      metrics.append(m)
    reduce = {'lr': lambda x: x[0], 'skipped': jnp.sum}
    return state, {k: reduce.get(k, jnp.mean)(jnp.stack([m[k] for m in metrics]))
                   for k in metrics[0]}

  @functools.cached_property
  def _apply(self):
    """The model's forward pass, jitted once (for figures)."""
    return jax.jit(functools.partial(self.model.apply,
                                     mask_ratio=self.config.mask_ratio))

  def reconstruct(self, params, images, rows=8):
    """First `rows` images, predictions and masks of a global batch, with a
    fixed mask, gathered to every process as NumPy (for figures)."""
    noise = jax.random.uniform(jax.random.key(self.config.seed + 1),
                               (images.shape[0], self.length))
    noise = jax.device_put(noise, sharding.batch_sharding(self.mesh))
    _, pred, mask = self._apply({'params': params}, images, noise=noise)
    out = multihost_utils.process_allgather((images, pred, mask), tiled=True)
    return tuple(np.asarray(x[:rows]) for x in out)


def train(config, workdir, mesh=None):
  """Runs (or resumes) pretraining in `workdir`; returns the final state.

  Holds WORKDIR/.lock while running. SIGTERM saves the current step and
  returns normally (see workdir.Preemption).
  """
  from mae_jax.data import pipeline  # the only TensorFlow user

  trainer = Trainer(config, workdir, mesh)
  workdir = trainer.workdir
  process, processes = jax.process_index(), jax.process_count()
  preemption = Preemption()  # from here on SIGTERM saves at a step boundary
  try:
    with WorkdirLock(workdir, process), quiet_failed_saves():
      steps_per_epoch = pipeline.steps_per_epoch(
          config.data, config.batch_size * config.accum_iter, processes)
      trainer.setup(steps_per_epoch)
      with closing(trainer.manager()) as mngr:
        return _loop(trainer, mngr, pipeline, preemption)
  finally:
    preemption.restore()


def _loop(trainer, mngr, pipeline, preemption):
  config, workdir = trainer.config, trainer.workdir
  process, processes = jax.process_index(), jax.process_count()
  start = mngr.latest_step()
  overrides = []
  if start is None:
    state, start, skipped = trainer.init_state(), 0, 0
  else:
    state, meta, overrides = trainer.restore(mngr, start)
    skipped = meta.get('skipped', 0)
  monitor = Monitor(workdir, trainer.total_steps, config,
                    active=process == 0, start_step=start)
  monitor.note(f'{"resuming at" if start else "starting"} step {start}/'
               f'{trainer.total_steps} in {shown(workdir)} on mesh '
               f'{mesh_text(trainer.mesh)}')
  if overrides:
    monitor.note('resuming with changed fields (config.resume_override): '
                 + '; '.join(overrides))
  data = pipeline.make_iterator(
      config.data, config.batch_size, seed=config.seed,
      start_step=start * config.accum_iter, process_index=process,
      process_count=processes)
  fixed = None
  if config.figure_every_steps:
    fixed = sharding.global_batch(trainer.mesh, next(pipeline.make_iterator(
        config.data, config.batch_size, seed=config.seed, start_step=0,
        process_index=process, process_count=processes))['image'])
  pending = None   # (step, metrics) not yet checked, so the host never waits
  watch = SaveWatch(mngr)

  def check():
    nonlocal pending, skipped
    if pending is not None:
      skipped += monitor.check_finite(*pending, last_good=mngr.latest_step(),
                                      skip=config.skip_nonfinite,
                                      skipped=skipped)
      pending = None

  try:
    for step in range(start, trainer.total_steps):
      micro = [sharding.global_batch(trainer.mesh, next(data)['image'])
               for _ in range(config.accum_iter)]
      state, metrics = trainer.run_update(state, micro, step)
      monitor.add(metrics)
      if step == start:
        monitor.started(step + 1)
      check()
      pending = (step, metrics)
      watch.poll()
      done = step + 1
      if done % config.log_every_steps == 0 or done == trainer.total_steps:
        monitor.log(done, skipped)
      stop = preemption.reached(done)
      if (done % config.checkpoint_every_steps == 0
          or done == trainer.total_steps or stop):
        check()
        trainer.save(mngr, done, state, watch, skipped)
      if fixed is not None and (done % config.figure_every_steps == 0
                                or done == trainer.total_steps):
        with monitor.paused():
          monitor.figure(done, *trainer.reconstruct(state['params'], fixed),
                         trainer.model.patch_size, config.norm_pix_loss,
                         config.data.get('mean'), config.data.get('std'))
      if stop:
        watch.finish()
        monitor.note(f'preempted (SIGTERM): saved step {done}/'
                     f'{trainer.total_steps} in {shown(mngr.directory)}; '
                     'run the same command to resume')
        if processes > 1:  # every process says where it stopped
          logging.getLogger('absl').warning(
              'process %d of %d: preempted, saved step %d', process,
              processes, done)
        break
    else:
      check()
      watch.finish()
      monitor.note(
          f'done: checkpoints in {shown(mngr.directory)}, metrics in '
          f'{shown(workdir / "metrics.jsonl")} and {shown(workdir / "tb")}'
          + (f', figures in {shown(workdir / "figures")}'
             if fixed is not None else '')
          + (f'; {skipped} non-finite updates skipped' if skipped else ''))
  finally:
    monitor.close()
  return state
