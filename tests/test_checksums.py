"""Per-leaf checksums (mae_jax.checksums) and their use by mae_jax.load."""
import pathlib
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P

import mae_jax
from mae_jax import checkpoint
from mae_jax.checksums import (numpy_checksum, numpy_tree_checksums,
                               tree_checksums, verify)
from mae_jax.errors import CheckpointError, CorruptCheckpointError


def _tree(seed=0):
  rng = np.random.default_rng(seed)
  return {
      'blocks_0': {'attn': {'qkv': {
          'kernel': rng.standard_normal((16, 24)).astype(np.float32),
          'bias': rng.standard_normal(24).astype(ml_dtypes.bfloat16)}}},
      'count': rng.integers(-2**31, 2**31 - 1, (3, 5)).astype(np.int32),
      'half': rng.standard_normal(6).astype(np.float16),
      'mask': rng.integers(0, 2, 7).astype(bool),
      'bytes': rng.integers(0, 256, 9).astype(np.uint8),
      'scalar': np.float32(3.5),
  }


def test_device_and_numpy_checksums_agree_bit_for_bit():
  tree = _tree()
  want = numpy_tree_checksums(tree)
  assert sorted(want) == ['blocks_0/attn/qkv/bias', 'blocks_0/attn/qkv/kernel',
                          'bytes', 'count', 'half', 'mask', 'scalar']
  assert all(len(v) == 16 and int(v, 16) >= 0 for v in want.values())
  assert len(set(want.values())) == len(want)
  assert tree_checksums(jax.tree.map(jnp.asarray, tree)) == want


@pytest.mark.parametrize('spec', [P('x', 'y'), P('y', 'x'), P(None, 'x'),
                                  P(('x', 'y'), None), P()])
def test_a_sharded_array_has_the_checksum_of_its_values(spec):
  assert len(jax.devices()) == 8
  mesh = jax.make_mesh((4, 2), ('x', 'y'))
  tree = {'kernel': np.random.default_rng(1).standard_normal(
      (16, 24)).astype(np.float32),
          'bias': np.arange(16, dtype=np.int32).astype(ml_dtypes.bfloat16)}
  sharded = {
      'kernel': jax.device_put(tree['kernel'], NamedSharding(mesh, spec)),
      'bias': jax.device_put(tree['bias'],
                             NamedSharding(mesh, P(spec[0] if spec else None)))}
  assert tree_checksums(sharded) == numpy_tree_checksums(tree)


def test_leaves_longer_than_numpys_chunks_agree_with_the_device():
  x = np.random.default_rng(5).standard_normal((3, 70001)).astype(np.float32)
  y = x.astype(ml_dtypes.bfloat16)
  assert tree_checksums({'x': jnp.asarray(x), 'y': jnp.asarray(y)}) == {
      'x': numpy_checksum(x), 'y': numpy_checksum(y)}


def test_64_bit_leaves_agree_on_device_and_in_numpy():
  x = np.random.default_rng(2).integers(-2**62, 2**62, (3, 4), dtype=np.int64)
  with jax.enable_x64(True):
    assert tree_checksums({'x': jnp.asarray(x)}) == {'x': numpy_checksum(x)}


def test_a_prng_key_leaf_has_the_checksum_of_its_key_data():
  key = jax.random.key(3)
  assert tree_checksums({'rng': key}) == {
      'rng': numpy_checksum(np.asarray(jax.random.key_data(key)))}


@pytest.mark.parametrize('dtype', [np.float32, ml_dtypes.bfloat16, np.int32,
                                   np.float16, np.uint8, np.int64])
def test_every_single_bit_flip_changes_the_checksum(dtype):
  x = (np.random.default_rng(3).standard_normal((5, 3)) * 100).astype(dtype)
  before = numpy_checksum(x)
  raw = x.reshape(-1).view(np.uint8)
  changed = set()
  for byte in range(raw.size):          # every bit of every element
    for bit in range(8):
      y = raw.copy()
      y[byte] ^= np.uint8(1 << bit)
      after = numpy_checksum(y.view(x.dtype).reshape(x.shape))
      assert after != before, (byte, bit)
      assert after[:8] != before[:8] and after[8:] != before[8:], (byte, bit)
      changed.add(after)
  assert len(changed) == raw.size * 8   # and no two flips collide here


def test_a_flipped_bit_in_a_sharded_leaf_changes_its_device_checksum():
  mesh = jax.make_mesh((8,), ('x',))
  x = np.random.default_rng(4).standard_normal((64, 8)).astype(np.float32)
  before = tree_checksums(
      {'w': jax.device_put(x, NamedSharding(mesh, P('x')))})
  for index, bit in [((0, 0), 0), ((37, 5), 31), ((63, 7), 17)]:
    y = x.copy()
    y.view(np.uint32)[index] ^= np.uint32(1 << bit)
    after = tree_checksums(
        {'w': jax.device_put(y, NamedSharding(mesh, P('x')))})
    assert after != before
    assert after == numpy_tree_checksums({'w': y})


