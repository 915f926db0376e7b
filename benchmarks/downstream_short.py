"""The CI-sized digits chain of tests/test_downstream_digits.py, and its
calibration.

  python benchmarks/downstream_short.py [--seeds 5] [--out FILE.md]

(default --out: benchmarks/results/downstream_short.md)

`short_chain` is the chain the test runs (short MAE pretraining, then
linear probes of the pretrained and of a random encoder); this script runs
it for seeds 0 .. N-1 and writes each
seed's k-NN lift and probe margin, with their minimum: the test asserts
margins below the smallest value seen.
"""
import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
import pathlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import logging  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import linprobe, pretrain  # noqa: E402
from mae_jax import paths  # noqa: E402
from mae_jax.train import classify, pretrain as pretrain_task  # noqa: E402

SHORT_PRETRAIN = 600
SHORT_PROBE = 40
KNN_LIFT = 5.0      # points of k-NN top-1 over the initial encoder
PROBE_MARGIN = 5.0  # points of probe top-1 over the random encoder


def short_chain(root, seed=0):
  """{'knn_init', 'knn', 'probe_pretrained', 'probe_random'}: held-out
  top-1 (%) of the short chain in directory `root` (a pathlib.Path), on
  one device."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1),
                           ('data', 'fsdp'))
  config = pretrain.get_config('digits')
  config.update_from_flattened_dict(dict(
      seed=seed, total_steps=SHORT_PRETRAIN, warmup_steps=60, batch_size=32,
      blr=6e-3,
      eval_every_steps=SHORT_PRETRAIN, checkpoint_every_steps=SHORT_PRETRAIN,
      figure_every_steps=0))
  task = pretrain_task.PretrainTask(config, mesh)
  out = {'knn_init': task.evaluate(task.init_state(), 0)['knn_top1']}
  pretrain_task.train(config, str(root / 'pretrain'), mesh)
  with open(root / 'pretrain' / 'metrics.jsonl') as f:
    out['knn'] = [r for r in map(json.loads, f) if 'eval' in r][-1]['eval'][
        'knn_top1']
  for name, init in (('probe_pretrained', str(root / 'pretrain')),
                     ('probe_random', None)):
    probe = linprobe.get_config('digits')
    probe.update_from_flattened_dict(dict(
        seed=seed, total_steps=SHORT_PROBE, warmup_steps=4,
        eval_every_steps=SHORT_PROBE, checkpoint_every_steps=SHORT_PROBE))
    probe.init_from = init
    out[name] = classify.train(probe, str(root / name), mesh)['top1']
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--seeds', type=int, default=5)
  parser.add_argument('--out', default=os.path.join(
      ROOT, 'benchmarks', 'results', 'downstream_short.md'))
  args = parser.parse_args()
  if not os.environ.get('JAX_PLATFORMS'):  # calibrated on CPU
    jax.config.update('jax_platforms', 'cpu')
  logging.set_verbosity(logging.WARNING)
  rows, lifts, margins = [], [], []
  for seed in range(args.seeds):
    start = time.time()
    with tempfile.TemporaryDirectory() as root:
      got = short_chain(pathlib.Path(root), seed)
    lift = got['knn'] - got['knn_init']
    margin = got['probe_pretrained'] - got['probe_random']
    lifts.append(lift)
    margins.append(margin)
    rows.append(f'| {seed} | {got["knn_init"]:.1f} | {got["knn"]:.1f} | '
                f'{lift:+.1f} | {got["probe_pretrained"]:.1f} | '
                f'{got["probe_random"]:.1f} | {margin:+.1f} | '
                f'{time.time() - start:.0f} |')
    print(rows[-1], flush=True)
  table = '\n'.join(rows)
  text = f"""# The CI-sized digits chain, calibrated

Command: `python benchmarks/downstream_short.py --seeds {args.seeds}`;
machine: {platform.machine()}, {os.cpu_count()} cores, JAX on CPU; date
{datetime.date.today()}. The chain of tests/test_downstream_digits.py:
{SHORT_PRETRAIN} MAE pretraining updates at batch 32
(configs/pretrain.py:digits, blr 6e-3),
then {SHORT_PROBE}-update linear probes (configs/linprobe.py:digits)
of the pretrained and of a random encoder; held-out top-1 (%) on the 1,000
held-out digits.

| seed | k-NN, initial | k-NN, pretrained | lift | probe, pretrained | \
probe, random | margin | wall s |
|---|---|---|---|---|---|---|---|
{table}

Smallest k-NN lift: {min(lifts):+.1f} points (the test asserts
>= {KNN_LIFT:g}); smallest probe margin: {min(margins):+.1f} points
(the test asserts >= {PROBE_MARGIN:g}).
"""
  paths.write_atomic(args.out, text)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
