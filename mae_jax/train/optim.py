"""Learning-rate schedules, weight-decay masks and optimizers (optax).

Schedules count optimizer updates (not micro-batches): with gradient
accumulation (summed inside one update, mae_jax.train.task), update k uses
fractional epoch k / updates_per_epoch, as the reference evaluates its
schedule once per accumulated step.

Stacked block params (models with scan_blocks, names 'blocks/...' and
'decoder_blocks/...', see mae_jax.models.scan_layout) hold all blocks along
axis 0: the decay masks judge the rank of one block's slice, and layer-wise
lr decay scales each slice by its own block's factor.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mae_jax.models.scan_layout import is_stacked
from mae_jax.errors import ConfigError
from mae_jax.tree import map_with_name


def _block_rank(name, x):
  """Rank of one block's parameter: stacked leaves lose the layer axis."""
  return x.ndim - 1 if is_stacked(name) else x.ndim


def scaled_lr(blr, effective_batch):
  """lr = blr * effective_batch / 256 (the MAE scaling rule)."""
  return blr * effective_batch / 256


def warmup_cosine(peak_lr, warmup_steps, total_steps, min_lr=0.0):
  """Linear warmup from 0 over warmup_steps, then half-cycle cosine to min_lr
  at total_steps (He et al. 2021, appendix A.1, Table 8; `util/lr_sched.py`
  of the official code), evaluated per update."""
  if total_steps <= warmup_steps:
    raise ConfigError(f'total steps {total_steps} must exceed warmup steps '
                      f'{warmup_steps}')
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak_lr, warmup_steps=warmup_steps,
      decay_steps=total_steps, end_value=min_lr)


def warmup_step_decay(peak_lr, warmup_steps, total_steps, decay_at,
                      factor=0.1, warmup_ratio=0.001):
  """The step policy with linear warm-up of mmcv's runner, as the official
  ViTPose recipe uses it: lr = peak_lr * factor ** (number of boundaries
  passed), the boundaries at fractions `decay_at` of total_steps (170 / 210
  and 200 / 210 of the epochs); during the first warmup_steps updates the
  lr is multiplied by 1 - (1 - step / warmup_steps) * (1 - warmup_ratio).
  """
  boundaries = jnp.asarray([round(f * total_steps) for f in decay_at])

  def schedule(step):
    regular = peak_lr * factor ** jnp.sum(step >= boundaries)
    if not warmup_steps:
      return regular
    ramp = 1 - (1 - step / warmup_steps) * (1 - warmup_ratio)
    return jnp.where(step < warmup_steps, regular * ramp, regular)
  return schedule


def decay_mask(params, no_decay=()):
  """True where weight decay applies: every parameter of rank > 1 whose
  '/'-joined path matches none of the `no_decay` regexes. 1-D parameters
  (biases, LayerNorm) are never decayed."""
  patterns = [re.compile(p) for p in no_decay]
  return map_with_name(
      lambda name, x: (_block_rank(name, x) > 1
                       and not any(p.search(name) for p in patterns)),
      params)


def pretrain_optimizer(schedule, weight_decay, params, b1=0.9, b2=0.95):
  """AdamW (beta 0.9/0.95) with the MAE decay mask."""
  return optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay,
                     mask=decay_mask(params))


def layer_id(name, depth):
  """Layer index for layer-wise lr decay: 0 for cls_token, pos_embed and
  patch_embed; i + 1 for blocks_i; depth + 1 for the rest (norms, head)."""
  top = name.split('/')[0]
  if top in ('cls_token', 'pos_embed', 'patch_embed'):
    return 0
  if top.startswith('blocks_'):
    return int(top[len('blocks_'):]) + 1
  if top == 'blocks':
    raise ValueError(f'{name} holds all blocks stacked (scan_blocks): it has '
                     'one layer id per row; see layer_scales')
  return depth + 1


def layer_scales(params, depth, layer_decay):
  """lr scale per parameter: layer_decay ** (depth + 1 - layer_id). A leaf
  of the stacked 'blocks' (scan_blocks) gets an array of shape
  (blocks, 1, ..., 1) holding block i's scale in row i. `depth` is the
  model's depth, or the layer count the official ViTPose-L recipe uses (16
  for its 24 blocks, whose top blocks then get scales above 1)."""
  def scale(name, x):
    if name.split('/')[0] == 'blocks':
      per_block = layer_decay ** (depth + 1 - np.arange(1, x.shape[0] + 1))
      return per_block.reshape((depth,) + (1,) * (x.ndim - 1)).astype(
          x.dtype)
    return layer_decay ** (depth + 1 - layer_id(name, depth))
  return map_with_name(scale, params)


FINETUNE_NO_DECAY = (r'^pos_embed$', r'^cls_token$')


def finetune_optimizer(schedule, weight_decay, params, depth, layer_decay,
                       b1=0.9, b2=0.999, clip_grad=None):
  """AdamW with layer-wise lr decay (He et al. 2021, appendix A.1, Table 9;
  `util/lr_decay.py` of the official code): each parameter's
  update, weight decay included, is scaled by its layer's lr scale. No decay
  for 1-D parameters, pos_embed and cls_token. Optional global-norm clipping
  of the gradient."""
  scales = layer_scales(params, depth, layer_decay)
  return optax.chain(
      *([optax.clip_by_global_norm(clip_grad)] if clip_grad else []),
      optax.scale_by_adam(b1=b1, b2=b2),
      optax.add_decayed_weights(weight_decay,
                                decay_mask(params, FINETUNE_NO_DECAY)),
      optax.stateless(lambda updates, _: jax.tree.map(
          lambda u, s: u * s, updates, scales)),
      optax.scale_by_learning_rate(schedule))


def lars(schedule, params, weight_decay=0.0, momentum=0.9,
         trust_coefficient=0.001):
  """LARS as in the MAE linear probe: for parameters of rank > 1,
  g <- g + wd * p, then g <- g * trust * |p| / |g| (1 where a norm is 0);
  mu <- momentum * mu + g; p <- p - lr * mu. Parameters of rank <= 1 skip
  decay and adaptation. Stacked block params (scan_blocks) are refused: the
  trust ratio would take one norm over all blocks."""
  names = jax.tree.leaves(map_with_name(lambda name, _: name, params))
  stacked = [n for n in names if is_stacked(n)]
  if stacked:
    raise ValueError(f'LARS needs one norm per block but {stacked[0]} holds '
                     'stacked blocks (scan_blocks=True); probe the head only '
                     'or use scan_blocks=False')
  adapt = map_with_name(lambda _, x: x.ndim > 1, params)
  return optax.chain(
      optax.add_decayed_weights(weight_decay, adapt),
      optax.masked(
          optax.scale_by_trust_ratio(trust_coefficient=trust_coefficient),
          adapt),
      optax.trace(decay=momentum),
      optax.scale_by_learning_rate(schedule))
