"""Calibrates the CI-sized digits chain (tests/test_downstream_digits.py).

  python benchmarks/downstream_short.py [--seeds 5] [--out FILE.md]

(default --out: benchmarks/results/downstream_short.md)

Runs the test's short chain (short MAE pretraining, then linear probes of
the pretrained and of a random encoder) for seeds 0 .. N-1 and writes each
seed's k-NN lift and probe margin, with their minimum: the test asserts
margins below the smallest value seen.
"""
import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
import pathlib

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import logging  # noqa: E402

from mae_jax import paths  # noqa: E402
from tests import test_downstream_digits as short  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--seeds', type=int, default=5)
  parser.add_argument('--out', default=os.path.join(
      ROOT, 'benchmarks', 'results', 'downstream_short.md'))
  args = parser.parse_args()
  logging.set_verbosity(logging.WARNING)
  rows, lifts, margins = [], [], []
  for seed in range(args.seeds):
    start = time.time()
    with tempfile.TemporaryDirectory() as root:
      got = short.short_chain(pathlib.Path(root), seed)
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
{short.SHORT_PRETRAIN} MAE pretraining updates at batch 32
(configs/pretrain.py:digits, blr 6e-3),
then {short.SHORT_PROBE}-update linear probes (configs/linprobe.py:digits)
of the pretrained and of a random encoder; held-out top-1 (%) on the 1,000
held-out digits.

| seed | k-NN, initial | k-NN, pretrained | lift | probe, pretrained | \
probe, random | margin | wall s |
|---|---|---|---|---|---|---|---|
{table}

Smallest k-NN lift: {min(lifts):+.1f} points (the test asserts
>= {short.KNN_LIFT:g}); smallest probe margin: {min(margins):+.1f} points
(the test asserts >= {short.PROBE_MARGIN:g}).
"""
  paths.write_atomic(args.out, text)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
