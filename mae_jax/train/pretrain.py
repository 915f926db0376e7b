"""MAE pretraining as a task of the training loop (mae_jax.train.loop).

The recipe of He et al. 2021 ("Masked Autoencoders Are Scalable Vision
Learners", appendix A.1, Table 8; the official code's main_pretrain.py):
AdamW (0.9, 0.95) with the MAE decay mask, warmup + cosine schedule, loss on
the masked patches only. Every random draw is derived from (seed, step): the
mask noise of update `step` is drawn for the whole effective batch, so each
example gets its own mask under any mesh, any process count and any
accumulation split. Figures show reconstructions of a fixed batch (the
run's first) under a fixed mask. Evaluation (every config.eval_every_steps)
is the online k-NN probe of mae_jax.train.knn on the unmasked encoder's
features, for any labelled dataset: the labels are read for it only.
"""
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from mae_jax import paths, schema
from mae_jax.models import create_model
from mae_jax.train import knn, loop, optim, sharding
from mae_jax.train.task import Task, compute_fields

FIGURE_ROWS = 8  # images per reconstruction figure


def build_model(config):
  """The MaskedAutoencoder of a pretraining config."""
  return create_model(config.model, img_size=config.data.image_size,
                      in_chans=config.data.channels,
                      norm_pix_loss=config.norm_pix_loss,
                      fuse_patch_gather=config.fuse_patch_gather,
                      **compute_fields(config))


def mask_noise(seed, step, micro, micro_batch, accum_iter, length):
  """(micro_batch, L) uniform noise: rows [micro*B, (micro+1)*B) of the
  noise of update `step`, drawn for the whole effective batch."""
  key = jax.random.fold_in(jax.random.key(seed), step)
  noise = jax.random.uniform(key, (micro_batch * accum_iter, length))
  return jax.lax.dynamic_slice_in_dim(noise, micro * micro_batch, micro_batch)


class PretrainTask(Task):
  """Masked-autoencoder pretraining of `config` (configs/pretrain.py)."""

  def __init__(self, config, mesh=None):
    schema.check(config)
    super().__init__(config, mesh)
    self.length = self.model.num_patches
    self.reconstruct = jax.jit(self._reconstruct)  # compiled once
    self.pooled_features = jax.jit(self._pooled_features)
    self._fixed = None

  def build_model(self):
    return build_model(self.config)

  def init_variables(self, key):
    noise = jnp.zeros((1, self.model.num_patches))
    return {'params': self.model.init({'params': key}, self.input_zeros(),
                                      noise=noise)['params']}

  def optimizer(self, abstract_trainable):
    c = self.config
    return optim.pretrain_optimizer(self.schedule, c.weight_decay,
                                    abstract_trainable, c.b1, c.b2)

  def loss(self, trainable, variables, batch, step, micro):
    del variables
    c = self.config
    images = batch['image']
    noise = mask_noise(c.seed, step, micro, images.shape[0], c.accum_iter,
                       self.length)
    noise = jax.lax.with_sharding_constraint(
        noise, sharding.batch_sharding(self.mesh))
    loss, _, _ = self.model.apply({'params': trainable}, images,
                                  mask_ratio=c.mask_ratio, noise=noise)
    return loss, {}

  # -- online k-NN evaluation -----------------------------------------------

  def _pooled_features(self, params, images):
    tokens = self.model.apply({'params': params}, images,
                              method=self.model.features)
    return knn.pooled(tokens, self.config.knn_pool).astype(jnp.float32)

  def features(self, params, split, limit=None):
    """(features float32 (n, D), labels int32 (n,)) of the unmasked
    encoder on `split` (eval transform, in order), at most `limit`
    examples, on every process."""
    feats, labels, count = [], [], 0
    for batch in self.batches(0, split=split):
      if limit is not None and count >= limit:
        break
      b = sharding.global_batch(self.mesh, batch)
      out = self.pooled_features(params, b['image'])
      out, label, valid = multihost_utils.process_allgather(
          (out, b['label'], b['valid']), tiled=True)
      valid = np.asarray(valid)
      feats.append(np.asarray(out)[valid])
      labels.append(np.asarray(label)[valid])
      count += int(valid.sum())
    feats, labels = np.concatenate(feats), np.concatenate(labels)
    return feats[:limit], labels[:limit]

  def num_classes(self):
    from mae_jax.data import pipeline
    return pipeline.num_classes(self.config.data)

  def evaluate(self, state, step):
    """k-NN top-1 (%) on config.data.eval_split, the bank being the
    first config.knn_bank_size examples of config.data.split."""
    del step
    c = self.config
    bank, bank_labels = self.features(state['params'], c.data.split,
                                      c.knn_bank_size)
    queries, labels = self.features(state['params'], c.data.eval_split)
    return {'knn_top1': knn.top1(bank, bank_labels, queries, labels,
                                 self.num_classes(), c.knn_k,
                                 c.knn_temperature),
            'count': len(labels), 'bank': len(bank_labels)}

  def summary(self, result):
    if not result:
      return ''
    return (f'k-NN top-1 {result["knn_top1"]:.2f}% on {result["count"]} '
            f'images (k={self.config.knn_k}, bank of {result["bank"]})')

  # -- figures -------------------------------------------------------------

  def _reconstruct(self, params, images):
    noise = jax.random.uniform(jax.random.key(self.config.seed + 1),
                               (images.shape[0], self.length))
    noise = jax.lax.with_sharding_constraint(
        noise, sharding.batch_sharding(self.mesh))
    return self.model.apply({'params': params}, images,
                            mask_ratio=self.config.mask_ratio, noise=noise)

  def fixed_batch(self):
    """The run's first micro-batch (global), shown in every figure."""
    if self._fixed is None:
      first = next(self.batches(0))['image']
      self._fixed = sharding.global_batch(self.mesh, first)
    return self._fixed

  def reconstruction(self, params, rows=FIGURE_ROWS):
    """First `rows` images, predictions and masks of the fixed batch under
    a fixed mask, gathered to every process as NumPy."""
    images = self.fixed_batch()
    _, pred, mask = self.reconstruct(params, images)
    out = multihost_utils.process_allgather((images, pred, mask), tiled=True)
    return tuple(np.asarray(x[:rows]) for x in out)

  def figure(self, state, step, monitor):
    c = self.config
    monitor.figure(step, *self.reconstruction(state['params']),
                   self.model.patch_size, c.norm_pix_loss, c.data.mean,
                   c.data.std)
    return True

  def outputs(self, workdir):
    if not self.config.figure_every_steps:
      return []
    return [f'figures in {paths.shown(workdir / "figures")}']


def train(config, workdir, mesh=None):
  """Runs (or resumes) pretraining in `workdir`; returns the final state."""
  state, _ = loop.run(PretrainTask(config, mesh), workdir)
  return state
