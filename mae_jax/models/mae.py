"""The masked autoencoder (MAE) and its loss; registry of model sizes.

Images are NHWC float32, already normalised; predictions are patch vectors in
the reference (p, q, c) layout so they compare element for element with the
PyTorch release.
"""

import flax.linen as nn
import jax.numpy as jnp

from mae_jax.models import layers
from mae_jax.models.blocks import (block_stack, layer_indices, plain_block,
                                   run_stack, run_stack_keeping)
from mae_jax.models.masking import (draw_noise, gather_tokens,
                                    masking_indices, random_masking)
from mae_jax.models.patches import patchify
from mae_jax.models.pos_embed import sincos_2d
from mae_jax.models.products import broadcast_cast


def masked_patch_loss(imgs, pred, mask, patch_size, norm_pix_loss,
                      per_example=False):
  """Mean squared error over removed patches only.

  imgs: (N, H, W, C); pred: (N, L, p*p*C); mask: (N, L), 1 = removed.
  With norm_pix_loss each target patch is normalised by its own mean and
  unbiased (ddof=1) variance. Returns a float32 scalar: the mean over all
  removed patches of the batch; with per_example, (N,) means over each
  image's removed patches.
  """
  target = patchify(imgs.astype(jnp.float32), patch_size)
  if norm_pix_loss:
    target = normalize_patches(target)
  per_patch = jnp.mean((pred.astype(jnp.float32) - target) ** 2, axis=-1)
  axis = -1 if per_example else None
  return jnp.sum(per_patch * mask, axis) / jnp.sum(mask, axis)


def _patch_stats(target, eps):
  """Per-patch mean and sqrt(unbiased variance + eps) of (N, L, P)."""
  mean = jnp.mean(target, axis=-1, keepdims=True)
  var = jnp.var(target, axis=-1, keepdims=True, ddof=1)
  return mean, jnp.sqrt(var + eps)


def normalize_patches(target, eps=1e-6):
  """(t - mean) / sqrt(var + eps) per patch, unbiased variance. (N, L, P)."""
  mean, std = _patch_stats(target, eps)
  return (target - mean) / std


def denormalize_patches(pred, target, eps=1e-6):
  """The inverse of `normalize_patches` for norm-pix predictions:
  pred * sqrt(var + eps) + mean with the statistics of each patch of
  `target` (N, L, P), the patches pred (N, L, P) stands for."""
  mean, std = _patch_stats(target, eps)
  return pred * std + mean


