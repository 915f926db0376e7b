"""Variants shared by the fine-tuning and linear-probing configs.

Every field, its default and its allowed values are documented in
mae_jax/schema.py; a variant sets only what differs from those defaults.
"""
from mae_jax import schema

SIZES = schema.VARIANTS
MODELS = {'tiny': 'vit_tiny_patch8', 'base': 'vit_base_patch16',
          'large': 'vit_large_patch16', 'huge': 'vit_huge_patch14'}
# tiny: the embedded labelled task (20 photos, held-out crops), CPU, minutes.
TINY = dict(data=dict(name='embedded', image_size=64), batch_size=32,
            epochs=0, total_steps=300, warmup_epochs=0, warmup_steps=20,
            dtype='float32', checkpoint_every_steps=100, log_every_steps=50,
            eval_every_steps=100)


def classifier_config(task, variant, recipes):
  """Locked config for `task` ('finetune' | 'linprobe') of size `variant`,
  its recipe taken from `recipes` (variant -> values)."""
  if variant not in SIZES:
    raise ValueError(f'unknown {task} variant {variant!r}; choose one of '
                     f'{", ".join(SIZES)}')
  values = dict(recipes[variant], **(TINY if variant == 'tiny' else {}))
  return schema.config(task, variant=variant, model=MODELS[variant], **values)
