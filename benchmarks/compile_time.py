"""Compile time of the full MAE pretraining step, scan_blocks on and off.

  python benchmarks/compile_time.py [--model mae_vit_huge_patch14] \
      [--batch 2] [--dtype float32] [--scan on off] [--remat] [--out r.jsonl]

Builds mae_jax.train.pretrain.PretrainTask as benchmarks/pretrain_throughput.py does
(the jitted, sharded train step: forward, backward, AdamW update) and times
`train_step.trace(...)`, `.lower()` and `.compile()` on abstract arguments,
so no parameters are allocated (huge fits on a small machine); the process
CPU time of trace + lower + compile is reported beside the wall time, as it
varies less on a shared machine. Each setting runs in its own fresh Python
process (no tracing or compilation caches shared between them; the
persistent compilation cache is switched off). Prints one line per setting
and appends one JSON line each to --out.
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(args):
  """Runs in the child process: times one setting, prints its JSON."""
  sys.path.insert(0, ROOT)
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  jax.config.update('jax_enable_compilation_cache', False)
  from benchmarks.pretrain_throughput import step_config  # pylint: disable=import-outside-toplevel
  from mae_jax.train import pretrain, sharding  # pylint: disable=import-outside-toplevel

  scan = args.scan == ['on']  # the child gets exactly one setting
  config = step_config(args, remat=args.remat, scan_blocks=scan)
  devices = jax.devices()[:1]
  mesh = sharding.make_mesh((1, 1), devices)
  start = time.perf_counter()
  t = pretrain.PretrainTask(config, mesh)
  setup_s = time.perf_counter() - start
  images = {'image': jax.ShapeDtypeStruct(
      (1, args.batch, args.image_size, args.image_size, 3), jnp.float32,
      sharding=sharding.batch_sharding(mesh, stacked=True))}
  scalar = jax.ShapeDtypeStruct((), jnp.int32)
  start, cpu = time.perf_counter(), time.process_time()
  traced = t.update.trace(t.abstract_state, images, scalar)
  trace_s = time.perf_counter() - start
  lowered = traced.lower()
  lower_s = time.perf_counter() - start - trace_s
  start = time.perf_counter()
  lowered.compile()
  compile_s = time.perf_counter() - start
  total_cpu_s = time.process_time() - cpu
  n_params = sum(x.size for x in jax.tree.leaves(t.abstract_state['params']))
  return {
      'benchmark': 'compile_time', 'model': args.model, 'batch': args.batch,
      'image_size': args.image_size, 'dtype': args.dtype,
      'scan_blocks': scan, 'remat': args.remat,
      'setup_s': round(setup_s, 2), 'trace_s': round(trace_s, 2),
      'lower_s': round(lower_s, 2), 'compile_s': round(compile_s, 2),
      'lower_plus_compile_s': round(trace_s + lower_s + compile_s, 2),
      'lower_plus_compile_cpu_s': round(total_cpu_s, 2),
      'params': int(n_params), 'backend': jax.default_backend(),
      'device': devices[0].device_kind, 'cpus': os.cpu_count(),
      'jax': jax.__version__, 'python': platform.python_version(),
      'date': datetime.date.today().isoformat()}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model', default='mae_vit_huge_patch14')
  parser.add_argument('--batch', type=int, default=2)
  parser.add_argument('--dtype', default='float32',
                      choices=('float32', 'bfloat16'))
  parser.add_argument('--image-size', type=int, default=224)
  parser.add_argument('--scan', nargs='+', default=['on', 'off'],
                      choices=('on', 'off'))
  parser.add_argument('--remat', action='store_true')
  parser.add_argument('--out', default=None, help='append JSON lines here')
  parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    print(json.dumps(measure(args)))
    return 0
  for scan in args.scan:
    cmd = [sys.executable, os.path.abspath(__file__), '--child',
           '--model', args.model, '--batch', str(args.batch),
           '--dtype', args.dtype, '--image-size', str(args.image_size),
           '--scan', scan] + (['--remat'] if args.remat else [])
    env = {k: v for k, v in os.environ.items()
           if k != 'JAX_COMPILATION_CACHE_DIR'}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                          check=False)
    if proc.returncode:
      sys.stderr.write(proc.stderr)
      return proc.returncode
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row['process_s'] = round(time.perf_counter() - start, 1)
    print(f'{row["model"]} batch {row["batch"]} {row["dtype"]} scan_blocks='
          f'{row["scan_blocks"]} remat={row["remat"]}: trace {row["trace_s"]}'
          f' s, lower {row["lower_s"]} s, compile {row["compile_s"]} s, '
          f'total {row["lower_plus_compile_s"]} s (CPU time '
          f'{row["lower_plus_compile_cpu_s"]} s)', flush=True)
    if args.out:
      with open(args.out, 'a', encoding='utf-8') as f:
        f.write(json.dumps(row) + '\n')
  return 0


if __name__ == '__main__':
  sys.exit(main())
