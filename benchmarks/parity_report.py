"""Max differences between the PyTorch reference and converted mae_jax models.

Random weights in the official layout (tests/torch_mae.py), batch of 2,
mask ratio 0.75, same noise for both; fp32 compute, and for information bf16
compute (dtype=jnp.bfloat16, fp32 parameters) against the fp32 reference.

  .venv/bin/python benchmarks/parity_report.py [--sizes base_patch16 ...]
"""
import argparse
import os
import pathlib
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from tests.torch_mae import classifier_parity, mae_parity  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sizes', nargs='+', default=[
      'base_patch16', 'large_patch16', 'huge_patch14'])
  args = parser.parse_args()
  print('| model | compute | norm_pix_loss | masks equal | pred max abs diff '
        '| loss rel diff |')
  print('|---|---|---|---|---|---|')
  for size in args.sizes:
    for name, dtype in (('fp32', None), ('bf16', jnp.bfloat16)):
      result = mae_parity(size, batch=2, norm_pix_values=(False, True),
                          dtype=dtype)
      for flag, r in result.items():
        print(f'| mae_vit_{size} | {name} | {flag} | {r["mask_equal"]} | '
              f'{r["pred_max_abs"]:.2e} | {r["loss_rel"]:.2e} |', flush=True)
  print('\n| classifier | compute | logits max abs diff |')
  print('|---|---|---|')
  for size, pool in (('base_patch16', True), ('base_patch16', False)):
    for name, dtype in (('fp32', None), ('bf16', jnp.bfloat16)):
      diff = classifier_parity(size, pool, dtype=dtype)
      label = 'global pool' if pool else 'cls token'
      print(f'| vit_{size} ({label}) | {name} | {diff:.2e} |', flush=True)


if __name__ == '__main__':
  main()
