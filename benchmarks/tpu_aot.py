"""Compile mae_jax's real training step for a Cloud TPU slice, on a CPU host.

  python benchmarks/tpu_aot.py --topology v5e:2x2 \\
      --model mae_vit_base_patch16 --batch 256 --mesh 1,4 --scan --out f.jsonl
      [--task pretrain|finetune|pose] [--dtype bfloat16] [--remat]
      [--accum K] [--unpinned] [--qkv-columns]

Needs libtpu (`pip install -e ".[tpu]"`, or TPU_LIBRARY_PATH naming a
libtpu.so); no TPU is touched. The step is the
one train.py runs: the task of configs/{pretrain,finetune,pose}.py at the
size named by --model (base/large/huge recipe, the model overridden), its
sharding rules on a (data, fsdp) mesh of the topology's devices, its
optimizer state, its donated update, compiled ahead of time from abstract
arguments (`jax.jit(...).trace(...).lower().compile()`). The attention
implementation is 'xla' (what 'default' resolves to on TPU).

Printed and written as one JSON line to --out:
- compile seconds; per-device HBM of the program (arguments, outputs,
  aliased, temporaries, code, total) against the device's HBM; an
  out-of-memory or sharding failure is a result ("status"), not a crash;
- the collectives of the compiled HLO per step (count, bytes, ring wire
  bytes per device: mae_jax.train.cost);
- FLOPs per step, counted from the jaxpr of the update (matrix products and
  convolutions only): `flops` as compiled (with remat's recomputation),
  `model_flops` without remat (the MFU numerator);
- a roofline *bound* on step time: the largest of
    compute  FLOPs / (devices * peak bf16 FLOP/s per device),
    network  ring wire bytes per device / ICI bandwidth per chip (the
             published bidirectional figure, all links busy, no overlap
             lost),
    memory   (arguments + outputs + 2 * temporaries) / HBM bandwidth
             (each argument and output byte moved once, each byte of the
             peak temporary allocation written once and read once),
  each an optimistic assumption, so the step can only be slower; from it
  upper bounds on images/s per chip and MFU (model FLOPs / (devices * peak
  * bound));
- the hosts of the slice and the rows of a global batch each host's devices
  hold (`host_rows`): the input pipeline reads batch / hosts rows per host.
Chip figures: the Cloud TPU system architecture pages (v3, v5e, v5p, v6e).
"""
import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import sys
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # compile for TPU, run nothing
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')  # runs side by side
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from mae_jax.errors import ConfigError  # noqa: E402
from mae_jax.train import cost, sharding  # noqa: E402

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  """Published per-chip figures (bf16 peak FLOP/s, HBM bytes, HBM and
  bidirectional ICI bandwidth in bytes/s; ici None: not published)."""
  peak_flops: float
  hbm_bytes: float
  hbm_bw: float
  ici_bw: float
  cores: int = 1  # JAX devices per chip


CHIPS = {
    'TPU v3': Chip(123e12, 32 * GIB, 900e9, None, cores=2),
    'TPU v5 lite': Chip(197e12, 16 * GIB, 819e9, 400e9),
    'TPU v5': Chip(459e12, 95 * GIB, 2765e9, 1200e9),
    'TPU v6 lite': Chip(918e12, 32e9, 1638e9, 800e9),
}
SIZES = ('tiny', 'base', 'large', 'huge')


def libtpu():
  """Where libtpu comes from: its package version, or TPU_LIBRARY_PATH (a
  libtpu.so outside site-packages, as `make test` installs it); None when
  neither is there."""
  path = os.environ.get('TPU_LIBRARY_PATH')
  if path and os.path.isfile(path):
    return path
  try:
    return importlib.metadata.version('libtpu')
  except importlib.metadata.PackageNotFoundError:
    return None


def task_config(task, model, args):
  """The config train.py would run for `task` at the size of `model`."""
  variant = next((s for s in SIZES if f'_{s}_' in model), 'base')
  if task == 'pretrain':
    from configs.pretrain import get_config
  elif task == 'finetune':
    from configs.finetune import get_config
  else:
    from configs.pose import get_config
  config = get_config(variant)
  fields = {'model': model, 'batch_size': args.batch, 'dtype': args.dtype,
            'accum_iter': args.accum, 'scan_blocks': args.scan,
            'remat': args.remat, 'attention': 'xla', 'mesh': args.mesh,
            'total_steps': 1000, 'warmup_steps': 10, 'epochs': 0}
  if task == 'finetune':
    fields['num_classes'] = 1000
  if variant != 'tiny':  # named for the config check only: nothing is read
    fields['data.data_dir'] = 'gs://BUCKET/data'
  config.update_from_flattened_dict(fields)
  return config


