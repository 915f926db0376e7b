"""What a training task gives the loop, and the one update every task runs.

A task (pretraining, fine-tuning, linear probing, ...) subclasses `Task` and
says what is trained: `build_model`, `init_variables`, `trainable` /
`with_trainable`, `optimizer`, `loss` of one micro-batch, and optionally
the data (`steps_per_epoch`, `batches`; by default config.data through the
tf.data pipeline), `evaluate`, `figure` and `notes`. `Task` turns these
into the sharded state, created sharded (`init_state`), and one jitted,
donated update (`update`); `loop.run` does the rest the same way for every
task.

Counting: `step` is the number of optimizer updates done; each update
consumes `accum_iter` micro-batches of `batch_size` examples. The micro-batch
gradients are summed inside the jitted update by a `lax.scan` (one dispatch
per update; activations of one micro-batch live at a time) and averaged, so
an update is that of the effective batch. With `config.skip_nonfinite` an
update whose loss or gradient norm is not finite is skipped whole: the state
stays that of before it and metrics['skipped'] is 1.
"""
import jax
import jax.numpy as jnp
import optax

from mae_jax.errors import ConfigError
from mae_jax.models import model_input_shape
from mae_jax.train import optim, sharding


def attention_impl(name, backend=None):
  """config.attention -> the model's attention_impl. 'default' is 'chunked'
  on CPU (faster there, docs/BENCHMARKS.md) and XLA's own choice elsewhere."""
  if name != 'default':
    return name
  return 'chunked' if (backend or jax.default_backend()) == 'cpu' else None


def compute_fields(config):
  """The model fields a config sets that choose how the model is computed
  (the same function up to float rounding): dtype, attention_impl,
  split_qkv, fold_qkv_bias, remat, scan_blocks."""
  return dict(dtype=jnp.dtype(config.dtype),
              attention_impl=attention_impl(config.attention),
              split_qkv=config.split_qkv, fold_qkv_bias=config.fold_qkv_bias,
              remat=config.remat, scan_blocks=config.scan_blocks)


def schedule_for(config, steps_per_epoch):
  """(lr schedule over updates, total updates) of a config.

  `steps_per_epoch`: an int, or a function giving it, called only when the
  config counts in epochs (so a run with total_steps and warmup_steps set
  never reads its dataset for this)."""
  count = steps_per_epoch if callable(steps_per_epoch) else (
      lambda: steps_per_epoch)
  effective = config.batch_size * config.accum_iter
  peak = optim.scaled_lr(config.blr, effective)
  total = config.total_steps or config.epochs * count()
  warmup = config.warmup_steps or (
      int(config.warmup_epochs * count()) if config.warmup_epochs else 0)
  return optim.warmup_cosine(peak, warmup, total, config.min_lr), total


