"""Cost of per-leaf checksums beside the checkpoint save they protect.

  python benchmarks/checksum_cost.py [--models mae_vit_base_patch16 ...]
      [--runs 5] [--dir /tmp] [--out benchmarks/results/checksum_cost.md]

For each model, builds the training state a pretraining checkpoint holds
(float32 params plus optax.adamw's state: mu and nu, float32, the step count)
on the default device, filled with random values, and times, in the same
process:
  - `tree_checksums(state)`: the on-device checksums of every leaf (one jitted
    call; what a training loop adds per checkpoint);
  - `numpy_tree_checksums(params)`: the host-side check `mae_jax.load` adds
    (params only, NumPy arrays);
  - an orbax async save of the same state (CheckpointManager, StandardSave
    per item, as training saves): the part that blocks the caller
    (`mngr.save` returning) and the full completion (`wait_until_finished`).
Each is timed `--runs` times after one warm-up run (compilation, first
write); the table gives medians. A model whose state would leave less than
twice its size of available memory is skipped and says so. Prints the table
and writes it, with the machine, command and date, to --out.
"""
import argparse
import datetime
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402  pylint: disable=wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=wrong-import-position
import optax  # noqa: E402  pylint: disable=wrong-import-position
import orbax.checkpoint as ocp  # noqa: E402  pylint: disable=wrong-import-position

from benchmarks.machine import cpu_name  # noqa: E402  pylint: disable=wrong-import-position
from mae_jax import checkpoint  # noqa: E402  pylint: disable=wrong-import-position
from mae_jax.checksums import (  # noqa: E402  pylint: disable=wrong-import-position
    numpy_tree_checksums, tree_checksums)
from mae_jax.models import create_model  # noqa: E402  pylint: disable=wrong-import-position


def available_bytes():
  with open('/proc/meminfo', encoding='utf-8') as f:
    for line in f:
      if line.startswith('MemAvailable:'):
        return int(line.split()[1]) * 1024
  return 0


def random_state(name):
  """{'params', 'opt_state'} of `name` on device, random values."""
  shapes = checkpoint.abstract_params(create_model(name))
  leaves, treedef = jax.tree.flatten(shapes)

  @jax.jit
  def make(key):
    keys = jax.random.split(key, len(leaves))
    params = jax.tree.unflatten(treedef, [
        jax.random.normal(k, s.shape, s.dtype) for k, s in zip(keys, leaves)])
    opt_state = optax.adamw(1e-4).init(params)
    # one update's worth of moments, so mu and nu are not all zeros
    opt_state = jax.tree.map(lambda x: x + 1e-3 if x.ndim else x, opt_state)
    return {'params': params, 'opt_state': opt_state}

  return make(jax.random.key(0))


def timed(fn, runs):
  fn()  # warm-up
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def host_time(params, runs):
  """Median time of `numpy_tree_checksums` over a host copy of `params`."""
  host = jax.tree.map(np.asarray, params)
  return timed(lambda: numpy_tree_checksums(host), runs)


def measure(name, runs, directory):
  state = random_state(name)
  jax.block_until_ready(state)
  n_params = sum(x.size for x in jax.tree.leaves(state['params']))
  n_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  row = {'model': name, 'params': n_params, 'bytes': n_bytes,
         'leaves': len(jax.tree.leaves(state))}
  row['checksum_s'] = timed(lambda: tree_checksums(state), runs)
  row['numpy_params_s'] = host_time(state['params'], runs)
  options = ocp.CheckpointManagerOptions(
      max_to_keep=1, enable_async_checkpointing=True, create=True)
  blocking, total = [], []
  with ocp.CheckpointManager(os.path.join(directory, name), options=options,
                             item_names=('params', 'opt_state')) as mngr:
    for step in range(runs + 1):
      start = time.perf_counter()
      mngr.save(step, args=ocp.args.Composite(
          **{k: ocp.args.StandardSave(v) for k, v in state.items()}))
      returned = time.perf_counter()
      mngr.wait_until_finished()
      done = time.perf_counter()
      if step:  # the first save is the warm-up
        blocking.append(returned - start)
        total.append(done - start)
  shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
  row['save_blocking_s'] = statistics.median(blocking)
  row['save_total_s'] = statistics.median(total)
  return row


def table(rows):
  lines = ['| model | params | state (params + AdamW mu, nu) | leaves | '
           '`tree_checksums(state)` | orbax async save: blocking part | '
           'orbax async save: to completion | checksums / full save | '
           '`numpy_tree_checksums(params)` (load) |',
           '|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    if 'skipped' in r:
      lines.append(f'| {r["model"]} | skipped: {r["skipped"]} |||||||| ')
      continue
    lines.append(
        f'| {r["model"]} | {r["params"] / 1e6:.1f} M | '
        f'{r["bytes"] / 2**30:.2f} GiB | {r["leaves"]} | '
        f'{r["checksum_s"]:.3f} s | {r["save_blocking_s"]:.3f} s | '
        f'{r["save_total_s"]:.3f} s | '
        f'{r["checksum_s"] / r["save_total_s"]:.1%} | '
        f'{r["numpy_params_s"]:.3f} s |')
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--models', nargs='+',
                      default=['mae_vit_base_patch16', 'mae_vit_large_patch16'])
  parser.add_argument('--runs', type=int, default=5)
  parser.add_argument('--dir', default=tempfile.gettempdir(),
                      help='where the timed checkpoints are written (and '
                           'removed)')
  parser.add_argument('--out', default=os.path.join(
      ROOT, 'benchmarks', 'results', 'checksum_cost.md'))
  args = parser.parse_args()
  directory = tempfile.mkdtemp(prefix='checksum_cost-', dir=args.dir)
  rows = []
  try:
    for name in args.models:
      shapes = checkpoint.abstract_params(create_model(name))
      state_bytes = 3 * sum(s.size * 4 for s in jax.tree.leaves(shapes))
      if available_bytes() < 2 * state_bytes:
        rows.append({'model': name, 'skipped': (
            f'state {state_bytes / 2**30:.1f} GiB, only '
            f'{available_bytes() / 2**30:.1f} GiB memory available')})
      else:
        rows.append(measure(name, args.runs, directory))
      print(rows[-1], flush=True)
  finally:
    shutil.rmtree(directory, ignore_errors=True)
  text = table(rows)
  print(text)
  machine = (f'{platform.machine()}, {os.cpu_count()} cores ({cpu_name()}), '
             f'{available_bytes() / 2**30:.0f} GiB memory available at the '
             f'end, jax {jax.__version__} on {jax.devices()[0].platform}, '
             f'orbax-checkpoint {ocp.__version__}')
  command = 'python benchmarks/checksum_cost.py ' + ' '.join(sys.argv[1:])
  doc = f"""# Cost of checkpoint checksums

`mae_jax.checksums.tree_checksums` over a pretraining state, beside an orbax
async save of the same state, measured in one process (medians of
{args.runs} runs after one warm-up; random float32 values).

{text}

- command: `{command.strip()}`
- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC
- machine: {machine}; the checkpoints go to {args.dir}. Cores shared
  with other jobs, so times vary.
"""
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w', encoding='utf-8') as f:
    f.write(doc)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