def make_task(task, config, mesh):
  if task == 'pretrain':
    from mae_jax.train.pretrain import PretrainTask
    return PretrainTask(config, mesh)
  if task == 'finetune':
    from mae_jax.train.classify import ClassifyTask
    return ClassifyTask(config, mesh)
  from mae_jax.train.pose import PoseTask
  return PoseTask(config, mesh)


def host_rows(mesh, batch):
  """How the hosts of the slice hold a global batch of `batch` rows under
  the batch sharding: {'hosts', 'rows_per_host' (each host's share, or None
  when the hosts' shares differ), 'contiguous' (host p holds rows
  [p*L, (p+1)*L): its devices follow the process order)}. The input
  pipeline reads batch / hosts rows on each host, and
  jax.make_array_from_process_local_data places them on that host's devices
  in row order, contiguous or not."""
  spec = sharding.batch_sharding(mesh).spec
  rows = NamedSharding(mesh, spec).devices_indices_map((batch,))
  hosts = sorted({d.process_index for d in mesh.devices.flat})
  held = {p: sorted({r for d, (s,) in rows.items() if d.process_index == p
                     for r in range(*s.indices(batch))}) for p in hosts}
  local = batch // len(hosts)
  sizes = {len(v) for v in held.values()}
  return {'hosts': len(hosts),
          'rows_per_host': local if sizes == {local} else None,
          'contiguous': all(held[p] == list(range(p * local, (p + 1) * local))
                            for p in hosts)}


def roofline(flops, model_flops, mem, comms, chip, devices, examples):
  """The optimistic step-time terms and the bounds they give; `flops`: of
  the step as compiled (with remat's recomputation), `model_flops`:
  without, for MFU."""
  per_device_peak = chip.peak_flops / chip.cores
  traffic = mem['arguments'] + mem['outputs'] + 2 * mem['temporaries']
  terms = {'compute_s': flops / (devices * per_device_peak),
           'memory_s': traffic / (chip.hbm_bw / chip.cores)}
  wire = sum(v['wire_bytes'] for k, v in comms.items() if k in cost.KINDS)
  if chip.ici_bw:
    terms['network_s'] = wire / (chip.ici_bw / chip.cores)
  bound = max(terms.values())
  chips = devices / chip.cores
  return {**{k: round(v, 5) for k, v in terms.items()},
          'step_s_bound': round(bound, 5),
          'limited_by': max(terms, key=terms.get)[:-2],
          'images_per_s_per_chip_bound': round(examples / bound / chips, 1),
          'mfu_bound': round(model_flops / (devices * per_device_peak)
                             / bound, 3)}


def compile_step(args):
  """One result dict; failures are results."""
  topo = topologies.get_topology_desc(topology_name=args.topology,
                                      platform='tpu')
  devices = topo.devices
  kind = devices[0].device_kind
  chip = CHIPS.get(kind)
  result = {'benchmark': 'tpu_aot', 'topology': args.topology,
            'device_kind': kind, 'devices': len(devices),
            'task': args.task, 'model': args.model, 'batch': args.batch,
            'accum': args.accum, 'mesh': list(args.mesh),
            'dtype': args.dtype, 'scan': args.scan, 'remat': args.remat,
            'unpinned': args.unpinned, 'qkv_columns': args.qkv_columns}
  try:
    mesh = sharding.make_mesh(args.mesh, devices)
    config = task_config(args.task, args.model, args)
    task = make_task(args.task, config, mesh)
  except (ConfigError, ValueError) as e:
    return {**result, 'status': 'config_error', 'error': str(e)}
  result['host_rows'] = host_rows(mesh, args.batch)
  step = jax.ShapeDtypeStruct((), jnp.int32)
  batch = task.abstract_batch()
  batch_sharding = sharding.batch_sharding(mesh, stacked=True)
  update, state = task.update, task.abstract_state
  if args.unpinned or args.qkv_columns:
    shardings = task.shardings
    if args.qkv_columns:  # every kernel by the 'fsdp' rule, qkv included
      shardings, state = sharding.with_shardings(mesh, state,
                                                 (('.*', 'fsdp'),))
    # pylint: disable-next=protected-access
    body = task._update if args.unpinned else task._update_in_mesh
    update = jax.jit(body, donate_argnums=(0,),
                     in_shardings=(shardings, batch_sharding,
                                   sharding.replicated(mesh)),
                     out_shardings=(shardings, sharding.replicated(mesh)))
  start = time.perf_counter()
  try:
    compiled = update.trace(state, batch, step).lower().compile()
  except Exception as e:  # pylint: disable=broad-except
    text = str(e)
    oom = 'RESOURCE_EXHAUSTED' in text or 'memory' in text.lower()
    return {**result, 'status': 'oom' if oom else 'compile_error',
            'compile_s': round(time.perf_counter() - start, 1),
            'error': text.strip().splitlines()[0][:500]}
  result['compile_s'] = round(time.perf_counter() - start, 1)
  mem = cost.memory(compiled)
  comms = cost.collectives(compiled.as_text())
  flops = model_flops = cost.matmul_flops(task.update, task.abstract_state,
                                          batch, step)
  if args.remat:  # model FLOPs: the step without recomputation
    plain = make_task(args.task, task_config(
        args.task, args.model, argparse.Namespace(**{**vars(args),
                                                     'remat': False})), mesh)
    model_flops = cost.matmul_flops(plain.update, plain.abstract_state,
                                    batch, step)
  result.update(status='ok', memory=mem, collectives=comms,
                flops=int(flops), model_flops=int(model_flops))
  if chip:
    hbm = chip.hbm_bytes / chip.cores
    result.update(hbm_per_device=int(hbm), fits=mem['total'] <= hbm,
                  roofline=roofline(flops, model_flops, mem, comms, chip,
                                    len(devices), args.batch * args.accum))
  return result