class MaskedAutoencoder(layers.ImageInput):
  """MAE with a ViT encoder that sees only visible patches.

  `__call__(imgs, mask_ratio, noise)` returns (loss, pred, mask) with
  imgs (N, H, W, C), pred (N, L, p*p*C), mask (N, L), L = gh*gw patches of
  the gh x gw grid in raster order. Without `noise`, noise is drawn from the
  'mask' RNG stream. `img_size` is an int (square) or an (H, W) pair (a list
  is taken as a tuple); C is `in_chans`. `features` gives the unmasked
  encoder's tokens.
  """
  embed_dim: int = 1024
  depth: int = 24
  num_heads: int = 16
  decoder_embed_dim: int = 512
  decoder_depth: int = 8
  decoder_num_heads: int = 16
  norm_pix_loss: bool = False
  # Embed only the visible patches (gather patch vectors, then the matmul)
  # instead of embedding all and gathering tokens: same values, 1/4 of the
  # patch-embedding FLOPs at mask ratio 0.75.
  fuse_patch_gather: bool = True

  def setup(self):
    _ = self.grid_size  # raises when img_size is not divisible by the patch
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm_kw = dict(epsilon=self.norm_eps, **kw)
    token_init = nn.initializers.normal(0.02)
    self.patch_embed = layers.PatchEmbed(self.patch_size, self.embed_dim, **kw)
    self.cls_token = self.param('cls_token', token_init,
                                (1, 1, self.embed_dim), self.param_dtype)
    self.blocks = block_stack(self, 'blocks', self.depth, self.num_heads)
    self.norm = nn.LayerNorm(**norm_kw)
    self.decoder_embed = layers.Dense(self.decoder_embed_dim, **kw)
    self.mask_token = self.param('mask_token', token_init,
                                 (1, 1, self.decoder_embed_dim),
                                 self.param_dtype)
    self.decoder_blocks = block_stack(self, 'decoder_blocks',
                                      self.decoder_depth,
                                      self.decoder_num_heads)
    self.decoder_norm = nn.LayerNorm(**norm_kw)
    self.decoder_pred = layers.Dense(
        self.patch_size ** 2 * self.in_chans, **kw)

  def encode(self, imgs, mask_ratio=0.75, noise=None):
    """(N, H, W, C) -> latent (N, 1 + len_keep, D), mask (N, L), ids_restore."""
    self._check_images(imgs)
    pos = sincos_2d(self.embed_dim, self.grid_size)  # (1 + L, D) constant
    pos_patches = jnp.broadcast_to(pos[1:].astype(self.dtype)[None],
                                   (imgs.shape[0],) + pos[1:].shape)
    if noise is None:
      noise = draw_noise(self.make_rng('mask'), imgs.shape[0],
                         self.num_patches)
    if noise.shape != (imgs.shape[0], self.num_patches):
      raise ValueError(f'noise has shape {noise.shape}, expected '
                       f'{(imgs.shape[0], self.num_patches)}')
    if self.fuse_patch_gather:
      ids_keep, mask, ids_restore = masking_indices(noise, mask_ratio)
      x = (self.patch_embed(imgs, keep=ids_keep)
           + gather_tokens(pos_patches, ids_keep))
    else:
      x = self.patch_embed(imgs) + pos_patches
      x, mask, ids_restore = random_masking(x, mask_ratio, noise)
    cls = (broadcast_cast(self.cls_token, (x.shape[0], 1, x.shape[2]),
                          self.dtype) + pos[:1].astype(self.dtype))
    x = jnp.concatenate([cls, x], axis=1)
    x = run_stack(self.blocks, x, self.depth)
    return self.norm(x), mask, ids_restore

  def features(self, imgs, layers=None):  # pylint: disable=redefined-outer-name
    """Encoder tokens of the whole image, nothing masked or shuffled.

    imgs (N, H, W, C) -> tokens (N, 1 + gh*gw, D): the cls token first, then
    the patch tokens in raster order (`mae_jax.models.token_map` makes the
    (N, gh, gw, D) map), after the final LayerNorm `norm`. Needs no RNG.
    With `layers`, a sequence of block indices (negative ones count from
    the end), returns (tokens, outputs): outputs[k] is the (N, 1 + gh*gw, D)
    output of block layers[k], before any norm, so the last block's output
    is `tokens` before `norm`.
    """
    self._check_images(imgs)
    pos = sincos_2d(self.embed_dim, self.grid_size).astype(self.dtype)
    x = self.patch_embed(imgs) + pos[1:]
    cls = broadcast_cast(self.cls_token, (x.shape[0], 1, x.shape[2]),
                         self.dtype) + pos[:1]
    x = jnp.concatenate([cls, x], axis=1)
    if layers is None:
      x = run_stack(self.blocks, x, self.depth)
      return self.norm(x)
    x, outputs = run_stack_keeping(self.blocks, x, self.depth,
                                   layer_indices(layers, self.depth),
                                   plain_block(self, self.num_heads))
    return self.norm(x), outputs

  def decode(self, latent, ids_restore):
    """latent (N, 1 + len_keep, D), ids_restore (N, L) -> pred (N, L, p*p*C)."""
    x = self.decoder_embed(latent)
    n, t, d = x.shape
    length = ids_restore.shape[1]
    mask_tokens = broadcast_cast(self.mask_token, (n, length + 1 - t, d),
                                 x.dtype)
    x_ = jnp.concatenate([x[:, 1:], mask_tokens], axis=1)
    x_ = jnp.take_along_axis(x_, ids_restore[:, :, None], axis=1)
    x = jnp.concatenate([x[:, :1], x_], axis=1)
    x = x + sincos_2d(d, self.grid_size).astype(x.dtype)
    x = run_stack(self.decoder_blocks, x, self.decoder_depth)
    x = self.decoder_pred(self.decoder_norm(x))
    return x[:, 1:]

  def loss(self, imgs, pred, mask):
    """Masked-patch MSE; see `masked_patch_loss`."""
    return masked_patch_loss(imgs, pred, mask, self.patch_size,
                             self.norm_pix_loss)

  def __call__(self, imgs, mask_ratio=0.75, noise=None):
    latent, mask, ids_restore = self.encode(imgs, mask_ratio, noise)
    pred = self.decode(latent, ids_restore)
    return self.loss(imgs, pred, mask), pred, mask


# Sizes of the official release (`models_mae.py` of facebookresearch/mae)
# plus tiny ones for CPU: patch 8 at 64 px (tests, the demo) and patch 4 at
# 28 px (the digits).
MAE_CONFIGS = {
    'mae_vit_tiny_patch8': dict(
        img_size=64, patch_size=8, embed_dim=192, depth=4, num_heads=3,
        decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4),
    'mae_vit_tiny_patch4': dict(
        img_size=28, in_chans=1, patch_size=4, embed_dim=192, depth=4,
        num_heads=3, decoder_embed_dim=128, decoder_depth=2,
        decoder_num_heads=4),
    'mae_vit_base_patch16': dict(
        patch_size=16, embed_dim=768, depth=12, num_heads=12,
        decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
    'mae_vit_large_patch16': dict(
        patch_size=16, embed_dim=1024, depth=24, num_heads=16,
        decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
    'mae_vit_huge_patch14': dict(
        patch_size=14, embed_dim=1280, depth=32, num_heads=16,
        decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
}
