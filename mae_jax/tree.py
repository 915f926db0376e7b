"""Path names for pytree leaves: 'blocks_0/attn/qkv/kernel'."""
import jax


def _key_name(key):
  """A dict key, sequence index or attribute name (optax states are named
  tuples: '0/mu/blocks_0/...')."""
  for field in ('key', 'idx', 'name'):
    if hasattr(key, field):
      return str(getattr(key, field))
  return str(key)


def path_name(path):
  """'/'-joined key path of a leaf, as given by tree_map_with_path."""
  return '/'.join(_key_name(k) for k in path)


def map_with_name(fn, tree):
  """tree_map where fn receives (name, leaf)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: fn(path_name(path), x), tree)
