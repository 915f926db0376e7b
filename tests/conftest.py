"""Test set-up: CPU only, 8 simulated devices for sharding tests, fp32 dots."""
import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
flags = os.environ.get('XLA_FLAGS', '')
if 'xla_force_host_platform_device_count' not in flags:
  os.environ['XLA_FLAGS'] = (
      flags + ' --xla_force_host_platform_device_count=8').strip()

# timm pulls in triton, whose import segfaults once TensorFlow is loaded;
# loading it first makes the suite independent of module order.
try:
  import timm  # noqa: E402,F401  pylint: disable=unused-import
except ImportError:
  pass

import jax  # noqa: E402  (after the environment is set)

jax.config.update('jax_default_matmul_precision', 'highest')
