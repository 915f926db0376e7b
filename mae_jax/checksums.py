"""Per-leaf checksums of parameter and optimizer trees: a flipped bit in a
checkpoint is found when it is read back.

`tree_checksums(tree)` computes, on device and in one jitted call, one
16-hex-digit checksum per leaf of a tree of jax.Arrays (sharded global arrays
included); `numpy_tree_checksums(tree)` computes the same values from NumPy
arrays (what `mae_jax.load` restores). Keys are the leaves' '/'-joined paths
('blocks_0/attn/qkv/kernel'). `verify` compares saved checksums with fresh
ones and raises CorruptCheckpointError naming the first leaf that differs.

The hash. A leaf's bytes are read as unsigned lanes x_0 .. x_{n-1} in
row-major order and widened to uint32: 32-bit dtypes are one uint32 lane per
element, 16-bit dtypes (bfloat16, float16, int16) one uint16 lane, 8-bit
dtypes and bool one uint8 lane, 64-bit dtypes two uint32 lanes (low word
first, as in little-endian memory). With all arithmetic mod 2^32:

  h1 = sum_i x_i * (2i + 1)
  h2 = sum_i mix(x_i) * w(i),   w(i) = (i * 0x9E3779B9 + 0x7F4A7C15) | 1

where mix is the MurmurHash3 32-bit finalizer (xor-shifts and odd
multiplies, hence a bijection of uint32). The checksum is h1 and h2 as eight
hex digits each.

Certain detection of one flipped bit (indeed of any change confined to one
lane): such a change replaces x_i by x_i' != x_i, a difference
d = x_i' - x_i that is nonzero mod 2^32 (a lane holds at most 32 bits; a
flipped bit k gives d = +-2^k). h1 changes by d * (2i + 1); an odd number is
invertible mod 2^32, so d * (2i + 1) != 0 mod 2^32 and h1 differs. The same
holds for h2: mix is a bijection, so mix(x_i') - mix(x_i) != 0, and w(i) is
odd. h2 mixes the values non-linearly, so damage to several lanes that
cancels in the linear h1 is unlikely to cancel in h2 as well (about 2^-32
for unrelated changes; not certain).

Order and sharding: integer addition mod 2^32 is associative and
commutative, so the sums are exact whatever order a device, a mesh of
devices or several processes add the terms in: the checksum of a leaf
depends only on its values, never on its sharding. Flat indices of 2^32
lanes or more wrap mod 2^32 (i and i + 2^32 share weights), which only
matters for a single leaf of over 4 billion lanes; a flip there is still
detected by the argument above.

Cost (benchmarks/checksum_cost.py, results in
benchmarks/results/checksum_cost.md): XLA's CPU backend does not fuse these
integer products into the sums, so on a CPU `tree_checksums` writes
per-leaf temporaries and takes about as long as a full orbax save of the
same state; `numpy_tree_checksums` works in cache-sized chunks and is
several times faster there.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from mae_jax.errors import CorruptCheckpointError
from mae_jax.tree import map_with_name, path_name

_GOLDEN, _OFFSET = np.uint32(0x9E3779B9), np.uint32(0x7F4A7C15)
_M1, _M2 = np.uint32(0x85EBCA6B), np.uint32(0xC2B2AE35)
_CHUNK = 1 << 16
_ARANGE = np.arange(_CHUNK, dtype=np.uint32)


def _mix(x):
  """MurmurHash3's 32-bit finalizer; works on jnp and np uint32 arrays."""
  x = x ^ (x >> 16)
  x = x * _M1
  x = x ^ (x >> 13)
  x = x * _M2
  return x ^ (x >> 16)


def _hex(h1, h2):
  return f'{int(h1):08x}{int(h2):08x}'