def describe(r):
  """One line for the terminal."""
  head = (f"{r['topology']} {r['task']} {r['model']} batch {r['batch']} "
          f"mesh {tuple(r['mesh'])}{' scan' if r['scan'] else ''}"
          f"{' remat' if r['remat'] else ''}: ")
  if r['status'] != 'ok':
    return head + f"{r['status']}: {r.get('error', '')}"
  m = r['memory']
  text = (f"compiled in {r['compile_s']:.0f} s; per device "
          f"{m['arguments'] / GIB:.2f} GiB arguments + "
          f"{m['temporaries'] / GIB:.2f} GiB temporaries = "
          f"{m['total'] / GIB:.2f} GiB total")
  if 'hbm_per_device' in r:
    text += (f" of {r['hbm_per_device'] / GIB:.1f} GiB "
             f"({'fits' if r['fits'] else 'does NOT fit'})")
  comm = ', '.join(f"{k} {v['count']}x {v['bytes'] / 2**20:.0f} MiB"
                   for k, v in r['collectives'].items() if k in cost.KINDS)
  text += f"; collectives per step: {comm or 'none'}"
  if 'roofline' in r:
    b = r['roofline']
    text += (f"; bound: step >= {b['step_s_bound'] * 1e3:.1f} ms "
             f"({b['limited_by']}), <= "
             f"{b['images_per_s_per_chip_bound']:.0f} img/s per chip, "
             f"MFU <= {b['mfu_bound']:.0%}")
  return head + text


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--topology', required=True,
                      help='e.g. v5e:2x2, v5e:16x16, v5p:4x4x4, v3:8x8')
  parser.add_argument('--model', required=True)
  parser.add_argument('--batch', type=int, required=True,
                      help='global batch of one micro-step')
  parser.add_argument('--mesh', required=True,
                      type=lambda s: tuple(int(x) for x in s.split(',')),
                      help='DATA,FSDP (one may be -1)')
  parser.add_argument('--task', default='pretrain',
                      choices=('pretrain', 'finetune', 'pose'))
  parser.add_argument('--dtype', default='bfloat16',
                      choices=('bfloat16', 'float32'))
  parser.add_argument('--accum', type=int, default=1)
  parser.add_argument('--remat', action='store_true')
  parser.add_argument('--scan', action='store_true')
  parser.add_argument('--unpinned', action='store_true',
                      help='compile the update without batch-sharded '
                      'activations (mae_jax.models.blocks.batch_sharded), '
                      'to compare')
  parser.add_argument('--qkv-columns', action='store_true',
                      help='shard the qkv kernels by columns like every '
                      'other kernel (the rule table before fsdp_rows, '
                      'mae_jax.train.sharding), to compare')
  parser.add_argument('--out', required=True)
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  if libtpu() is None:
    print('error: libtpu is not installed: pip install -e ".[tpu]" (or set '
          'TPU_LIBRARY_PATH to a libtpu.so)', file=sys.stderr)
    return 2
  result = compile_step(args)
  result.update(jax=jax.__version__, libtpu=libtpu(),
                python=platform.python_version(), host_cpus=os.cpu_count(),
                date=datetime.date.today().isoformat())
  print(describe(result))
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'a') as f:
    f.write(json.dumps(result) + '\n')
  return 0 if result['status'] in ('ok', 'oom') else 1


if __name__ == '__main__':
  sys.exit(main())
