"""The masked autoencoder (MAE) and its loss; registry of model sizes.

Images are NHWC float32, already normalised; predictions are patch vectors in
the reference (p, q, c) layout so they compare element for element with the
PyTorch release.
"""
import functools
from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax.numpy as jnp

from mae_jax.models import layers
from mae_jax.models.geometry import (grid_hw, model_input_shape,
                                     normalize_img_size)
from mae_jax.models.layers import layer_indices, plain_block
from mae_jax.models.masking import (draw_noise, gather_tokens,
                                    masking_indices, random_masking)
from mae_jax.models.patches import patchify
from mae_jax.models.pos_embed import sincos_2d


def masked_patch_loss(imgs, pred, mask, patch_size, norm_pix_loss):
  """Mean squared error over removed patches only.

  imgs: (N, H, W, C); pred: (N, L, p*p*C); mask: (N, L), 1 = removed.
  With norm_pix_loss each target patch is normalised by its own mean and
  unbiased (ddof=1) variance. Returns a float32 scalar.
  """
  target = patchify(imgs.astype(jnp.float32), patch_size)
  if norm_pix_loss:
    target = normalize_patches(target)
  per_patch = jnp.mean((pred.astype(jnp.float32) - target) ** 2, axis=-1)
  return jnp.sum(per_patch * mask) / jnp.sum(mask)


def normalize_patches(target, eps=1e-6):
  """(t - mean) / sqrt(var + eps) per patch, unbiased variance. (N, L, P)."""
  mean = jnp.mean(target, axis=-1, keepdims=True)
  var = jnp.var(target, axis=-1, keepdims=True, ddof=1)
  return (target - mean) / jnp.sqrt(var + eps)


def _run_blocks(blocks, x, depth, scanned):
  if scanned:  # no stochastic depth in the MAE: every rate is 0
    x, _ = blocks(x, jnp.zeros((depth,), jnp.float32))
    return x
  for blk in blocks:
    x = blk(x, True)  # deterministic, positional: static under remat
  return x


def _run_blocks_keeping(blocks, x, depth, scanned, wanted, plain):
  """`_run_blocks` that also returns the outputs of the blocks `wanted`
  (indices in [0, depth)): (x, [outputs]). `plain` is an unbound Block with
  the stack's fields, run over the stacked params when scanned."""
  if scanned:
    x, every = layers.scanned_block_outputs(blocks, x, plain, depth)
    return x, [every[i] for i in wanted]
  every = []
  for blk in blocks:
    x = blk(x, True)
    every.append(x)
  return x, [every[i] for i in wanted]