# ------------------------------------------------------------------ JAX
def _lanes(x):
  """uint32 lanes of a jax array (64-bit dtypes: a trailing axis of 2)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}
  return jax.lax.bitcast_convert_type(
      x, unsigned[x.dtype.itemsize]).astype(jnp.uint32)


def _flat_index(shape):
  """Row-major flat index mod 2^32 of every position of `shape`, built from
  per-axis iotas (no reshape, so a sharded operand stays where it is)."""
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    iota = jax.lax.broadcasted_iota(jnp.uint32, shape, axis)
    index = index + iota * jnp.uint32(stride % 2**32)
    stride *= shape[axis]
  return index


@jax.jit  # inside `_summer`: traced once per leaf shape and dtype
def _leaf_sums(x):
  """(2,) uint32: h1 and h2 of one leaf."""
  x = _lanes(x)
  i = _flat_index(x.shape)
  h1 = jnp.sum(x * (i * 2 + 1), dtype=jnp.uint32)
  h2 = jnp.sum(_mix(x) * ((i * _GOLDEN + _OFFSET) | 1), dtype=jnp.uint32)
  return jnp.stack([h1, h2])


@functools.lru_cache(maxsize=None)
def _summer(out_sharding):
  """The jitted (leaves) -> (n_leaves, 2) uint32 sums, replicated over the
  mesh of the inputs so every process can read them."""
  return jax.jit(lambda leaves: jnp.stack([_leaf_sums(x) for x in leaves]),
                 out_shardings=out_sharding)


def tree_checksums(tree):
  """{leaf name: 16 hex digits} of a tree of jax.Arrays, computed on device.

  One jitted call sums every leaf where its shards are (no host copy of
  the tree; only the 8 bytes per leaf come back). Leaves may be sharded over
  any mesh, across processes too; the result does not depend on it and
  equals `numpy_tree_checksums` of the same values.
  """
  named, _ = jax.tree_util.tree_flatten_with_path(tree)
  if not named:
    return {}
  names = [path_name(path) for path, _ in named]
  leaves = [jnp.asarray(x) for _, x in named]
  sharding = getattr(leaves[0], 'sharding', None)
  out = (jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
         if isinstance(sharding, jax.sharding.NamedSharding) else None)
  sums = np.asarray(jax.device_get(_summer(out)(leaves)))
  return {name: _hex(*row) for name, row in zip(names, sums)}


# ---------------------------------------------------------------- NumPy
def numpy_checksum(x):
  """The checksum of one NumPy array (or scalar), as `tree_checksums`."""
  x = np.ascontiguousarray(x)
  if x.dtype.kind not in 'biuf' and x.dtype.itemsize not in (1, 2):
    raise TypeError(f'cannot checksum an array of dtype {x.dtype}; '
                    'expected a bool, integer or floating-point dtype')
  if x.dtype.byteorder == '>':
    x = x.astype(x.dtype.newbyteorder('<'))
  unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint32}
  lanes = x.reshape(-1).view(unsigned[x.dtype.itemsize])
  h1 = h2 = 0
  for start in range(0, lanes.size, _CHUNK):  # cache-sized temporaries
    chunk = lanes[start:start + _CHUNK].astype(np.uint32)
    i = _ARANGE[:chunk.size] + np.uint32(start % 2**32)
    h1 += int(np.sum(chunk * (i * 2 + 1), dtype=np.uint32))
    h2 += int(np.sum(_mix(chunk) * ((i * _GOLDEN + _OFFSET) | 1),
                     dtype=np.uint32))
  return _hex(h1 % 2**32, h2 % 2**32)


def numpy_tree_checksums(tree):
  """{leaf name: 16 hex digits} of a tree of NumPy arrays; the same values
  as `tree_checksums` gives for the same arrays on device."""
  out = {}

  def add(name, x):
    try:
      out[name] = numpy_checksum(x)
    except TypeError as e:
      raise TypeError(f'{name}: {e}') from None

  map_with_name(add, tree)
  return out


# --------------------------------------------------------------- verify
def _some(names, limit=3):
  names = sorted(names)
  more = f' and {len(names) - limit} more' if len(names) > limit else ''
  return f'{names[:limit]}{more}'


def verify(saved, actual, where, advice=''):
  """Raises CorruptCheckpointError unless `actual` matches `saved`.

  Both are {item: {leaf name: checksum}} (e.g. {'params': ...}); every
  item of `actual` is checked, leaves in the order of `actual`. The one-line
  message is '{where} is corrupt: ...' naming the item and the first leaf
  that differs (or the leaves that only one side has), then `advice`.
  """
  for item, sums in actual.items():
    if item not in saved:
      raise CorruptCheckpointError(
          f'{where} is corrupt: it has no saved checksums for {item}{advice}')
    want = saved[item]
    missing, extra = set(want) - set(sums), set(sums) - set(want)
    if missing or extra:
      raise CorruptCheckpointError(
          f'{where} is corrupt: {item} leaves differ from its saved '
          f'checksums (saved only: {_some(missing)}; read only: '
          f'{_some(extra)}){advice}')
    for name, value in sums.items():
      if want[name] != value:
        raise CorruptCheckpointError(
            f'{where} is corrupt: {item} leaf {name!r} does not match its '
            f'saved checksum{advice}')
