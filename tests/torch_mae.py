"""PyTorch reference MAE written from the paper's description (He et al. 2021,
arXiv:2111.06377) and the official key layout, on timm's Block/PatchEmbed,
plus builders for every official checkpoint file kind (random weights).

Key names are the official ones: cls_token, pos_embed, patch_embed.proj,
blocks.{i}.*, norm, decoder_embed, mask_token, decoder_pos_embed,
decoder_blocks.{i}.*, decoder_norm, decoder_pred.
"""
import argparse
import functools

import numpy as np
import torch
from timm.models.vision_transformer import Block, PatchEmbed, VisionTransformer
from torch import nn

from mae_jax.models import MAE_CONFIGS

LayerNorm = functools.partial(nn.LayerNorm, eps=1e-6)


def sincos_table(dim, grid):
  """(1 + grid*grid, dim) float32: x half then y half, [sin, cos], cls row 0."""
  omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
  ys, xs = np.meshgrid(np.arange(grid, dtype=np.float64),
                       np.arange(grid, dtype=np.float64), indexing='ij')

  def emb(pos):
    out = np.outer(pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
  table = np.concatenate([emb(xs), emb(ys)], axis=1)
  return np.concatenate([np.zeros((1, dim)), table]).astype(np.float32)


class TorchMAE(nn.Module):
  """forward(imgs (N, 3, H, W), mask_ratio, noise (N, L)) -> loss, pred, mask."""

  def __init__(self, img_size=224, patch_size=16, embed_dim=1024, depth=24,
               num_heads=16, decoder_embed_dim=512, decoder_depth=8,
               decoder_num_heads=16, mlp_ratio=4.0, norm_pix_loss=False):
    super().__init__()
    block = functools.partial(Block, mlp_ratio=mlp_ratio, qkv_bias=True,
                              norm_layer=LayerNorm)
    self.patch_size, self.norm_pix_loss = patch_size, norm_pix_loss
    self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim)
    grid = img_size // patch_size
    self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
    self.pos_embed = nn.Parameter(
        torch.from_numpy(sincos_table(embed_dim, grid))[None],
        requires_grad=False)
    self.blocks = nn.ModuleList(block(embed_dim, num_heads)
                                for _ in range(depth))
    self.norm = LayerNorm(embed_dim)
    self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
    self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
    self.decoder_pos_embed = nn.Parameter(
        torch.from_numpy(sincos_table(decoder_embed_dim, grid))[None],
        requires_grad=False)
    self.decoder_blocks = nn.ModuleList(
        block(decoder_embed_dim, decoder_num_heads)
        for _ in range(decoder_depth))
    self.decoder_norm = LayerNorm(decoder_embed_dim)
    self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * 3)

  def patchify(self, imgs):
    """(N, 3, H, W) -> (N, L, p*p*3) in (p, q, c) order."""
    n, c, height, _ = imgs.shape
    p = self.patch_size
    h = height // p
    x = imgs.reshape(n, c, h, p, h, p)
    return torch.einsum('nchpwq->nhwpqc', x).reshape(n, h * h, p * p * c)

  def forward(self, imgs, mask_ratio, noise):
    x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
    n, length, d = x.shape
    keep = int(length * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, d))
    mask = torch.ones(n, length)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    cls = (self.cls_token + self.pos_embed[:, :1]).expand(n, -1, -1)
    x = torch.cat([cls, x], dim=1)
    for blk in self.blocks:
      x = blk(x)
    x = self.decoder_embed(self.norm(x))
    dd = x.shape[-1]
    tokens = self.mask_token.expand(n, length + 1 - x.shape[1], -1)
    x_ = torch.cat([x[:, 1:], tokens], dim=1)
    x_ = torch.gather(x_, 1, ids_restore[:, :, None].expand(-1, -1, dd))
    x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed
    for blk in self.decoder_blocks:
      x = blk(x)
    pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]
    target = self.patchify(imgs)
    if self.norm_pix_loss:
      mean = target.mean(dim=-1, keepdim=True)
      var = target.var(dim=-1, keepdim=True)  # unbiased
      target = (target - mean) / (var + 1e-6) ** 0.5
    per_patch = ((pred - target) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum(), pred, mask


@torch.no_grad()
def randomize(model, seed=0):
  """Random weights; LayerNorm scales and all biases moved away from their
  init so that a swapped or dropped key changes the output. Fixed sin-cos
  tables are left alone."""
  gen = torch.Generator().manual_seed(seed)
  for name, p in model.named_parameters():
    if name in ('pos_embed', 'decoder_pos_embed') and not p.requires_grad:
      continue
    if name.endswith('bias'):
      p.normal_(0.0, 0.05, generator=gen)
    elif p.ndim == 1:  # LayerNorm scale
      p.normal_(1.0, 0.2, generator=gen)
    elif p.ndim >= 2 and name.endswith('weight'):
      p.normal_(0.0, float(np.prod(p.shape[1:])) ** -0.5, generator=gen)
    else:  # cls/mask tokens, learned pos_embed
      p.normal_(0.0, 0.1, generator=gen)
  return model


def _build(factory, seed):
  """Builds on the meta device (skipping torch's slow default init), then
  allocates and randomises; fixed sin-cos tables are rebuilt."""
  with torch.device('meta'):
    model = factory()
  model = model.to_empty(device='cpu').eval()
  if isinstance(model, TorchMAE):
    with torch.no_grad():
      for name in ('pos_embed', 'decoder_pos_embed'):
        table = getattr(model, name)
        grid = int(round((table.shape[1] - 1) ** 0.5))
        table.copy_(torch.from_numpy(sincos_table(table.shape[2], grid))[None])
  return randomize(model, seed)


def mae_config(size):
  """Registry fields of mae_vit_{size} without the norm_pix default."""
  return dict(MAE_CONFIGS[f'mae_vit_{size}'])


def make_mae(size, seed=0, norm_pix_loss=False):
  cfg = mae_config(size)
  return _build(lambda: TorchMAE(norm_pix_loss=norm_pix_loss, **cfg), seed)


def make_vit(size, global_pool=True, num_classes=10, img_size=None, seed=0):
  """timm VisionTransformer with the official MAE fine-tuning settings."""
  cfg = mae_config(size)
  return _build(lambda: VisionTransformer(
      img_size=img_size or cfg.get('img_size', 224),
      patch_size=cfg['patch_size'], embed_dim=cfg['embed_dim'],
      depth=cfg['depth'], num_heads=cfg['num_heads'], mlp_ratio=4.0,
      qkv_bias=True, num_classes=num_classes, class_token=True,
      global_pool='avg' if global_pool else 'token', fc_norm=global_pool,
      norm_layer=LayerNorm), seed)


def encoder_state(mae):
  """The keys of an mae_pretrain_vit_*.pth (encoder-only) file."""
  return {k: v for k, v in mae.state_dict().items()
          if not k.startswith('decoder_') and k != 'mask_token'}


def training_checkpoint(model):
  """{'model', 'optimizer', 'epoch', 'scaler', 'args'} as the official
  training scripts save them (one AdamW step taken)."""
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
  for p in model.parameters():
    if p.requires_grad:
      p.grad = torch.zeros_like(p)
  opt.step()
  args = argparse.Namespace(model='mae_vit_tiny_patch8', norm_pix_loss=True,
                            mask_ratio=0.75, blr=1.5e-4,
                            min_lr=np.float64(0.0), output_dir='./out')
  scaler = {'scale': 65536.0, 'growth_factor': 2.0, 'backoff_factor': 0.5,
            'growth_interval': 2000, '_growth_tracker': np.int64(17)}
  return {'model': model.state_dict(), 'optimizer': opt.state_dict(),
          'epoch': 3, 'scaler': scaler, 'args': args}


def save_pth(path, state_dict, wrap=True):
  """torch.save({'model': state_dict}) (or the bare dict, timm style)."""
  torch.save({'model': state_dict} if wrap else state_dict, path)
  return path


def mae_parity(size, batch=2, norm_pix_values=(False, True), dtype=None,
               seed=0):
  """Runs the torch reference and the converted mae_jax MAE on the same
  images and noise. Returns {norm_pix: dict(loss, mask_equal, pred_max_abs,
  loss_rel)}. The torch model is freed before JAX runs (memory-lean)."""
  import gc  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from mae_jax import convert  # pylint: disable=import-outside-toplevel
  cfg = mae_config(size)
  img = cfg.get('img_size', 224)
  length = (img // cfg['patch_size']) ** 2
  gen = torch.Generator().manual_seed(seed + 1)
  imgs = torch.randn(batch, 3, img, img, generator=gen)
  noise = torch.rand(batch, length, generator=gen)
  model = make_mae(size, seed)
  ref = {}
  with torch.no_grad():
    for flag in norm_pix_values:
      model.norm_pix_loss = flag
      loss, pred, mask = model(imgs, 0.75, noise)
      ref[flag] = (loss.item(), pred.numpy(), mask.numpy())
  state = dict(model.state_dict())
  del model
  overrides = {} if dtype is None else {'dtype': dtype}
  jmodel, params, _ = convert.from_torch(state)
  del state
  gc.collect()
  models = [jmodel.clone(norm_pix_loss=f, **overrides)
            for f in norm_pix_values]
  run = jax.jit(lambda p, x, n: [m.apply({'params': p}, x, 0.75, noise=n)
                                 for m in models])
  outs = run(params, jnp.asarray(imgs.permute(0, 2, 3, 1).numpy()),
             jnp.asarray(noise.numpy()))
  result = {}
  for flag, (loss, pred, mask) in zip(norm_pix_values, outs):
    rloss, rpred, rmask = ref[flag]
    result[flag] = dict(
        loss=float(loss),
        mask_equal=bool(np.array_equal(np.asarray(mask), rmask)),
        pred_max_abs=float(np.max(np.abs(
            np.asarray(pred, np.float32) - rpred))),
        loss_rel=abs(float(loss) - rloss) / abs(rloss))
  return result


def classifier_parity(size, global_pool, batch=2, dtype=None, seed=0):
  """Max abs logit difference between timm's VisionTransformer and the
  converted mae_jax classifier."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from mae_jax import convert  # pylint: disable=import-outside-toplevel
  vit = make_vit(size, global_pool=global_pool, num_classes=10, seed=seed)
  img = vit.patch_embed.img_size[0]
  imgs = torch.randn(batch, 3, img, img,
                     generator=torch.Generator().manual_seed(seed + 1))
  with torch.no_grad():
    ref = vit(imgs).numpy()
  state = dict(vit.state_dict())
  del vit
  model, params, _ = convert.from_torch(state)
  if dtype is not None:
    model = model.clone(dtype=dtype)
  logits = model.apply({'params': params},
                       jnp.asarray(imgs.permute(0, 2, 3, 1).numpy()))
  return float(np.max(np.abs(np.asarray(logits, np.float32) - ref)))
