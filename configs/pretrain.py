"""MAE pretraining: `--config configs/pretrain.py:VARIANT`.

Variants: tiny (embedded images, CPU, minutes), base, large, huge (ImageNet
via tfds `imagenet2012`, the pretraining recipe of He et al. 2021, "Masked
Autoencoders Are Scalable Vision Learners", appendix A.1, Table 8; the
official code's main_pretrain.py). Fields and their defaults (the base
recipe): mae_jax/schema.py.
"""
from mae_jax import schema

VARIANTS = {
    'tiny': dict(model='mae_vit_tiny_patch8',
                 data=dict(name='embedded', image_size=64), batch_size=32,
                 epochs=0, total_steps=600, warmup_epochs=0, warmup_steps=40,
                 blr=1.5e-3, norm_pix_loss=False, dtype='float32',
                 checkpoint_every_steps=200, log_every_steps=50,
                 figure_every_steps=200),
    'base': dict(model='mae_vit_base_patch16'),
    'large': dict(model='mae_vit_large_patch16'),
    'huge': dict(model='mae_vit_huge_patch14'),
}


def get_config(arg='tiny'):
  """Returns the locked config of a variant; unknown fields fail."""
  if arg not in VARIANTS:
    raise ValueError(f'unknown pretraining variant {arg!r}; '
                     f'choose one of {", ".join(VARIANTS)}')
  return schema.config('pretrain', variant=arg, **VARIANTS[arg])
