"""Mixup / CutMix in batch mode with label smoothing, on device.

One draw per batch: with probability `switch_prob` CutMix (a box of area
fraction 1 - lam pasted from the batch in reverse order), otherwise Mixup
(x <- lam * x + (1 - lam) * x_reversed). For CutMix lam is corrected to the
pasted area after clipping the box to the image. Targets are smoothed
one-hots mixed with the same lam.
"""
import jax
import jax.numpy as jnp


def smooth_one_hot(labels, num_classes, smoothing):
  """(N,) int -> (N, C): 1 - smoothing + smoothing / C on the label, else
  smoothing / C."""
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def _cutmix_box(key, lam, height, width):
  """Box (y0, y1, x0, x1) of side fractions sqrt(1 - lam), centre uniform,
  clipped to the image."""
  ky, kx = jax.random.split(key)
  cut = jnp.sqrt(1.0 - lam)
  cut_h = (height * cut).astype(jnp.int32)
  cut_w = (width * cut).astype(jnp.int32)
  cy = jax.random.randint(ky, (), 0, height)
  cx = jax.random.randint(kx, (), 0, width)
  y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0,
                                                           height)
  x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0,
                                                         width)
  return y0, y1, x0, x1


def mix_batch(key, images, labels, num_classes, mixup_alpha=0.8,
              cutmix_alpha=1.0, switch_prob=0.5, prob=1.0, smoothing=0.1):
  """images (N, H, W, C), labels (N,) -> mixed images, soft targets (N, C),
  and lam (the weight of each example's own label)."""
  k_apply, k_switch, k_mix, k_cut, k_box = jax.random.split(key, 5)
  targets = smooth_one_hot(labels, num_classes, smoothing)
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    return images, targets, jnp.float32(1.0)
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch) < switch_prob
  else:
    use_cutmix = jnp.bool_(cutmix_alpha > 0)
  lam_mix = jax.random.beta(k_mix, max(mixup_alpha, 1e-3),
                            max(mixup_alpha, 1e-3))
  lam_cut = jax.random.beta(k_cut, max(cutmix_alpha, 1e-3),
                            max(cutmix_alpha, 1e-3))
  _, height, width, _ = images.shape
  y0, y1, x0, x1 = _cutmix_box(k_box, lam_cut, height, width)
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
  lam_cut = 1.0 - jnp.mean(box.astype(jnp.float32))
  apply = jax.random.uniform(k_apply) < prob
  lam = jnp.where(apply, jnp.where(use_cutmix, lam_cut, lam_mix), 1.0)
  flipped = images[::-1]
  mixed = jnp.where(use_cutmix, jnp.where(box[None, :, :, None], flipped,
                                          images),
                    lam * images + (1.0 - lam) * flipped)
  mixed = jnp.where(apply, mixed, images).astype(images.dtype)
  targets = lam * targets + (1.0 - lam) * targets[::-1]
  return mixed, targets, lam


def soft_cross_entropy(logits, targets):
  """Mean over the batch of -sum(targets * log_softmax(logits))."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.mean(-jnp.sum(targets * logp, axis=-1))