class MaskedAutoencoder(nn.Module):
  """MAE with a ViT encoder that sees only visible patches.

  `__call__(imgs, mask_ratio, noise)` returns (loss, pred, mask) with
  imgs (N, H, W, C), pred (N, L, p*p*C), mask (N, L), L = gh*gw patches of
  the gh x gw grid in raster order. Without `noise`, noise is drawn from the
  'mask' RNG stream. `img_size` is an int (square) or an (H, W) pair (a list
  is taken as a tuple); C is `in_chans`. `features` gives the unmasked
  encoder's tokens.
  """
  img_size: Union[int, Sequence[int]] = 224
  patch_size: int = 16
  in_chans: int = 3
  embed_dim: int = 1024
  depth: int = 24
  num_heads: int = 16
  decoder_embed_dim: int = 512
  decoder_depth: int = 8
  decoder_num_heads: int = 16
  mlp_ratio: float = 4.0
  norm_pix_loss: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_impl: Optional[str] = None  # None/'xla' or 'cudnn' (GPU)
  remat: bool = False  # recompute block activations in the backward pass
  # nn.scan over the encoder and decoder blocks: one traced block per stack
  # (much faster compiles of deep models); params 'blocks'/'decoder_blocks'
  # stacked on a leading layer axis (see mae_jax.models.scan_layout).
  scan_blocks: bool = False
  # Embed only the visible patches (gather patch vectors, then the matmul)
  # instead of embedding all and gathering tokens: same values, 1/4 of the
  # patch-embedding FLOPs at mask ratio 0.75.
  fuse_patch_gather: bool = True

  def __post_init__(self):
    self.img_size = normalize_img_size(self.img_size)
    super().__post_init__()

  @property
  def grid_size(self):
    """(gh, gw): patch rows and columns."""
    return grid_hw(self.img_size, self.patch_size)

  @property
  def num_patches(self):
    gh, gw = self.grid_size
    return gh * gw

  def setup(self):
    _ = self.grid_size  # raises when img_size is not divisible by the patch
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    block = functools.partial(layers.block_class(self.remat),
                              mlp_ratio=self.mlp_ratio,
                              attention_impl=self.attention_impl, **kw)
    token_init = nn.initializers.normal(0.02)
    self.patch_embed = layers.PatchEmbed(self.patch_size, self.embed_dim, **kw)
    self.cls_token = self.param('cls_token', token_init,
                                (1, 1, self.embed_dim), self.param_dtype)
    if self.scan_blocks:
      self.blocks = layers.scan_block_class(self.remat, self.depth)(
          self.num_heads, mlp_ratio=self.mlp_ratio,
          attention_impl=self.attention_impl, **kw)
    else:
      self.blocks = [block(self.num_heads, name=f'blocks_{i}')
                     for i in range(self.depth)]
    self.norm = layers.LayerNorm(**kw)
    self.decoder_embed = layers.Dense(self.decoder_embed_dim, **kw)
    self.mask_token = self.param('mask_token', token_init,
                                 (1, 1, self.decoder_embed_dim),
                                 self.param_dtype)
    if self.scan_blocks:
      self.decoder_blocks = layers.scan_block_class(
          self.remat, self.decoder_depth)(
              self.decoder_num_heads, mlp_ratio=self.mlp_ratio,
              attention_impl=self.attention_impl, **kw)
    else:
      self.decoder_blocks = [block(self.decoder_num_heads,
                                   name=f'decoder_blocks_{i}')
                             for i in range(self.decoder_depth)]
    self.decoder_norm = layers.LayerNorm(**kw)
    self.decoder_pred = layers.Dense(
        self.patch_size ** 2 * self.in_chans, **kw)

  def _check_images(self, imgs):
    expected = model_input_shape(self)
    if imgs.ndim != 4 or tuple(imgs.shape[1:]) != expected:
      raise ValueError(f'images of shape {tuple(imgs.shape)} do not match the '
                       f'model input (N, {expected[0]}, {expected[1]}, '
                       f'{expected[2]}) (NHWC)')

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
    cls = (self.cls_token.astype(self.dtype) + pos[:1].astype(self.dtype))
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, x.shape[2])),
                         x], axis=1)
    x = _run_blocks(self.blocks, x, self.depth, self.scan_blocks)
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
    cls = self.cls_token.astype(self.dtype) + pos[:1]
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, x.shape[2])),
                         x], axis=1)
    if layers is None:
      x = _run_blocks(self.blocks, x, self.depth, self.scan_blocks)
      return self.norm(x)
    wanted = layer_indices(layers, self.depth)
    x, outputs = _run_blocks_keeping(self.blocks, x, self.depth,
                                     self.scan_blocks, wanted,
                                     plain_block(self, self.num_heads))
    return self.norm(x), outputs

  def decode(self, latent, ids_restore):
    """latent (N, 1 + len_keep, D), ids_restore (N, L) -> pred (N, L, p*p*C)."""
    x = self.decoder_embed(latent)
    n, t, d = x.shape
    length = ids_restore.shape[1]
    mask_tokens = jnp.broadcast_to(self.mask_token.astype(x.dtype),
                                   (n, length + 1 - t, d))
    x_ = jnp.concatenate([x[:, 1:], mask_tokens], axis=1)
    x_ = jnp.take_along_axis(x_, ids_restore[:, :, None], axis=1)
    x = jnp.concatenate([x[:, :1], x_], axis=1)
    x = x + sincos_2d(d, self.grid_size).astype(x.dtype)
    x = _run_blocks(self.decoder_blocks, x, self.decoder_depth,
                    self.scan_blocks)
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
# plus a tiny one for tests.
MAE_CONFIGS = {
    'mae_vit_tiny_patch8': dict(
        img_size=64, patch_size=8, embed_dim=192, depth=4, num_heads=3,
        decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4),
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