def test_verify_names_the_first_differing_leaf_and_missing_leaves():
  saved = {'params': {'a': '0' * 16, 'b': '1' * 16}}
  verify(saved, {'params': {'a': '0' * 16, 'b': '1' * 16}}, 'ckpt: step 3')
  with pytest.raises(CorruptCheckpointError,
                     match=r"^ckpt: step 3 is corrupt: params leaf 'b' does "
                           r'not match its saved checksum; try again$'):
    verify(saved, {'params': {'a': '0' * 16, 'b': '2' * 16}}, 'ckpt: step 3',
           '; try again')
  with pytest.raises(CorruptCheckpointError,
                     match=r"saved only: \['b'\]; read only: \['c'\]"):
    verify(saved, {'params': {'a': '0' * 16, 'c': '1' * 16}}, 'ckpt')
  with pytest.raises(CorruptCheckpointError,
                     match='no saved checksums for opt_state'):
    verify(saved, {'opt_state': {}}, 'ckpt')
  assert issubclass(CorruptCheckpointError, CheckpointError)


def _saved_model(directory):
  model = mae_jax.create_model('vit_tiny_patch8', img_size=32)
  rng = np.random.default_rng(0)
  params = jax.tree.map(
      lambda s: rng.standard_normal(s.shape).astype(s.dtype),
      checkpoint.abstract_params(model))
  mae_jax.save(directory, model, {'params': params})
  return params


def _flip_a_bit_in_the_largest_data_file(step_dir):
  files = [f for f in (step_dir / 'params').rglob('*') if f.is_file()]
  largest = max(files, key=lambda f: f.stat().st_size)
  assert largest.parent.name == 'd'      # an ocdbt data file
  data = bytearray(largest.read_bytes())
  data[len(data) // 2] ^= 1 << 3
  largest.write_bytes(bytes(data))


def test_a_flipped_bit_in_the_largest_data_file_is_refused_by_load_naming_the_leaf(
    tmp_path):
  params = _saved_model(tmp_path / 'ckpt')
  _flip_a_bit_in_the_largest_data_file(tmp_path / 'ckpt' / '0')
  shutil.copytree(tmp_path / 'ckpt', tmp_path / 'unchecked')
  shutil.rmtree(tmp_path / 'unchecked' / '0' / 'checksums')

  # Without its checksums the damage goes unnoticed: one value differs.
  _, loaded = mae_jax.load(tmp_path / 'unchecked')
  flat = traverse_util.flatten_dict(params, sep='/')
  got = traverse_util.flatten_dict(loaded['params'], sep='/')
  differing = [(name, int(np.sum(flat[name] != got[name]))) for name in flat
               if not np.array_equal(flat[name], got[name])]
  assert len(differing) == 1 and differing[0][1] == 1, differing
  leaf = differing[0][0]

  with pytest.raises(CorruptCheckpointError) as e:
    mae_jax.load(tmp_path / 'ckpt')
  assert str(e.value) == (
      f'{tmp_path / "ckpt"}: checkpoint step 0 is corrupt: params leaf '
      f"'{leaf}' does not match its saved checksum; load another step with "
      'load(path, step=N) (steps: [0])')


def test_a_checkpoint_without_checksums_loads_and_an_intact_one_verifies(
    tmp_path):
  params = _saved_model(tmp_path / 'ckpt')
  _, intact = mae_jax.load(tmp_path / 'ckpt')
  shutil.rmtree(tmp_path / 'ckpt' / '0' / 'checksums')
  _, old = mae_jax.load(tmp_path / 'ckpt')
  for loaded in (intact, old):
    assert jax.tree.all(jax.tree.map(np.array_equal, loaded['params'],
                                     params))


def test_read_checksums_reads_a_training_managers_item(tmp_path):
  mesh = jax.make_mesh((8,), ('x',))
  state = {'params': {'w': jax.device_put(jnp.arange(64.0).reshape(16, 4),
                                          NamedSharding(mesh, P('x')))},
           'opt_state': {'mu': jnp.ones((3,), jnp.bfloat16)}}
  sums = {k: tree_checksums(v) for k, v in state.items()}
  options = ocp.CheckpointManagerOptions(enable_async_checkpointing=True)
  names = ('params', 'opt_state', 'checksums')
  with ocp.CheckpointManager(tmp_path, options=options,
                             item_names=names) as mngr:
    mngr.save(1, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state['params']),
        opt_state=ocp.args.StandardSave(state['opt_state'])))
    mngr.save(2, args=ocp.args.Composite(
        checksums=ocp.args.JsonSave(sums),
        **{k: ocp.args.StandardSave(v) for k, v in state.items()}))
    mngr.wait_until_finished()
    assert checkpoint.read_checksums(mngr, 1) is None
    assert checkpoint.read_checksums(mngr, 2) == sums
    restored = mngr.restore(2, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(state['params'])))
  verify(sums, {'params': tree_checksums(restored['params'])},
         f'{pathlib.Path(tmp_path)}: step 2')
