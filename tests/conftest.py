"""Test set-up: CPU only, 8 simulated devices for sharding tests, fp32 dots,
one persistent compilation cache for the whole run."""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
flags = os.environ.get('XLA_FLAGS', '')
if 'xla_force_host_platform_device_count' not in flags:
  os.environ['XLA_FLAGS'] = (
      flags + ' --xla_force_host_platform_device_count=8').strip()

# JAX's persistent compilation cache, shared by this process, the xdist
# workers (started after this runs, with this environment) and every
# subprocess a test starts: a program built again, in another test or
# another run of train.py, is read back instead of compiled. The process
# that makes the directory removes it at exit.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(
      prefix='mae_jax_tests_jax_cache_')
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'],
                  ignore_errors=True)

# timm pulls in triton, whose import segfaults once TensorFlow is loaded;
# loading it first makes the suite independent of module order.
try:
  import timm  # noqa: E402,F401  pylint: disable=unused-import
except ImportError:
  pass

import jax  # noqa: E402  (after the environment is set)

jax.config.update('jax_default_matmul_precision', 'highest')


def pytest_collection_modifyitems(items):
  """Modules marked `long` first, each group in collection order: xdist
  (--dist loadfile) hands out modules in this order, so the minutes-long
  ones start early and the workers end together."""
  items.sort(key=lambda item: item.get_closest_marker('long') is None)
