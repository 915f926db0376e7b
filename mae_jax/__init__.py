"""mae_jax: Masked Autoencoders (He et al. 2021) in JAX/Flax.

Public API: model constructors by name (MAE, ViT classifier, ViTPose),
`create_model`, `load` / `save` of checkpoint directories (converted files
and training workdirs alike); the PyTorch converter lives in
`mae_jax.convert`, top-down pose inference in `mae_jax.pose`.

Importing the package needs only the core install: TensorFlow (extra
`data`), matplotlib (`viz`) and PyTorch (`torch`) are imported by the modules
that use them, when they are used.
"""
import functools

from mae_jax.checkpoint import load, save
from mae_jax.models import (MAE_CONFIGS, POSE_CONFIGS, VIT_CONFIGS,
                            create_model)

__version__ = '0.1.0'

mae_vit_tiny_patch8 = functools.partial(create_model, 'mae_vit_tiny_patch8')
mae_vit_base_patch16 = functools.partial(create_model, 'mae_vit_base_patch16')
mae_vit_large_patch16 = functools.partial(create_model, 'mae_vit_large_patch16')
mae_vit_huge_patch14 = functools.partial(create_model, 'mae_vit_huge_patch14')
vit_tiny_patch8 = functools.partial(create_model, 'vit_tiny_patch8')
vit_base_patch16 = functools.partial(create_model, 'vit_base_patch16')
vit_large_patch16 = functools.partial(create_model, 'vit_large_patch16')
vit_huge_patch14 = functools.partial(create_model, 'vit_huge_patch14')
vitpose_base_patch16 = functools.partial(create_model, 'vitpose_base_patch16')
vitpose_large_patch16 = functools.partial(create_model,
                                          'vitpose_large_patch16')
vitpose_huge_patch16 = functools.partial(create_model, 'vitpose_huge_patch16')

__all__ = [
    'create_model', 'load', 'save', 'MAE_CONFIGS', 'VIT_CONFIGS',
    'POSE_CONFIGS',
    'mae_vit_tiny_patch8', 'mae_vit_base_patch16', 'mae_vit_large_patch16',
    'mae_vit_huge_patch14', 'vit_tiny_patch8', 'vit_base_patch16',
    'vit_large_patch16', 'vit_huge_patch14', 'vitpose_base_patch16',
    'vitpose_large_patch16', 'vitpose_huge_patch16',
]
