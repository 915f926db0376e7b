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
