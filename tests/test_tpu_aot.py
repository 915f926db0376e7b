"""Costs counted from programs (mae_jax.train.cost), the FSDP activation
pinning, and ahead-of-time compiles for Cloud TPU slices on this CPU host
(benchmarks/tpu_aot.py; those tests need libtpu, the [tpu] extra)."""
import importlib.util
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs.pretrain import get_config
from mae_jax.models import create_model, model_input_shape
from mae_jax.train import cost, pretrain, sharding

pytestmark = pytest.mark.long

NO_LIBTPU = (importlib.util.find_spec('libtpu') is None
             and not os.path.isfile(os.environ.get('TPU_LIBRARY_PATH', '')))
needs_libtpu = pytest.mark.skipif(
    NO_LIBTPU, reason='no libtpu: `make test` installs it (or pip install -e '
    '".[tpu]", or set TPU_LIBRARY_PATH to a libtpu.so)')


def test_matmul_flops_count_products_convolutions_and_scan_iterations():
  x = jax.ShapeDtypeStruct((8, 32), jnp.float32)
  w = jax.ShapeDtypeStruct((32, 16), jnp.float32)
  assert cost.matmul_flops(jnp.dot, x, w) == 2 * 8 * 32 * 16

  def looped(x, w):
    return jax.lax.scan(lambda c, _: (c @ w[:, :32].T @ w[:, :32], None), x,
                        None, length=5)[0]
  w2 = jax.ShapeDtypeStruct((32, 32), jnp.float32)
  assert cost.matmul_flops(looped, x, w2) == 5 * 2 * (2 * 8 * 32 * 32)

  img = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
  kernel = jax.ShapeDtypeStruct((4, 4, 3, 8), jnp.float32)
  conv = lambda i, k: jax.lax.conv_general_dilated(  # noqa: E731
      i, k, (4, 4), 'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  assert cost.matmul_flops(conv, img, kernel) == 2 * (2 * 4 * 4 * 8) * 48


def _mae_forward_flops(model, batch):
  """The closed form: 24 N D^2 + 4 N^2 D per block (2 per multiply-add),
  patch embedding (of the kept patches only with fuse_patch_gather),
  decoder embedding and prediction."""
  def blocks(n, d, depth):
    return depth * (24 * n * d * d + 4 * n * n * d)
  length = model.num_patches
  keep = int(length * (1 - 0.75))
  patch_dim = model.patch_size ** 2 * model.in_chans
  d, dd = model.embed_dim, model.decoder_embed_dim
  embedded = keep if model.fuse_patch_gather else length
  per_image = (2 * embedded * patch_dim * d
               + blocks(keep + 1, d, model.depth)
               + 2 * (keep + 1) * d * dd
               + blocks(length + 1, dd, model.decoder_depth)
               + 2 * (length + 1) * dd * patch_dim)
  return batch * per_image


@pytest.mark.parametrize('scan', [False, True])
def test_mae_update_flops_are_three_forwards_of_the_closed_form(scan):
  config = get_config('tiny')
  # 'xla' attention: the 'chunked' one (CPU's default) recomputes the
  # attention scores in the backward pass
  config.update_from_flattened_dict({'scan_blocks': scan, 'batch_size': 8,
                                     'attention': 'xla'})
  task = pretrain.PretrainTask(config, sharding.make_mesh((1, 1),
                                                          jax.devices()[:1]))
  model = task.model
  images = jax.ShapeDtypeStruct((8, *model_input_shape(model)), jnp.float32)
  noise = jax.ShapeDtypeStruct((8, model.num_patches), jnp.float32)
  params = task.abstract_state['params']
  forward = cost.matmul_flops(
      lambda p, x, n: model.apply({'params': p}, x, noise=n), params, images,
      noise)
  assert forward == _mae_forward_flops(model, 8)
  update = cost.matmul_flops(task.update, task.abstract_state,
                             task.abstract_batch(),
                             jax.ShapeDtypeStruct((), jnp.int32))
  # backward = 2 forwards, less the input gradient of the patch embedding
  kept = model.num_patches // 4
  patch = 2 * 8 * kept * model.patch_size ** 2 * 3 * model.embed_dim
  assert update == 3 * forward - patch


def test_group_size_reads_every_replica_group_form():
  assert cost.group_size("replica_groups=mesh['axis_0'=4,'axis_1'=2] "
                         "{'axis_0'}, dimensions={0}") == 4
  assert cost.group_size("replica_groups=mesh['a'=4,'b'=2] {'a','b'}") == 8
  assert cost.group_size("replica_groups=mesh['axis_0'=1,'axis_1'=4,"
                         "'axis_2'=64], device_ids=([64,4]T(1,0)) "
                         "{'axis_1'}, dimensions={2}") == 4
  assert cost.group_size('replica_groups=[2,4]<=[8], to_apply=%add') == 4
  assert cost.group_size('replica_groups={{0,1,2},{3,4,5}}, x') == 3
  assert cost.group_size('source_target_pairs={{0,1},{1,0}}') == 2


def _compiled_text(fn, *args):
  return jax.jit(fn).lower(*args).compile().as_text()


def test_collectives_of_a_compiled_cpu_program_count_each_loop_iteration():
  mesh = jax.make_mesh((8,), ('x',))
  x = jax.device_put(np.ones((8, 256), np.float32),
                     NamedSharding(mesh, P('x')))

  def body(c, _):
    return c + 0.5 * jax.lax.psum(c, 'x'), None

  fn = jax.shard_map(lambda c: jax.lax.scan(body, c, None, length=3)[0],
                     mesh=mesh, in_specs=P('x'), out_specs=P('x'))
  found = cost.collectives(_compiled_text(fn, x))
  assert found['unknown_trip_counts'] == 0
  assert found['all-reduce']['count'] == 3
  assert found['all-reduce']['bytes'] == 3 * 256 * 4  # one row per device
  assert found['all-reduce']['wire_bytes'] == pytest.approx(
      3 * 2 * 256 * 4 * 7 / 8)


# The shapes of TPU HLO: one all-gather spread over the fusions of its start
# and done (one channel id), and a reduce-scatter fused as an all-reduce
# inside an all-reduce-scatter computation, in a loop of 5 iterations.
TPU_LIKE_HLO = """HloModule m

%gather_start (p: bf16[4,64]) -> bf16[16,64] {
  ROOT %ag.1 = bf16[16,64]{1,0} all-gather(%p), channel_id=7, replica_groups=mesh['axis_0'=4] {'axis_0'}, dimensions={0}
}

%gather_done (p: bf16[4,64]) -> bf16[16,64] {
  ROOT %ag.2 = bf16[16,64]{1,0} all-gather(%p), channel_id=7, replica_groups=mesh['axis_0'=4] {'axis_0'}, dimensions={0}
}

%all-reduce-scatter.3 (p: f32[16,64]) -> f32[16,64] {
  ROOT %ar.3 = f32[16,64]{1,0} all-reduce(%p), channel_id=8, replica_groups=[1,4]<=[4], to_apply=%add
}

%body (t: (s32[], bf16[4,64])) -> (s32[], bf16[4,64]) {
  %s = bf16[16,64]{1,0} fusion(%x), kind=kCustom, calls=%gather_start
  %d = bf16[16,64]{1,0} fusion(%s), kind=kCustom, calls=%gather_done
  %r = f32[16,64]{1,0} fusion(%d), kind=kCustom, calls=%all-reduce-scatter.3
}

%cond (t: (s32[], bf16[4,64])) -> pred[] {
  %c = s32[] constant(5)
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

ENTRY %main (a: bf16[4,64]) -> bf16[4,64] {
  %w = (s32[], bf16[4,64]) while(%t), condition=%cond, body=%body
}
"""


def test_collectives_count_a_split_collective_once_and_fused_reduce_scatter():
  found = cost.collectives(TPU_LIKE_HLO)
  assert found['all-gather']['count'] == 5
  assert found['all-gather']['bytes'] == 5 * 16 * 64 * 2
  assert found['reduce-scatter'] == {
      'count': 5, 'bytes': 5 * 4 * 64 * 4,
      'wire_bytes': 5 * 4 * 64 * 4 * 3.0}
  assert 'all-reduce' not in found and found['unknown_trip_counts'] == 0


def _fsdp_collective_bytes(pinned):
  """Bytes of all collectives per step of the tiny MAE update over 8 CPU
  devices with every parameter FSDP-sharded (mesh (1, 8)), with the
  attention TPUs run ('xla')."""
  config = get_config('tiny')
  config.update_from_flattened_dict({'mesh': (1, 8), 'batch_size': 256,
                                     'scan_blocks': True, 'attention': 'xla'})
  task = pretrain.PretrainTask(config)
  fn = task.update
  if not pinned:
    fn = jax.jit(task._update,  # pylint: disable=protected-access
                 in_shardings=(task.shardings,
                               sharding.batch_sharding(task.mesh, True),
                               sharding.replicated(task.mesh)))
  text = fn.trace(task.abstract_state, task.abstract_batch(),
                  jax.ShapeDtypeStruct((), jnp.int32)).lower().compile(
                  ).as_text()
  found = cost.collectives(text)
  return sum(v['bytes'] for k, v in found.items() if k in cost.KINDS)


def test_fsdp_update_gathers_weights_not_the_batch_activations():
  """Without batch-sharded activations XLA partitions the FSDP step by
  gathering activations; pinned, it moves far fewer bytes (measured on
  this tiny step: 27 MB instead of 161 MB)."""
  pinned, unpinned = _fsdp_collective_bytes(True), _fsdp_collective_bytes(False)
  assert pinned < unpinned / 4, (pinned, unpinned)  # seen: 6.0x fewer


def test_batch_sharded_is_the_identity_outside_a_mesh_context():
  from mae_jax.models.blocks import batch_sharded
  x = jnp.ones((3, 4))
  assert batch_sharded(x) is x
  mesh = sharding.make_mesh((2, 4))
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    assert batch_sharded(x) is x  # 3 rows do not split over 8 devices


# -- ahead-of-time compiles for TPU (libtpu) -----------------------------------

def _aot(*argv, out):
  from benchmarks import tpu_aot
  return tpu_aot.compile_step(tpu_aot.parse_args([*argv, '--out', str(out)]))


@needs_libtpu
def test_tiny_pretraining_step_compiles_for_v5e_2x2_with_sane_memory(tmp_path):
  r = _aot('--topology', 'v5e:2x2', '--model', 'mae_vit_tiny_patch8',
           '--batch', '32', '--mesh', '2,2', '--scan', out=tmp_path / 'r')
  assert r['status'] == 'ok', r
  assert r['devices'] == 4 and r['device_kind'] == 'TPU v5 lite'
  m = r['memory']
  params = create_model('mae_vit_tiny_patch8').init(
      jax.random.key(0), jnp.zeros((1, 64, 64, 3)),
      noise=jnp.zeros((1, 64)))['params']
  param_bytes = sum(x.size * 4 for x in jax.tree.leaves(params))
  # params + two AdamW moments in float32, FSDP over 2, and the batch
  least = 3 * param_bytes / 2 + 32 * 64 * 64 * 3 * 4 / 4
  assert least <= m['arguments'] < 16 * 2**30
  assert m['aliased'] >= 0.9 * m['outputs']  # the state buffers are donated
  assert 0 < m['temporaries'] and m['total'] <= r['hbm_per_device']
  assert r['fits'] and r['hbm_per_device'] == 16 * 2**30
  kinds = {k for k, v in r['collectives'].items()
           if isinstance(v, dict) and v['count']}
  assert kinds & {'all-reduce', 'reduce-scatter', 'collective-permute'}
  assert r['collectives']['unknown_trip_counts'] == 0
  assert r['flops'] == r['model_flops'] > 0  # no remat: nothing recomputed
  b = r['roofline']
  assert b['step_s_bound'] == max(b['compute_s'], b['memory_s'],
                                  b['network_s'])
  assert 0 < b['mfu_bound'] <= 1
  assert r['host_rows'] == {'hosts': 1, 'rows_per_host': 32,
                            'contiguous': True}


@needs_libtpu
@pytest.mark.parametrize('task,model', [('finetune', 'vit_tiny_patch8'),
                                        ('pose', 'vitpose_tiny_patch8')])
def test_finetune_and_pose_steps_compile_for_tpu(tmp_path, task, model):
  r = _aot('--topology', 'v5e:2x2', '--task', task, '--model', model,
           '--batch', '16', '--mesh', '1,4', out=tmp_path / 'r')
  assert r['status'] == 'ok', r
  assert r['fits'] and r['model_flops'] > 0


def _collective_dtypes(task_name, model, mesh):
  """{kind: {HLO dtype: bytes}} of the all-gathers and all-reduces of a
  step on a v5e 2x2 slice (batch 16, `mesh` as 'data,fsdp'), compiled for
  TPU."""
  from jax.experimental import topologies
  from benchmarks import tpu_aot
  args = tpu_aot.parse_args(['--topology', 'v5e:2x2', '--task', task_name,
                             '--model', model, '--batch', '16', '--mesh',
                             mesh, '--out', 'unused'])
  devices = topologies.get_topology_desc(topology_name='v5e:2x2',
                                         platform='tpu').devices
  task = tpu_aot.make_task(task_name,
                           tpu_aot.task_config(task_name, model, args),
                           sharding.make_mesh(args.mesh, devices))
  text = task.update.trace(task.abstract_state, task.abstract_batch(),
                           jax.ShapeDtypeStruct((), jnp.int32)
                           ).lower().compile().as_text()
  found = {'all-gather': {}, 'all-reduce': {}}
  for result, kind in re.findall(r'= (.*?) (all-gather|all-reduce)'
                                 r'(?:-start)?\(', text):
    for dtype, dims in cost._ARRAY.findall(result):  # pylint: disable=protected-access
      size = math.prod(int(d) for d in dims.split(',') if d)
      found[kind][dtype] = (found[kind].get(dtype, 0)
                            + size * cost.DTYPE_BYTES[dtype])
  return found


@needs_libtpu
@pytest.mark.parametrize('task,model', [('pretrain', 'mae_vit_tiny_patch8'),
                                        ('finetune', 'vit_tiny_patch8'),
                                        ('pose', 'vitpose_tiny_patch8')])
def test_bf16_data_parallel_gradients_are_all_reduced_in_float32(task, model):
  """Every gradient sum across devices is float32, as the official DDP's;
  with autodiff's bf16 weight-gradient products XLA all-reduced them in
  bf16 (the pretraining step: 4.5 MB of bf16, 19 kB of float32)."""
  found = _collective_dtypes(task, model, '4,1')
  assert not found['all-gather'], found  # data parallel: nothing to gather
  assert set(found['all-reduce']) == {'f32'}, found
  # every parameter's gradient, in float32
  assert found['all-reduce']['f32'] > 4 * 10**6


@needs_libtpu
def test_fsdp_gathers_bf16_weights_and_no_float32_gradient_blocks():
  """With FSDP the forward and backward passes gather the bf16 weights;
  with the qkv kernels sharded by columns, the float32 gradients of their
  q, k, v blocks were gathered too (2.2 MB per step here)."""
  found = _collective_dtypes('pretrain', 'mae_vit_tiny_patch8', '1,4')
  assert set(found['all-gather']) == {'bf16'}, found


@needs_libtpu
def test_an_impossible_mesh_is_a_result_not_a_crash(tmp_path):
  r = _aot('--topology', 'v5e:2x2', '--model', 'mae_vit_tiny_patch8',
           '--batch', '30', '--mesh', '1,4', out=tmp_path / 'r')
  assert r['status'] == 'config_error' and '30' in r['error']


@needs_libtpu
def test_each_host_of_a_v5e_4x4_slice_holds_a_quarter_of_the_batch():
  from jax.experimental import topologies
  from benchmarks import tpu_aot
  devices = topologies.get_topology_desc(topology_name='v5e:4x4',
                                         platform='tpu').devices
  for mesh_shape in ((16, 1), (4, 4)):
    mesh = sharding.make_mesh(mesh_shape, devices)
    rows = tpu_aot.host_rows(mesh, 4096)
    assert rows['hosts'] == 4 and rows['rows_per_host'] == 1024, rows
  assert math.prod(mesh.devices.shape) == 16


def test_largest_batch_search_doubles_then_halves_the_gap(monkeypatch):
  from benchmarks import tpu_table
  asked = []

  def fake_run(r, out, done):
    del out, done
    per_chip = r['batch'] // 4
    asked.append(per_chip)
    return {'status': 'ok', 'fits': per_chip <= 44, 'batch': r['batch']}

  monkeypatch.setattr(tpu_table, 'run', fake_run)
  best, tried = tpu_table.max_batch('base', 'unused', {})
  assert best == 40 and asked == [8, 16, 32, 64, 48, 40]
  assert len(tried) == len(asked)
