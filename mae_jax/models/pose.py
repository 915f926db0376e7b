"""ViTPose: a plain ViT with a heatmap head for top-down 2D pose estimation.

Xu et al., "ViTPose: Simple Vision Transformer Baselines for Human Pose
Estimation" (NeurIPS 2022, arXiv 2204.12484); official code
ViTAE-Transformer/ViTPose (mmpose). The backbone is the MAE encoder with
three differences, all of the official code:
- the patch embedding is a p x p convolution with stride p and *padding 2*:
  for a side that is a multiple of p the grid is unchanged (16 x 12 for
  256 x 192 input) but every patch is shifted up-left by 2 px;
- no cls token in the sequence: the learned position table (1, 1 + L, D)
  keeps a cls row, which is added to every patch position
  (pos[:, 1:] + pos[:, :1]);
- the blocks' output goes through `last_norm` and is reshaped to the
  (N, gh, gw, D) feature map.

Heads (images (N, H, W, C) -> heatmaps (N, H/4, W/4, num_joints), NHWC):
- 'classic' (mmpose TopdownHeatmapSimpleHead): 2 x [ConvTranspose 4x4
  stride 2 padding 1 (computed by output phase), no bias, `head_width` channels -> BatchNorm (PyTorch's
  BatchNorm2d; running statistics in 'batch_stats') -> ReLU], then a 1x1
  conv to the joints;
- 'simple': ReLU -> bilinear upsampling x4 (align_corners=False) -> 3x3 conv
  (padding 1) to the joints.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from mae_jax.models import layers
from mae_jax.models.batchnorm import TorchBatchNorm
from mae_jax.models.blocks import block_stack, run_stack
from mae_jax.models.products import Conv, broadcast_cast, conv

HEADS = ('classic', 'simple')
_HEAD_INIT = nn.initializers.normal(0.001)  # the official heads' conv init


class ConvTranspose(nn.Module):
  """torch.nn.ConvTranspose2d(kernel 4, stride 2, padding 1, no bias), the
  classic head's upsampling, NHWC: (N, h, w, C_in) -> (N, 2h, 2w, C_out).

  The kernel is stored (4, 4, C_in, C_out): PyTorch's (C_in, C_out, 4, 4)
  weight with its spatial axes first. Computed as four 2 x 2 convolutions
  of the input, one per output phase, interleaved: along each axis, output
  2a takes x[a - 1] * W[3] + x[a] * W[1] and output 2a + 1 takes
  x[a] * W[2] + x[a + 1] * W[0] (out = 2 * in - 2 * padding + kernel - 2,
  input index (out + padding - tap) / stride). A quarter of the work of the
  zero-dilated convolution, with the same sums.
  """
  features: int
  dtype: object = jnp.float32
  param_dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', _HEAD_INIT,
                        (4, 4, x.shape[-1], self.features), self.param_dtype)
    x = jnp.pad(x.astype(self.dtype), ((0, 0), (1, 1), (1, 1), (0, 0)))
    n, hp, wp, _ = x.shape
    h, w = hp - 2, wp - 2
    # phase -> (first padded input row of the window, taps in window order)
    taps = {0: (0, (3, 1)), 1: (1, (2, 0))}
    phases = []
    for ry in (0, 1):
      row = []
      y0, ty = taps[ry]
      for rx in (0, 1):
        x0, tx = taps[rx]
        k = kernel[jnp.array(ty)][:, jnp.array(tx)]  # (2, 2, C_in, C_out)
        row.append(conv(x[:, y0:y0 + h + 1, x0:x0 + w + 1], k, None,
                        self.dtype))
      phases.append(jnp.stack(row, axis=3))  # (N, h, w, 2, C_out)
    out = jnp.stack(phases, axis=2)  # (N, h, 2, w, 2, C_out)
    return out.reshape(n, 2 * h, 2 * w, self.features)


class ViTPose(layers.ImageInput):
  """Backbone + heatmap head; `img_size` is (H, W) (default 256 x 192).

  `__call__(imgs, train)` gives heatmaps (N, H/4, W/4, num_joints) (the
  classic head's BatchNorm uses and, with train=True and
  mutable=['batch_stats'], updates its running statistics; stochastic depth
  needs a 'dropout' RNG when train=True); `features(imgs)` the backbone's
  (N, gh, gw, D) map after `last_norm`. Parameter names of the backbone
  follow the MAE encoder (patch_embed, pos_embed, blocks_{i}, last_norm), so
  pretrained MAE weights load by name.
  """
  img_size: object = (256, 192)
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  drop_path_rate: float = 0.3
  num_joints: int = 17
  head: str = 'classic'
  head_width: int = 256  # channels of the classic head's deconvolutions
  upsample: int = 4  # the simple head's bilinear factor
  patch_padding: int = 2
  weight_init: str = 'vitpose'  # from scratch as the official backbone

  def __post_init__(self):
    super().__post_init__()
    if self.head not in HEADS:
      raise ValueError(f'head={self.head!r} is not one of {", ".join(HEADS)}')
    if not 0 <= 2 * self.patch_padding < self.patch_size:
      raise ValueError(f'patch_padding={self.patch_padding} must be in '
                       f'[0, patch_size/2) (patch_size={self.patch_size}) to '
                       'keep the patch grid')

  @property
  def heatmap_size(self):
    """(h, w) of the heatmaps: the patch grid times 4."""
    gh, gw = self.grid_size
    return 4 * gh, 4 * gw

  def __call__(self, imgs, train=False):
    """(N, H, W, C) normalised images -> (N, h, w, num_joints) heatmaps."""
    return self._forward(imgs, train, heatmaps=True)

  def features(self, imgs):
    """(N, H, W, C) -> (N, gh, gw, D) backbone map (no stochastic depth)."""
    return self._forward(imgs, False, heatmaps=False)

  @nn.compact
  def _forward(self, imgs, train, heatmaps):
    self._check_images(imgs)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    gh, gw = self.grid_size
    p, pad = self.patch_size, self.patch_padding
    # The padded convolution's windows, as non-overlapping patches.
    x = jnp.pad(imgs, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    x = x[:, :gh * p, :gw * p]
    x = layers.PatchEmbed(p, self.embed_dim, weight_init=self.weight_init,
                          name='patch_embed', **kw)(x)
    # Official init: trunc_normal_(std=0.02), truncated at +-2 (absolute),
    # which for std 0.02 is a plain normal.
    pos = self.param('pos_embed', nn.initializers.normal(0.02),
                     (1, 1 + gh * gw, self.embed_dim), self.param_dtype)
    x = x + broadcast_cast(pos[:, 1:] + pos[:, :1], x.shape, x.dtype)
    blocks = block_stack(self, 'blocks', self.depth, self.num_heads,
                         self.drop_path_rate, deterministic=not train)
    x = run_stack(blocks, x, self.depth, deterministic=not train)
    x = nn.LayerNorm(epsilon=self.norm_eps, name='last_norm', **kw)(x)
    x = x.reshape(x.shape[0], gh, gw, self.embed_dim)
    if not heatmaps:
      return x
    return self._head(x, train, kw)

  def _head(self, x, train, kw):
    head_conv = functools.partial(Conv, kernel_init=_HEAD_INIT, **kw)
    if self.head == 'simple':
      x = jax.nn.relu(x)
      n, h, w, d = x.shape
      # Upsampling by an integer factor: jax.image.resize's half-pixel
      # bilinear equals PyTorch's align_corners=False, edges included.
      x = jax.image.resize(x, (n, h * self.upsample, w * self.upsample, d),
                           'bilinear')
      return head_conv(self.num_joints, kernel_size=3, padding=1,
                       name='final_layer')(x)
    for i in range(2):
      x = ConvTranspose(self.head_width, name=f'deconv_{i}', **kw)(x)
      x = TorchBatchNorm(affine=True, count_batches=True, name=f'bn_{i}')(
          x, train).astype(x.dtype)
      x = jax.nn.relu(x)
    return head_conv(self.num_joints, name='final_layer')(x)


POSE_CONFIGS = {
    # The encoder of mae_vit_tiny_patch8 at 128 x 96: 64 x 48 heatmaps.
    'vitpose_tiny_patch8': dict(img_size=(128, 96), patch_size=8,
                                embed_dim=192, depth=4, num_heads=3,
                                drop_path_rate=0.1, head_width=64),
    'vitpose_base_patch16': dict(patch_size=16, embed_dim=768, depth=12,
                                 num_heads=12, drop_path_rate=0.3),
    'vitpose_large_patch16': dict(patch_size=16, embed_dim=1024, depth=24,
                                  num_heads=16, drop_path_rate=0.5),
    'vitpose_huge_patch16': dict(patch_size=16, embed_dim=1280, depth=32,
                                 num_heads=16, drop_path_rate=0.55),
}
