"""ViT classifier on the MAE encoder, for fine-tuning and linear probing.

(N, H, W, C) normalised images -> (N, num_classes) logits; `img_size` is an
int (square) or an (H, W) pair, C is `in_chans`. With global_pool the patch
tokens (cls excluded) are averaged and passed through `fc_norm`; otherwise
the cls token goes through `norm`. `features` gives the token sequence.
With linear_probe the head is BatchNorm without affine + linear; the
BatchNorm is torch.nn.BatchNorm1d(D, affine=False, eps=1e-6)'s (unbiased
running variance, momentum 0.1; state in 'batch_stats' under 'head_bn').
Parameter names follow the encoder of `MaskedAutoencoder`, so pretrained
weights load by name.
"""
import functools

import flax.linen as nn
import jax.numpy as jnp

from mae_jax.models import layers
from mae_jax.models.batchnorm import TorchBatchNorm
from mae_jax.models.blocks import (block_stack, layer_indices, plain_block,
                                   run_stack, run_stack_keeping)
from mae_jax.models.pos_embed import sincos_2d
from mae_jax.models.products import Dense, broadcast_cast


class VisionTransformer(layers.ImageInput):
  """Encoder + pooling + head. Stochastic depth rises linearly over blocks
  from 0 to `drop_path_rate`; it needs a 'dropout' RNG when train=True.
  With scan_blocks the per-block rates enter the scan as an array."""
  num_classes: int = 1000
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  global_pool: bool = True
  linear_probe: bool = False  # head = BatchNorm (no affine) + linear
  drop_path_rate: float = 0.1

  def __call__(self, imgs, train=False, return_features=False):
    """Logits (N, num_classes), or pooled features (N, D) if return_features."""
    return self._forward(imgs, train, 'pooled' if return_features else
                         'logits', None)

  def features(self, imgs, layers=None):  # pylint: disable=redefined-outer-name
    """Token sequence of the encoder (deterministic: no stochastic depth).

    imgs (N, H, W, C) -> tokens (N, 1 + gh*gw, D): the cls token first, then
    the patch tokens in raster order (`mae_jax.models.token_map` makes the
    (N, gh, gw, D) map). As timm's `forward_features`: after the final
    LayerNorm `norm` for a cls-token model (global_pool=False); with
    global_pool (fc_norm after pooling, no `norm`) the blocks' output as it
    is. With `layers`, a sequence of block indices (negative ones count from
    the end), returns (tokens, outputs): outputs[k] is the (N, 1 + gh*gw, D)
    output of block layers[k], before any norm.
    """
    return self._forward(imgs, False, 'tokens', layers)

  @nn.compact
  def _forward(self, imgs, train, output, keep):
    """output: 'logits', 'pooled' or 'tokens'; keep: block indices whose
    outputs are returned beside the tokens, or None."""
    self._check_images(imgs)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = functools.partial(nn.LayerNorm, epsilon=self.norm_eps, **kw)
    x = layers.PatchEmbed(self.patch_size, self.embed_dim, name='patch_embed',
                          **kw)(imgs)
    n = x.shape[0]
    cls = self.param('cls_token', nn.initializers.normal(0.02),
                     (1, 1, self.embed_dim), self.param_dtype)
    table = sincos_2d(self.embed_dim, self.grid_size)[None]
    pos = self.param('pos_embed',
                     lambda key, shape, dtype: jnp.asarray(table, dtype),
                     table.shape, self.param_dtype)
    x = jnp.concatenate(
        [broadcast_cast(cls, (n, 1, self.embed_dim), x.dtype), x], axis=1)
    x = x + broadcast_cast(pos, x.shape, x.dtype)
    blocks = block_stack(self, 'blocks', self.depth, self.num_heads,
                         self.drop_path_rate, deterministic=not train)
    if keep is None:
      x = run_stack(blocks, x, self.depth, deterministic=not train)
    else:  # deterministic: `keep` comes only from `features`
      x, kept = run_stack_keeping(blocks, x, self.depth,
                                  layer_indices(keep, self.depth),
                                  plain_block(self, self.num_heads))
    if output == 'tokens':
      if not self.global_pool:
        x = norm(name='norm')(x)
      return x if keep is None else (x, kept)
    if self.global_pool:
      x = norm(name='fc_norm')(jnp.mean(x[:, 1:], axis=1))
    else:
      x = norm(name='norm')(x)[:, 0]
    if output == 'pooled':
      return x
    std = 2e-5
    if self.linear_probe:
      std = 0.01
      x = TorchBatchNorm(eps=1e-6, momentum=0.1, name='head_bn')(x, train)
    head = Dense(self.num_classes,
                 kernel_init=nn.initializers.truncated_normal(std),
                 dtype=self.dtype, param_dtype=self.param_dtype, name='head')
    return head(x)


VIT_CONFIGS = {
    'vit_tiny_patch8': dict(img_size=64, patch_size=8, embed_dim=192, depth=4,
                            num_heads=3, drop_path_rate=0.1),
    'vit_tiny_patch4': dict(img_size=28, in_chans=1, patch_size=4,
                            embed_dim=192, depth=4, num_heads=3,
                            drop_path_rate=0.1),
    'vit_base_patch16': dict(patch_size=16, embed_dim=768, depth=12,
                             num_heads=12, drop_path_rate=0.1),
    'vit_large_patch16': dict(patch_size=16, embed_dim=1024, depth=24,
                              num_heads=16, drop_path_rate=0.2),
    'vit_huge_patch14': dict(patch_size=14, embed_dim=1280, depth=32,
                             num_heads=16, drop_path_rate=0.3),
}
