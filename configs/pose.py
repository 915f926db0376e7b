"""Pose estimation (ViTPose): `--config configs/pose.py:VARIANT`.

Variants: tiny (the generated keypoint set of mae_jax.pose.synthetic,
64 x 48 crops, CPU, minutes), base, large, huge (COCO keypoints in
config.data.data_dir, 256 x 192; the official recipes of Xu et al. 2022,
ViTPose_{base,large,huge}_coco_256x192.py: layer decay 0.75 / 0.8 / 0.85
over 12 / 16 / 32 layers, drop path 0.3 / 0.5 / 0.55). Start from MAE
weights with --config.init_from (a pretraining workdir, a converted
checkpoint or an official .pth). Fields and their defaults (the base
recipe): mae_jax/schema.py.
"""
from mae_jax import schema

VARIANTS = {
    # 64 x 48 crops (32 x 24 heatmaps), lr 2e-3. Measured (seed 0, 2
    # cores): from random init OKS AP 0.067 after 600 updates at lr
    # 1.25e-4, 0.221 at lr 1e-3, 0.445 after 1200 at lr 2e-3 (4.5 min);
    # from the tiny MAE 0.435 after 1200. 128 x 96 crops cost 4x the time.
    'tiny': dict(model='vitpose_tiny_patch8', head='classic',
                 data=dict(name='synthetic', split='train', eval_split='val',
                           image_size=(64, 48)),
                 batch_size=32, epochs=0, total_steps=2000, warmup_steps=50,
                 blr=1.6e-2, layer_decay=0.9, layer_decay_depth=4,
                 drop_path=0.1, dtype='float32', checkpoint_every_steps=500,
                 log_every_steps=50, eval_every_steps=1000,
                 figure_every_steps=1000),
    'base': dict(model='vitpose_base_patch16'),
    'large': dict(model='vitpose_large_patch16', layer_decay=0.8,
                  layer_decay_depth=16, drop_path=0.5),
    'huge': dict(model='vitpose_huge_patch16', layer_decay=0.85,
                 layer_decay_depth=32, drop_path=0.55),
}


def get_config(arg='tiny'):
  """Returns the locked config of a variant; unknown fields fail."""
  if arg not in VARIANTS:
    raise ValueError(f'unknown pose variant {arg!r}; choose one of '
                     f'{", ".join(VARIANTS)}')
  return schema.config('pose', variant=arg, **VARIANTS[arg])
