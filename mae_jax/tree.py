"""Path names for pytree leaves: 'blocks_0/attn/qkv/kernel'."""
import jax


def path_name(path):
  """'/'-joined key path of a leaf, as given by tree_map_with_path."""
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)


def map_with_name(fn, tree):
  """tree_map where fn receives (name, leaf)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: fn(path_name(path), x), tree)
