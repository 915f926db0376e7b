"""Optional dependencies: a module used without its install extra fails with
one line naming the extra to install."""
import importlib


class MissingExtraError(ImportError):
  """An optional dependency is not installed."""


def require(module, extra, purpose=None):
  """Imports and returns `module`; if it is missing, raises
  MissingExtraError naming `pip install 'mae_jax[extra]'`."""
  try:
    return importlib.import_module(module)
  except ImportError as e:
    top = module.split('.')[0]
    if getattr(e, 'name', None) not in (None, module, top) and not (
        e.name or '').startswith(top):
      raise  # the module exists but one of its own imports is broken
    what = f' for {purpose}' if purpose else ''
    raise MissingExtraError(
        f'{module} is not installed; it is needed{what}: '
        f"pip install 'mae_jax[{extra}]'") from None
