"""ViT classifier on the MAE encoder, for fine-tuning and linear probing.

(N, H, W, 3) normalised images -> (N, num_classes) logits. With global_pool
the patch tokens (cls excluded) are averaged and passed through `fc_norm`;
otherwise the cls token goes through `norm`. With linear_probe the head is
BatchNorm without affine (eps 1e-6, state in 'batch_stats') + linear. Parameter names follow the
encoder of `MaskedAutoencoder`, so pretrained weights load by name.
"""
import functools
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mae_jax.models import layers
from mae_jax.models.pos_embed import sincos_2d


class VisionTransformer(nn.Module):
  """Encoder + pooling + head. Stochastic depth rises linearly over blocks
  from 0 to `drop_path_rate`; it needs a 'dropout' RNG when train=True.
  With scan_blocks the per-block rates enter the scan as an array."""
  num_classes: int = 1000
  img_size: int = 224
  patch_size: int = 16
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  global_pool: bool = True
  linear_probe: bool = False  # head = BatchNorm (no affine) + linear
  drop_path_rate: float = 0.1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_impl: Optional[str] = None
  remat: bool = False
  # nn.scan over the blocks (params 'blocks' stacked on a leading layer
  # axis; see mae_jax.models.scan_layout); per-block rates are scanned.
  scan_blocks: bool = False

  @property
  def grid_size(self):
    return self.img_size // self.patch_size

  @nn.compact
  def __call__(self, imgs, train=False, return_features=False):
    """Logits (N, num_classes), or pooled features (N, D) if return_features."""
    if self.img_size % self.patch_size:
      raise ValueError(f'img_size={self.img_size} is not divisible by '
                       f'patch_size={self.patch_size}')
    if tuple(imgs.shape[1:3]) != (self.img_size, self.img_size):
      raise ValueError(f'images of shape {tuple(imgs.shape)} do not match '
                       f'img_size={self.img_size} (NHWC)')
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
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
        [jnp.broadcast_to(cls.astype(x.dtype), (n, 1, self.embed_dim)), x],
        axis=1) + pos.astype(x.dtype)
    rates = np.linspace(0, self.drop_path_rate, self.depth)
    if self.scan_blocks:
      x, _ = layers.scan_block_class(self.remat, self.depth)(
          self.num_heads, self.mlp_ratio, self.drop_path_rate,
          attention_impl=self.attention_impl, deterministic=not train,
          name='blocks', **kw)(x, jnp.asarray(rates, jnp.float32))
    else:
      for i in range(self.depth):  # deterministic positional: static (remat)
        x = layers.block_class(self.remat)(
            self.num_heads, self.mlp_ratio, float(rates[i]),
            attention_impl=self.attention_impl,
            name=f'blocks_{i}', **kw)(x, not train)
    if self.global_pool:
      x = layers.LayerNorm(name='fc_norm', **kw)(jnp.mean(x[:, 1:], axis=1))
    else:
      x = layers.LayerNorm(name='norm', **kw)(x)[:, 0]
    if return_features:
      return x
    std = 2e-5
    if self.linear_probe:
      std = 0.01
      x = nn.BatchNorm(use_running_average=not train, use_bias=False,
                       use_scale=False, epsilon=1e-6, momentum=0.9,
                       dtype=jnp.float32, name='head_bn')(
                           x.astype(jnp.float32))
    head = functools.partial(
        nn.Dense, kernel_init=nn.initializers.truncated_normal(std),
        bias_init=nn.initializers.zeros, dtype=self.dtype,
        param_dtype=self.param_dtype)
    return head(self.num_classes, name='head')(x)


VIT_CONFIGS = {
    'vit_tiny_patch8': dict(img_size=64, patch_size=8, embed_dim=192, depth=4,
                            num_heads=3, drop_path_rate=0.1),
    'vit_base_patch16': dict(patch_size=16, embed_dim=768, depth=12,
                             num_heads=12, drop_path_rate=0.1),
    'vit_large_patch16': dict(patch_size=16, embed_dim=1024, depth=24,
                              num_heads=16, drop_path_rate=0.2),
    'vit_huge_patch14': dict(patch_size=14, embed_dim=1280, depth=32,
                             num_heads=16, drop_path_rate=0.3),
}
