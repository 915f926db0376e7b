"""Optional dependencies: a module used without its install extra fails with
one line naming the extra to install (the extras are listed in setup.py);
imports of optional modules that a library would load needlessly can be
made to fail while it is imported (`imports_failing`)."""
import contextlib
import importlib
import sys

from mae_jax.errors import MissingExtraError


def require(module, extra, purpose=None):
  """Imports and returns `module`; if it (or a parent package) is not
  installed, raises MissingExtraError naming `pip install 'mae_jax[extra]'`.

  An installed module that fails to import (a broken installation, a missing
  dependency of its own) raises its own error unchanged.
  """
  try:
    return importlib.import_module(module)
  except ModuleNotFoundError as e:
    if not e.name or not (module == e.name or module.startswith(e.name + '.')):
      raise
    what = f' for {purpose}' if purpose else ''
    raise MissingExtraError(
        f'{e.name} is not installed; it is needed{what}: '
        f"pip install 'mae_jax[{extra}]'") from None


@contextlib.contextmanager
def imports_failing(*names):
  """Within the block, `import NAME` raises ImportError for each of `names`
  not yet imported; afterwards they import normally. For libraries that
  import an optional module and carry on without it when that fails."""
  blocked = [name for name in names if name not in sys.modules]
  for name in blocked:
    sys.modules[name] = None
  try:
    yield
  finally:
    for name in blocked:
      if name in sys.modules and sys.modules[name] is None:
        del sys.modules[name]
