"""Linear probing: `--config configs/linprobe.py:VARIANT` (tiny|base|large|huge).

The linear-probing recipe of He et al. 2021 (appendix A.1, Table 10; the official
code's main_linprobe.py): frozen encoder, cls-token feature after `norm`,
BatchNorm (no affine) + linear head, LARS, blr 0.1, wd 0, batch 16384,
90 epochs (50 for large/huge), 10 warmup epochs, crop + flip only.
"""
from configs.common import classifier_config

COMMON = dict(global_pool=False, blr=0.1, min_lr=0.0, weight_decay=0.0,
              batch_size=16384, warmup_epochs=10, drop_path=0.0, mixup=0.0,
              cutmix=0.0, smoothing=0.0, eval_every_steps=78)
RECIPES = {
    'tiny': dict(COMMON, blr=40.0),  # lr 5 at batch 32 (base: 6.4 at 16384)
    'base': dict(COMMON, epochs=90),
    'large': dict(COMMON, epochs=50),
    'huge': dict(COMMON, epochs=50),
}


def get_config(arg='tiny'):
  return classifier_config('linprobe', arg, RECIPES.get(arg, {}))
