"""Learning-rate schedules, weight-decay masks and optimizers (optax).

Schedules count optimizer updates (not micro-batches): with gradient
accumulation, update k uses fractional epoch k / updates_per_epoch, as the
reference evaluates its schedule once per accumulated step.
"""
import re

import optax

from mae_jax.tree import map_with_name


def scaled_lr(blr, effective_batch):
  """lr = blr * effective_batch / 256 (the MAE scaling rule)."""
  return blr * effective_batch / 256


def warmup_cosine(peak_lr, warmup_steps, total_steps, min_lr=0.0):
  """Linear warmup from 0 over warmup_steps, then half-cycle cosine to min_lr
  at total_steps (MAE_SPEC section 6), evaluated per update."""
  if total_steps <= warmup_steps:
    raise ValueError(f'total steps {total_steps} must exceed warmup steps '
                     f'{warmup_steps}')
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak_lr, warmup_steps=warmup_steps,
      decay_steps=total_steps, end_value=min_lr)


def decay_mask(params, no_decay=()):
  """True where weight decay applies: every parameter of rank > 1 whose
  '/'-joined path matches none of the `no_decay` regexes. 1-D parameters
  (biases, LayerNorm) are never decayed."""
  patterns = [re.compile(p) for p in no_decay]
  return map_with_name(
      lambda name, x: x.ndim > 1 and not any(p.search(name) for p in patterns),
      params)


def pretrain_optimizer(schedule, weight_decay, params, b1=0.9, b2=0.95,
                       accum_iter=1):
  """AdamW (beta 0.9/0.95) with the MAE decay mask, accumulated over
  `accum_iter` micro-batches by optax.MultiSteps (gradients averaged)."""
  tx = optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay,
                   mask=decay_mask(params))
  if accum_iter > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=accum_iter)
  return tx
