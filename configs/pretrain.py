"""MAE pretraining: `--config configs/pretrain.py:VARIANT`.

Variants: tiny (embedded images, CPU, minutes), base, large, huge (ImageNet
via tfds `imagenet2012`, the pretraining recipe of He et al. 2021, "Masked
Autoencoders Are Scalable Vision Learners", appendix A.1, Table 8; the
official code's main_pretrain.py).
"""
import ml_collections

from mae_jax.config_check import IMAGENET_MEAN, IMAGENET_STD

VARIANTS = {
    'tiny': dict(model='mae_vit_tiny_patch8', image_size=64, dataset='embedded',
                 batch_size=32, epochs=0, total_steps=600, warmup_epochs=0,
                 warmup_steps=40, blr=1.5e-3, norm_pix_loss=False,
                 dtype='float32', checkpoint_every_steps=200,
                 log_every_steps=50, figure_every_steps=200),
    'base': dict(model='mae_vit_base_patch16'),
    'large': dict(model='mae_vit_large_patch16'),
    'huge': dict(model='mae_vit_huge_patch14'),
}


def get_config(arg='tiny'):
  """Returns the locked config of a variant; unknown fields fail."""
  if arg not in VARIANTS:
    raise ValueError(f'unknown pretraining variant {arg!r}; '
                     f'choose one of {", ".join(VARIANTS)}')
  v = dict(
      image_size=224, dataset='imagenet2012', batch_size=4096, epochs=800,
      total_steps=0, warmup_epochs=40, warmup_steps=0, blr=1.5e-4,
      norm_pix_loss=True, dtype='bfloat16', checkpoint_every_steps=1000,
      log_every_steps=100, figure_every_steps=5000)
  v.update(VARIANTS[arg])
  c = ml_collections.ConfigDict()
  c.task = 'pretrain'
  c.variant = arg
  c.model = v['model']
  c.mask_ratio = 0.75
  c.norm_pix_loss = v['norm_pix_loss']
  c.dtype = v['dtype']               # compute dtype; parameters stay float32
  c.attention = 'default'            # 'default' ('chunked' on CPU, else XLA's),
                                     # 'xla', 'chunked' or 'cudnn' (GPU only)
  c.remat = False                    # recompute block activations in backward
  c.fuse_patch_gather = True         # embed only the visible patches
  c.scan_blocks = False              # nn.scan over blocks: faster compiles,
                                     # params stacked (saved in that layout)

  c.data = ml_collections.ConfigDict()
  c.data.name = v['dataset']         # 'embedded', 'folder' or a tfds name
  c.data.data_dir = ml_collections.config_dict.placeholder(str)
  c.data.split = 'train'
  c.data.image_size = ml_collections.FieldReference(  # int or (H, W):
      v['image_size'], field_type=object)  # --config.data.image_size=(64,48)
  c.data.channels = 3                # 3: RGB; 1: grayscale (PIL 'L')
  c.data.mean = IMAGENET_MEAN        # per channel, of [0, 1] pixels:
  c.data.std = IMAGENET_STD          # --config.data.mean=(0.5,) for 1 channel
  c.data.on_error = 'skip'           # unreadable image files: 'skip' | 'fail'
  c.data.max_pixels = 89_478_485     # larger images are skipped (PIL's limit)
  c.data.shuffle_buffer = 10_000     # TFDS examples in the shuffle buffer
  c.data.repeats = ml_collections.config_dict.placeholder(int)  # copies of
                                     # each embedded photo per epoch; None:
                                     # an epoch of at least 256 examples
  c.data.image_key = 'image'         # TFDS feature names
  c.data.label_key = 'label'

  c.batch_size = v['batch_size']     # global batch of one micro-step
  c.accum_iter = 1                   # effective batch = batch_size * accum_iter
  c.blr = v['blr']                   # lr = blr * effective batch / 256
  c.weight_decay = 0.05
  c.b1, c.b2 = 0.9, 0.95
  c.epochs = v['epochs']
  c.warmup_epochs = v['warmup_epochs']
  c.total_steps = v['total_steps']   # optimizer updates; > 0 overrides epochs
  c.warmup_steps = v['warmup_steps']  # > 0 overrides warmup_epochs
  c.min_lr = 0.0

  c.seed = 0
  c.mesh = (-1, 1)                   # (data, fsdp); -1 takes the remaining devices
  c.checkpoint_every_steps = v['checkpoint_every_steps']
  c.keep_checkpoints = 3
  c.log_every_steps = v['log_every_steps']
  c.figure_every_steps = v['figure_every_steps']
  c.skip_nonfinite = False           # True: skip NaN/Inf updates, else stop
  c.resume_override = ''             # 'total_steps,epochs': config fields a
                                     # resumed run may change (every field
                                     # but the logging/checkpoint/execution
                                     # ones must match its checkpoint)
  c.lock()
  return c
