"""Fine-tuning: `--config configs/finetune.py:VARIANT` (tiny|base|large|huge).

MAE_SPEC section 7: AdamW, layer-wise lr decay, mixup 0.8 / cutmix 1.0,
label smoothing 0.1, RandAugment, random erasing; base blr 5e-4, layer decay
0.65, 100 epochs; large/huge blr 1e-3, layer decay 0.75, 50 epochs.
"""
from configs.common import classifier_config

RECIPES = {
    'tiny': dict(blr=1e-3, layer_decay=0.75),
    'base': dict(blr=5e-4, layer_decay=0.65, epochs=100, drop_path=0.1),
    'large': dict(blr=1e-3, layer_decay=0.75, epochs=50, drop_path=0.2),
    'huge': dict(blr=1e-3, layer_decay=0.75, epochs=50, drop_path=0.3),
}


def get_config(arg='tiny'):
  return classifier_config('finetune', arg, RECIPES.get(arg, {}))
