r"""Pretraining throughput of this tree against another checkout of the
project (e.g. an earlier commit), measured alternately in one run.

  git worktree add /tmp/before COMMIT
  python benchmarks/throughput_vs_tree.py --other /tmp/before \
      [--rounds 3] [-- ARGS for pretrain_throughput.py]

Each round runs `benchmarks/pretrain_throughput.py ARGS` once from the other
tree and once from this one (each in a fresh process, the order alternating
between rounds) and reads the img/s it reports; prints the medians and their
ratio and writes a Markdown table to --out.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mae_jax import paths  # noqa: E402
DEFAULT_ARGS = ['--model', 'mae_vit_tiny_patch8', '--image-size', '64',
                '--batch', '32', '--steps', '20', '--warmup', '2']


def img_per_s(tree, args):
  """img/s of each mode pretrain_throughput.py of `tree` reports."""
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, 'r.jsonl')
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    env.pop('XLA_FLAGS', None)
    subprocess.run([sys.executable, os.path.join(
        tree, 'benchmarks', 'pretrain_throughput.py'), *args, '--out', out],
                   cwd=tree, env=env, check=True, capture_output=True)
    with open(out) as f:
      return {r['attention']: r['img_per_s'] for r in map(json.loads, f)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--other', required=True, help='the other checkout')
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--out', default=os.path.join(
      ROOT, 'benchmarks', 'results', 'throughput_vs_tree.md'))
  parser.add_argument('args', nargs='*', default=DEFAULT_ARGS,
                      help='arguments of pretrain_throughput.py')
  args = parser.parse_args()
  trees = {'other': os.path.abspath(args.other), 'this': ROOT}
  rates = {name: [] for name in trees}
  for r in range(args.rounds):
    for name in (('other', 'this') if r % 2 == 0 else ('this', 'other')):
      rates[name].append(img_per_s(trees[name], args.args))
      print(f'round {r + 1}: {name} {rates[name][-1]}', flush=True)

  def commit(tree):
    return subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=tree,
                          capture_output=True, text=True).stdout.strip()

  modes = sorted(rates['this'][0])
  lines = [
      '# Pretraining throughput: this tree against another checkout', '',
      f'{platform.machine()}, {os.cpu_count()} cores, '
      f'{datetime.date.today()}; median img/s of {args.rounds} fresh '
      'processes each, the two trees alternating.', '',
      f'    python benchmarks/throughput_vs_tree.py --other {args.other} '
      f'--rounds {args.rounds} -- {" ".join(args.args)}', '',
      f'| attention | other ({commit(trees["other"])}) img/s | this '
      f'({commit(ROOT)}, working tree) img/s | this / other |',
      '|---|---|---|---|']
  for mode in modes:
    other = statistics.median(r[mode] for r in rates['other'])
    this = statistics.median(r[mode] for r in rates['this'])
    lines.append(f'| {mode} | {other:.1f} | {this:.1f} | {this / other:.3f} |')
  print('\n'.join(lines))
  paths.write_atomic(args.out, '\n'.join(lines) + '\n')


if __name__ == '__main__':
  main()
