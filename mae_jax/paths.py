"""Paths a user gives: local (relative or absolute) or object-store URIs.

Every path the project reads or writes goes through `resolve`, which gives an
`etils.epath.Path` (the path library orbax uses): a local path is made
absolute against the current directory (orbax refuses relative ones), and a
URI such as `gs://bucket/run` is kept as it is.
"""
import os

from etils import epath

from mae_jax.errors import ConfigError


def is_uri(path):
  """True for object-store paths such as gs://bucket/dir."""
  return '://' in os.fspath(path)


def resolve(path):
  """epath.Path of `path`: absolute for local paths, unchanged for URIs."""
  path = os.fspath(path)
  if not path:
    raise ConfigError('empty path')
  if is_uri(path):
    return epath.Path(path)
  return epath.Path(os.path.abspath(os.path.expanduser(path)))


def shown(path):
  """`path` for messages: relative to the current directory when it lies
  below it, else as it is (absolute, or a URI)."""
  text = os.fspath(path)
  if is_uri(text):
    return text
  rel = os.path.relpath(text)
  return text if rel.startswith(os.pardir) else rel


def write_atomic(path, data):
  """Writes `data` (bytes, a bytes-like buffer, or str as UTF-8) to `path`
  so that readers see the old file or the whole new one: a local file is
  written to a temporary sibling `.{name}.tmp-{pid}` and renamed over
  `path`; a URI is written directly (an object store replaces an object in
  one write). Returns resolve(path)."""
  path = resolve(path)
  if isinstance(data, str):
    data = data.encode('utf-8')
  if is_uri(path):
    path.write_bytes(data)
    return path
  tmp = path.parent / f'.{path.name}.tmp-{os.getpid()}'
  try:
    tmp.write_bytes(data)
    tmp.replace(path)
  finally:
    tmp.unlink(missing_ok=True)
  return path
