"""Pure Flax modules: no file I/O, no TensorFlow."""
from mae_jax.models.geometry import model_input_shape, token_map
from mae_jax.models.mae import MAE_CONFIGS, MaskedAutoencoder
from mae_jax.models.pose import POSE_CONFIGS, ViTPose
from mae_jax.models.scan_layout import (stack_blocks, to_layout,
                                       unstack_blocks)
from mae_jax.models.vit import VIT_CONFIGS, VisionTransformer


def create_model(name, **overrides):
  """Builds a model by registry name, e.g. 'mae_vit_base_patch16' or
  'vitpose_base_patch16'; keyword overrides replace registry fields."""
  if name in MAE_CONFIGS:
    return MaskedAutoencoder(**{**MAE_CONFIGS[name], **overrides})
  if name in VIT_CONFIGS:
    return VisionTransformer(**{**VIT_CONFIGS[name], **overrides})
  if name in POSE_CONFIGS:
    return ViTPose(**{**POSE_CONFIGS[name], **overrides})
  known = ', '.join(sorted(MAE_CONFIGS) + sorted(VIT_CONFIGS)
                    + sorted(POSE_CONFIGS))
  raise ValueError(f'unknown model name {name!r}; known names: {known}')
