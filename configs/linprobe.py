"""Linear probing: `--config configs/linprobe.py:VARIANT`
(tiny|digits|base|large|huge; tiny and digits: configs/common.py).

The linear-probing recipe of He et al. 2021 (appendix A.1, Table 10; the official
code's main_linprobe.py): frozen encoder, cls-token feature after `norm`,
BatchNorm (no affine) + linear head, LARS, blr 0.1, wd 0, batch 16384,
90 epochs (50 for large/huge), 10 warmup epochs, crop + flip only.
Fields and their defaults (the base recipe): mae_jax/schema.py.
"""
from configs.common import classifier_config

RECIPES = {
    'tiny': dict(blr=40.0),  # lr 5 at batch 32 (base: 6.4 at 16384)
    # lr 5 at batch 256; no crop or flip (they change a digit's class).
    'digits': dict(blr=5.0, batch_size=256, total_steps=150, warmup_steps=15,
                   data=dict(augment='none')),
    'base': dict(),
    'large': dict(epochs=50),
    'huge': dict(epochs=50),
}


def get_config(arg='tiny'):
  return classifier_config('linprobe', arg, RECIPES)
