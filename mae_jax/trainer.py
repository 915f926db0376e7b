"""MAE pretraining: one jitted, sharded train step and the loop around it.

Counting: `step` is the number of optimizer updates done; each update
consumes `accum_iter` micro-batches of `batch_size` images. Every random draw
is derived from (seed, step): the mask noise of update `step` is drawn for
the whole effective batch, so each example gets its own mask under any mesh,
any process count and any accumulation split.
"""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from mae_jax import checkpoint, optim, sharding
from mae_jax.config_check import ConfigError, check_pretrain_config
from mae_jax.models import create_model
from mae_jax.monitor import Monitor

ITEMS = ('params', 'opt_state', 'model', 'meta')


def build_model(config):
  return create_model(config.model, img_size=config.data.image_size,
                      norm_pix_loss=config.norm_pix_loss,
                      dtype=jnp.dtype(config.dtype))


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


class Trainer:
  """Holds the mesh, the model, the jitted step and the checkpoint manager."""

  def __init__(self, config, workdir, mesh=None):
    check_pretrain_config(config)
    self.config = config
    self.workdir = workdir
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
    self.state_shardings = sharding.tree_shardings(self.mesh, abstract_state)
    self.abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        abstract_state, self.state_shardings)
    batch = sharding.batch_sharding(self.mesh)
    replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    self.train_step = jax.jit(
        self._train_step, donate_argnums=(0,),
        in_shardings=(self.state_shardings, batch, replicated, replicated),
        out_shardings=(self.state_shardings, replicated))

  def init_state(self):
    """Fresh parameters and optimizer state, created sharded."""
    key = jax.random.key(self.config.seed)
    def init():
      imgs = jnp.zeros((1, self.model.img_size, self.model.img_size, 3))
      noise = jnp.zeros((1, self.length))
      params = self.model.init({'params': key}, imgs, noise=noise)['params']
      return {'params': params, 'opt_state': self.tx.init(params)}
    return jax.jit(init, out_shardings=self.state_shardings)()

  def _train_step(self, state, images, step, micro):
    """One micro-step: forward, backward and (every accum_iter) an update."""
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
    updates, opt_state = self.tx.update(grads, state['opt_state'],
                                        state['params'])
    params = optax.apply_updates(state['params'], updates)
    metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads),
               'lr': self.schedule(step)}
    return {'params': params, 'opt_state': opt_state}, metrics

  # -- checkpoints -----------------------------------------------------------

  def manager(self):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=self.config.keep_checkpoints,
        enable_async_checkpointing=True, create=True)
    return ocp.CheckpointManager(os.path.join(self.workdir, 'checkpoints'),
                                 options=options, item_names=ITEMS)

  def save(self, mngr, step, state):
    mngr.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state['params']),
        opt_state=ocp.args.StandardSave(state['opt_state']),
        model=ocp.args.JsonSave(checkpoint.model_description(self.model)),
        meta=ocp.args.JsonSave({'step': step, 'config': json.loads(
            self.config.to_json())})))

  def restore(self, mngr, step):
    """Restores params and optimizer state onto this trainer's mesh."""
    restored = mngr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(self.abstract_state['params']),
        opt_state=ocp.args.StandardRestore(self.abstract_state['opt_state'])))
    return {'params': restored['params'], 'opt_state': restored['opt_state']}

  # -- loop ------------------------------------------------------------------

  def run_update(self, state, micro_batches, step):
    """Applies `accum_iter` micro-batches (global jax.Arrays) as one update."""
    metrics = []
    for micro, images in enumerate(micro_batches):
      state, m = self.train_step(state, images, jnp.int32(step),
                                 jnp.int32(micro))
      metrics.append(m)
    return state, {k: jnp.mean(jnp.stack([m[k] for m in metrics]))
                   if k != 'lr' else metrics[0][k] for k in metrics[0]}

  def reconstruct(self, params, images, rows=8):
    """First `rows` images, predictions and masks of a global batch, with a
    fixed mask, gathered to every process as NumPy (for figures)."""
    noise = jax.random.uniform(jax.random.key(self.config.seed + 1),
                               (images.shape[0], self.length))
    noise = jax.device_put(noise, sharding.batch_sharding(self.mesh))
    _, pred, mask = jax.jit(functools.partial(
        self.model.apply, mask_ratio=self.config.mask_ratio))(
            {'params': params}, images, noise=noise)
    out = multihost_utils.process_allgather((images, pred, mask), tiled=True)
    return tuple(np.asarray(x[:rows]) for x in out)


def train(config, workdir, mesh=None):
  """Runs (or resumes) pretraining in `workdir`; returns the final state."""
  from mae_jax.data import pipeline  # the only TensorFlow user

  trainer = Trainer(config, workdir, mesh)
  process, processes = jax.process_index(), jax.process_count()
  steps_per_epoch = pipeline.steps_per_epoch(
      config.data, config.batch_size * config.accum_iter, processes)
  trainer.setup(steps_per_epoch)
  os.makedirs(workdir, exist_ok=True)
  mngr = trainer.manager()
  start = mngr.latest_step()
  if start is None:
    state, start = trainer.init_state(), 0
  else:
    state = trainer.restore(mngr, start)
  monitor = Monitor(workdir, trainer.total_steps, config, active=process == 0)
  monitor.note(f'{"resuming at" if start else "starting"} step {start}/'
               f'{trainer.total_steps} in {workdir} on {trainer.mesh.shape}')
  data = pipeline.make_iterator(
      config.data, config.batch_size, seed=config.seed,
      start_step=start * config.accum_iter, process_index=process,
      process_count=processes)
  fixed = None
  if config.figure_every_steps:
    fixed = sharding.global_batch(trainer.mesh, next(pipeline.make_iterator(
        config.data, config.batch_size, seed=config.seed, start_step=0,
        process_index=process, process_count=processes))['image'])
  pending = None
  for step in range(start, trainer.total_steps):
    micro = [sharding.global_batch(trainer.mesh, next(data)['image'])
             for _ in range(config.accum_iter)]
    state, metrics = trainer.run_update(state, micro, step)
    if pending is not None:   # check the previous step without stalling
      monitor.check_finite(*pending, last_good=mngr.latest_step())
    pending = (step, metrics)
    done = step + 1
    if done % config.log_every_steps == 0 or done == trainer.total_steps:
      monitor.log(done, jax.device_get(metrics))
    if (done % config.checkpoint_every_steps == 0
        or done == trainer.total_steps):
      monitor.check_finite(*pending, last_good=mngr.latest_step())
      trainer.save(mngr, done, state)
    if fixed is not None and (done % config.figure_every_steps == 0
                              or done == trainer.total_steps):
      monitor.figure(done, *trainer.reconstruct(state['params'], fixed),
                     trainer.model.patch_size, config.norm_pix_loss)
  mngr.wait_until_finished()
  mngr.close()
  monitor.note(f'done: checkpoints in {mngr.directory}, metrics in '
               f'{os.path.join(workdir, "metrics.jsonl")} and {workdir}/tb'
               + (f', figures in {workdir}/figures' if fixed is not None
                  else ''))
  monitor.close()
  return state
