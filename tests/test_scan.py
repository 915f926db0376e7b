"""scan_blocks: nn.scan over blocks equals the unrolled model; layouts,
conversion, checkpoints, per-block drop path, layer decay, FSDP rules."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from mae_jax import checkpoint, convert
from mae_jax.train import optim, sharding
from mae_jax.models import (blocks, create_model, stack_blocks,
                            to_layout, unstack_blocks)
from mae_jax.torch_io import read_state_dict
from tests import torch_mae

MAE = 'mae_vit_tiny_patch8'
VIT = 'vit_tiny_patch8'


def _imgs(n=2, seed=3):
  return jax.random.normal(jax.random.key(seed), (n, 64, 64, 3))


def _assert_trees_equal(a, b, atol=0.0):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(
      np.asarray(x), np.asarray(y), rtol=0, atol=atol), a, b)


def _random_params(model, scale=0.05, seed=0):
  """Random NumPy arrays in the model's parameter layout (no init to
  compile); LayerNorm scales near 1."""
  flat = traverse_util.flatten_dict(checkpoint.abstract_params(model))
  rng = np.random.default_rng(seed)
  return traverse_util.unflatten_dict({
      k: ((1.0 if k[-1] == 'scale' else 0.0)
          + scale * rng.normal(size=x.shape)).astype(np.float32)
      for k, x in flat.items()})


@pytest.fixture(scope='module')
def mae():
  """Unrolled tiny MAE, its scan twin, unrolled params, images, noise."""
  model = create_model(MAE)
  imgs, noise = _imgs(), jax.random.uniform(jax.random.key(1), (2, 64))
  return (model, model.clone(scan_blocks=True), _random_params(model), imgs,
          noise)


def test_layouts_round_trip_and_match_the_scan_model(mae):
  model, scanned, params, _, _ = mae
  stacked = stack_blocks(params)
  assert 'blocks_0' not in stacked and 'decoder_blocks_1' not in stacked
  assert stacked['blocks']['attn']['qkv']['kernel'].shape == (4, 192, 576)
  assert stacked['decoder_blocks']['norm1']['scale'].shape == (2, 128)
  np.testing.assert_array_equal(stacked['blocks']['mlp']['fc1']['bias'][2],
                                params['blocks_2']['mlp']['fc1']['bias'])
  shapes = lambda t: jax.tree.map(lambda x: (tuple(x.shape), x.dtype), t)
  assert shapes(stacked) == shapes(checkpoint.abstract_params(scanned))
  assert shapes(unstack_blocks(checkpoint.abstract_params(scanned))) == (
      shapes(checkpoint.abstract_params(model)))
  _assert_trees_equal(unstack_blocks(stacked), params)
  # to_layout is idempotent in either direction
  _assert_trees_equal(to_layout(stacked, True), stacked)
  _assert_trees_equal(to_layout(params, False), params)
  bad = {k: v for k, v in params.items() if k != 'blocks_1'}
  with pytest.raises(ValueError, match=r'blocks: block indices \[0, 2, 3\]'):
    stack_blocks(bad)


def test_mae_loss_pred_and_grads_equal_unrolled(mae):
  model, scanned, params, imgs, noise = mae

  def grad(m, p):
    def loss(p):
      l, pred, mask = m.apply({'params': p}, imgs, noise=noise)
      return l, (pred, mask)
    return jax.value_and_grad(loss, has_aux=True)(p)

  @jax.jit  # one compile for all three (XLA shares their kernels)
  def run(p):
    stacked = stack_blocks(p)
    return (grad(model, p), grad(scanned, stacked),
            grad(scanned.clone(remat=True), stacked))

  ((l0, (p0, m0)), g0), *scans = run(params)
  for (l1, (p1, m1)), g1 in scans:  # scan, scan + remat
    np.testing.assert_allclose(l1, l0, rtol=0, atol=1e-5)
    np.testing.assert_allclose(p1, p0, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(m1, m0)
    _assert_trees_equal(g1, stack_blocks(g0), atol=1e-5)


@pytest.mark.parametrize('name', [MAE, VIT])
def test_remat_traces_in_both_layouts(name):
  """Gradients trace with remat, scanned or not (the unrolled blocks take
  `deterministic` positionally, as remat's static_argnums needs)."""
  imgs = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
  for scan in (False, True):
    m = create_model(name, remat=True, scan_blocks=scan)
    if name == MAE:
      loss = lambda p, x, m=m: m.apply({'params': p}, x, noise=jnp.zeros(
          (2, 64)))[0]
    else:
      loss = lambda p, x, m=m: m.apply({'params': p}, x, train=True, rngs={
          'dropout': jax.random.key(0)}).sum()
    params = checkpoint.abstract_params(m)
    grads = jax.eval_shape(jax.grad(loss), params, imgs)
    assert jax.tree.structure(grads) == jax.tree.structure(params)


def test_scan_init_draws_a_fresh_xavier_kernel_per_block():
  stack = blocks.scan_block_class(False, 3)(num_heads=2)
  x = jnp.zeros((1, 2, 8))
  params = jax.jit(stack.init)(jax.random.key(5), x, jnp.zeros(3), None)['params']
  kernel = np.asarray(params['attn']['qkv']['kernel'])
  assert kernel.shape == (3, 8, 24)
  limit = np.sqrt(6.0 / (8 + 24))  # fan of one block, not of the stack
  assert np.abs(kernel).max() <= limit
  assert all(np.abs(k).max() > 0.8 * limit for k in kernel)
  assert not np.allclose(kernel[0], kernel[1])
  np.testing.assert_array_equal(params['norm1']['scale'], np.ones((3, 8)))


def test_vit_scan_deterministic_equal_and_drop_path_rate_per_block(
    monkeypatch):
  model = create_model(VIT, num_classes=5)
  scanned = model.clone(scan_blocks=True)
  imgs = _imgs()
  params = _random_params(model)
  seen = []
  real = blocks.drop_path

  def recording(x, rate, rng):
    jax.debug.callback(lambda r: seen.append(float(r)), rate)
    return real(x, rate, rng)

  monkeypatch.setattr(blocks, 'drop_path', recording)

  @jax.jit
  def run(p, key):
    stacked = stack_blocks(p)
    return (model.apply({'params': p}, imgs),
            scanned.apply({'params': stacked}, imgs),
            scanned.apply({'params': stacked}, imgs, train=True,
                          rngs={'dropout': key}))

  want, got, train = run(params, jax.random.key(1))
  jax.effects_barrier()
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
  rates = np.linspace(0, model.drop_path_rate, model.depth)
  # two residual branches per block, each with its own block's rate
  np.testing.assert_allclose(sorted(seen), np.repeat(rates, 2), atol=1e-7)
  assert not np.allclose(train, want)  # stochastic depth acted


def test_pth_to_scan_model_and_back_round_trips(tmp_path):
  ref = torch_mae.make_mae('tiny_patch8').state_dict()
  src = torch_mae.save_pth(tmp_path / 'full.pth', ref)
  state, extras = read_state_dict(src)
  model, params, _ = convert.from_torch(state, None, extras, str(src),
                                        scan_blocks=True)
  assert model.scan_blocks and params['blocks']['attn']['qkv'][
      'kernel'].shape == (4, 192, 576)
  out = convert.to_torch(model, params)
  assert list(out) == list(convert.to_torch(
      model.clone(scan_blocks=False), unstack_blocks(params)))
  assert set(out) == set(ref)
  for k in ref:
    assert torch.equal(out[k], ref[k]), k

  # checkpoints keep the model's layout and convert on request
  checkpoint.save(tmp_path / 'scan', model, {'params': params})
  loaded, variables = checkpoint.load(tmp_path / 'scan')
  assert loaded.scan_blocks
  _assert_trees_equal(variables['params'], params)
  unrolled, variables = checkpoint.load(tmp_path / 'scan', scan_blocks=False)
  assert not unrolled.scan_blocks
  _assert_trees_equal(variables['params'], unstack_blocks(params))
  checkpoint.save(tmp_path / 'plain', unrolled, variables)
  again, variables = checkpoint.load(tmp_path / 'plain', scan_blocks=True)
  assert again.scan_blocks
  _assert_trees_equal(variables['params'], params)


def test_encoder_of_a_scan_checkpoint_fills_a_scan_classifier(tmp_path):
  ref = torch_mae.make_mae('tiny_patch8').state_dict()
  model, params, _ = convert.from_torch(dict(ref), scan_blocks=True)
  checkpoint.save(tmp_path / 'mae', model, {'params': params})
  vit = create_model(VIT, num_classes=3, scan_blocks=True)
  got = convert.init_classifier_from(tmp_path / 'mae', vit,
                                     jax.random.key(0))['params']
  np.testing.assert_array_equal(got['blocks']['mlp']['fc2']['kernel'],
                                params['blocks']['mlp']['fc2']['kernel'])
  assert got['head']['kernel'].shape == (192, 3)


def test_layer_decay_and_decay_mask_per_block_on_stacked_params():
  params = _random_params(create_model(VIT, num_classes=5), scale=1.0)
  grads = jax.tree.map(lambda x: np.float32(0.1) * x[::-1], params)
  stacked = stack_blocks(params)
  scales = optim.layer_scales(stacked, 4, 0.75)
  np.testing.assert_allclose(
      scales['blocks']['attn']['qkv']['kernel'].ravel(),
      [0.75 ** 4, 0.75 ** 3, 0.75 ** 2, 0.75])
  assert scales['blocks']['attn']['qkv']['kernel'].shape == (4, 1, 1)

  flags = lambda t: jax.tree.map(bool, t)
  mask = optim.decay_mask(stacked, optim.FINETUNE_NO_DECAY)
  unrolled_mask = optim.decay_mask(params, optim.FINETUNE_NO_DECAY)
  assert flags(mask['blocks']) == flags(unrolled_mask['blocks_0'])
  assert mask['blocks']['attn']['qkv']['kernel']
  assert not mask['blocks']['norm1']['scale']
  assert not mask['blocks']['attn']['qkv']['bias']

  @jax.jit
  def update(p, g):
    tx = optim.finetune_optimizer(optax.constant_schedule(1e-3), 0.05, p,
                                  depth=4, layer_decay=0.75)
    u, _ = tx.update(g, tx.init(p), p)
    return u
  _assert_trees_equal(update(stacked, stack_blocks(grads)),
                      stack_blocks(update(params, grads)), atol=1e-7)
  with pytest.raises(ValueError, match='LARS'):
    optim.lars(optax.constant_schedule(0.1), stacked)


def test_fsdp_never_shards_the_stacked_layer_axis():
  mesh = sharding.make_mesh((1, 8))
  shape = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  tree = {'blocks_0': {'k': shape(16, 8)},
          'blocks': {'k': shape(16, 8, 4), 'scale': shape(16, 4),
                     # registry sizes: the largest dim is not the layer axis
                     'fc1': shape(32, 1280, 5120)},
          'opt_state': {'mu': {'decoder_blocks': {'b': shape(16, 8)}}}}
  specs = jax.tree.map(lambda s: s.spec,
                       sharding.tree_shardings(mesh, tree))
  assert specs['blocks_0']['k'] == P('fsdp', None)
  assert specs['blocks']['k'] == P(None, 'fsdp', None)
  assert specs['blocks']['scale'] == P()  # nothing else divides by 8
  assert specs['blocks']['fc1'] == P(None, None, 'fsdp')
  assert specs['opt_state']['mu']['decoder_blocks']['b'] == P(None, 'fsdp')


def test_fsdp_shards_qkv_kernels_by_rows_keeping_q_k_v_blocks_whole():
  mesh = sharding.make_mesh((1, 8))
  shape = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  qkv = {'kernel': shape(64, 192), 'bias': shape(192)}
  tree = {'blocks_0': {'attn': {'qkv': qkv, 'proj': {'kernel': shape(64, 64)}}},
          'blocks': {'attn': {'qkv': {'kernel': shape(16, 64, 192)}}},
          'opt_state': {'mu': {'blocks_0': {'attn': {'qkv': qkv}}}},
          'odd': {'qkv': {'kernel': shape(12, 192)}}}
  specs = jax.tree.map(lambda s: s.spec,
                       sharding.tree_shardings(mesh, tree))
  assert specs['blocks_0']['attn']['qkv'] == {'kernel': P('fsdp', None),
                                              'bias': P('fsdp')}
  assert specs['blocks']['attn']['qkv']['kernel'] == P(None, 'fsdp', None)
  assert specs['opt_state']['mu']['blocks_0']['attn']['qkv'] == specs[
      'blocks_0']['attn']['qkv']
  assert specs['odd']['qkv']['kernel'] == P(None, 'fsdp')  # 12 rows: columns
  assert specs['blocks_0']['attn']['proj']['kernel'] == P('fsdp', None)