@jax.jit
def all_finite(tree):
  """True when every leaf of `tree` is free of NaN and Inf."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x))
                            for x in jax.tree.leaves(tree)]))


class Task:
  """Base of every training task; see the module docstring.

  Subclasses implement the methods that raise NotImplementedError and may
  override `items`, the data, `evaluate`, `figure`, `notes` and `summary`.
  After construction a task holds config, mesh, model, schedule,
  total_steps, tx, shardings and abstract_state.
  """
  items = ('params', 'opt_state')  # the state items a checkpoint holds
  batch_keys = ('image',)          # the fields of a batch the update reads
  eval_only = False                # True: evaluate the restored state, stop

  def __init__(self, config, mesh=None):
    self.config = config
    self.mesh = mesh or sharding.make_mesh(config.mesh)
    devices = self.mesh.devices.size
    if config.batch_size % devices:
      raise ConfigError(f'config.batch_size={config.batch_size} is not '
                        f'divisible by the {devices} devices of the mesh')
    self.model = self.build_model()
    self.schedule, self.total_steps = self.make_schedule()
    abstract = jax.eval_shape(self.init_variables, jax.random.key(0))
    self.tx = self.optimizer(self.trainable(abstract))
    abstract['opt_state'] = jax.eval_shape(self.tx.init,
                                           self.trainable(abstract))
    self.shardings, self.abstract_state = sharding.with_shardings(
        self.mesh, abstract)
    batch = sharding.batch_sharding(self.mesh, stacked=True)
    replicated = sharding.replicated(self.mesh)
    self.update = jax.jit(
        self._update_in_mesh, donate_argnums=(0,),
        in_shardings=(self.shardings, batch, replicated),
        out_shardings=(self.shardings, replicated))

  # -- what a task defines ------------------------------------------------

  def build_model(self):
    """The flax module trained (its config fields from self.config)."""
    raise NotImplementedError

  def make_schedule(self):
    """(lr schedule over updates, total updates); default: warm-up and
    half-cycle cosine (`schedule_for`)."""
    return schedule_for(self.config, self.steps_per_epoch)

  def steps_per_epoch(self):
    """Updates per epoch of the training data (default: config.data read by
    mae_jax.data.pipeline)."""
    from mae_jax.data import pipeline  # TensorFlow, only where data is read
    c = self.config
    return pipeline.steps_per_epoch(c.data, c.batch_size * c.accum_iter,
                                    jax.process_count())

  def batches(self, start_micro, split=None):
    """Iterator of process-local micro-batches (dicts of NumPy arrays),
    starting at micro-batch `start_micro` of the run; with `split`, one
    in-order evaluation pass over that split of the data, with 'valid'.
    Default: config.data through mae_jax.data.pipeline ('image', 'label')."""
    from mae_jax.data import pipeline
    c = self.config
    train = split is None
    data = c.data if train else dict(c.data.to_dict(), split=split,
                                     repeats=1)
    return pipeline.make_iterator(
        data, c.batch_size, seed=c.seed, start_step=start_micro, train=train,
        process_index=jax.process_index(), process_count=jax.process_count())

  def init_variables(self, key):
    """Fresh variables {'params': ..., ...} (traced: runs under jit)."""
    raise NotImplementedError

  def trainable(self, variables):
    """The subtree of `variables` the optimizer updates."""
    return variables['params']

  def with_trainable(self, variables, trainable):
    """`variables` with the trainable subtree replaced."""
    return {**variables, 'params': trainable}

  def optimizer(self, abstract_trainable):
    """The optax transformation of the trainable subtree."""
    raise NotImplementedError

  def loss(self, trainable, variables, batch, step, micro):
    """(loss, {collection: new value}) of micro-batch `micro` of update
    `step`; `variables` hold the rest of the state (traced)."""
    raise NotImplementedError

  def pretrained(self, key):
    """Variables to start from instead of fresh ones (host arrays), or
    None; `describe_init` then says where they came from."""
    del key
    return None

  def evaluate(self, state, step):
    """Evaluation results (a dict) at `step`, or None if the task has none."""
    del state, step
    return None

  def figure(self, state, step, monitor):
    """Writes the task's figure at `step` (through `monitor`), if it has
    one; returns whether it did."""
    del state, step, monitor
    return False

  def notes(self, start):
    """Lines printed when a run starts (`start`: the step resumed from)."""
    del start
    return []

  def summary(self, result):
    """Words for an evaluation `result` (e.g. the accuracy), or ''."""
    del result
    return ''

  def outputs(self, workdir):
    """Lines naming what the task wrote in `workdir` besides checkpoints
    and metrics."""
    del workdir
    return []

  # -- shared --------------------------------------------------------------

  def example_spec(self):
    """{batch key: (shape of one example, dtype)} of what `update` reads;
    default: the model's input image."""
    return {'image': (model_input_shape(self.model), jnp.float32)}

  def abstract_batch(self):
    """ShapeDtypeStructs of one update's batch ((accum_iter, batch_size,
    ...) arrays, sharded as `update` expects): compile without data."""
    c = self.config
    batch = sharding.batch_sharding(self.mesh, stacked=True)
    return {k: jax.ShapeDtypeStruct((c.accum_iter, c.batch_size, *shape),
                                    dtype, sharding=batch)
            for k, (shape, dtype) in self.example_spec().items()}

  def input_zeros(self):
    """A (1, H, W, C) zero image for initialisation."""
    return jnp.zeros((1, *model_input_shape(self.model)))

  def init_state(self):
    """Fresh (or `pretrained`) variables and optimizer state, sharded."""
    key = jax.random.key(self.config.seed)
    shardings = {k: v for k, v in self.shardings.items() if k != 'opt_state'}
    variables = jax.jit(self.init_variables, out_shardings=shardings)(key)
    loaded = self.pretrained(key)
    if loaded is not None:
      variables = {**variables, **jax.device_put(
          loaded, {k: shardings[k] for k in loaded})}
    opt_state = jax.jit(self.tx.init,
                        out_shardings=self.shardings['opt_state'])(
                            self.trainable(variables))
    return {**variables, 'opt_state': opt_state}

  def _update_in_mesh(self, state, batch, step):
    """`_update` traced with the task's mesh in context, so that the model
    keeps activations batch-sharded (mae_jax.models.blocks.batch_sharded)."""
    with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh):
      return self._update(state, batch, step)

  def _update(self, state, batch, step):
    """One optimizer update from `batch` (dict of (accum_iter, B, ...)
    arrays): gradients summed over the micro-batches, averaged, applied."""
    accum = self.config.accum_iter
    variables = {k: v for k, v in state.items() if k != 'opt_state'}
    trainable = self.trainable(variables)
    grad_fn = jax.value_and_grad(self.loss, has_aux=True)

    def micro_step(carry, xs):
      rest, grad_sum, loss_sum = carry
      micro_batch, micro = xs
      (loss, new), grads = grad_fn(trainable, {**variables, **rest},
                                   micro_batch, step, micro)
      return ({**rest, **new}, jax.tree.map(jnp.add, grad_sum, grads),
              loss_sum + loss.astype(jnp.float32)), None

    rest = {k: v for k, v in variables.items() if k != 'params'}
    if accum == 1:
      (loss, new), grads = grad_fn(
          trainable, variables, jax.tree.map(lambda x: x[0], batch), step,
          jnp.int32(0))
      rest = {**rest, **new}
    else:
      zeros = jax.tree.map(jnp.zeros_like, trainable)
      (rest, grads, loss), _ = jax.lax.scan(
          micro_step, (rest, zeros, jnp.float32(0.0)),
          (batch, jnp.arange(accum, dtype=jnp.int32)))
      grads = jax.tree.map(lambda g: g / accum, grads)
      loss = loss / accum
    updates, opt_state = self.tx.update(grads, state['opt_state'], trainable)
    trainable = optax.apply_updates(trainable, updates)
    new_state = {**self.with_trainable({**variables, **rest}, trainable),
                 'opt_state': opt_state}
    metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads),
               'lr': self.schedule(step)}
    if self.config.skip_nonfinite:  # keep the old state: no update applied
      ok = jnp.isfinite(loss) & jnp.isfinite(metrics['grad_norm'])
      new_state = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new_state,
                               state)
      metrics['skipped'] = 1.0 - ok.astype(jnp.float32)
    return new_state, metrics
