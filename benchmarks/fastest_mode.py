"""The fastest mae_jax mode of a throughput run, as pretrain_throughput.py
arguments, so a later run of the same script times that mode beside the
PyTorch peers.

  python benchmarks/fastest_mode.py RESULTS.jsonl --batch 1024
  -> --fold-qkv-bias on --xla-options 'lt=xla_gpu_enable_cublaslt=true'

Reads the JSON lines of pretrain_throughput.py --out; among the mae_jax
lines of that batch without an error, takes the one of most images per
second and prints its fold_qkv_bias and XLA option set (name and options)
as arguments, quoted for a shell. With no such line, prints the defaults
(`--fold-qkv-bias off --xla-options base`) and says so on stderr.
"""
import argparse
import json
import shlex
import sys

DEFAULT = {'fold_qkv_bias': False, 'xla_options': {}}


def fastest(lines, batch):
  """The record of most img_per_s among mae_jax records of `batch` without
  an error, or None."""
  best = None
  for line in lines:
    if not line.strip():
      continue
    record = json.loads(line)
    if (record.get('framework', 'mae_jax') != 'mae_jax'
        or record.get('batch') != batch or 'error' in record
        or 'img_per_s' not in record):
      continue
    if best is None or record['img_per_s'] > best['img_per_s']:
      best = record
  return best


def as_arguments(record):
  """pretrain_throughput.py arguments for the mode of `record`."""
  options = record.get('xla_options') or {}
  if options:
    name = record['mode'].split()[-1]
    text = name + '=' + ','.join(
        f'{k}={str(v).lower() if isinstance(v, bool) else v}'
        for k, v in options.items())
  else:
    text = 'base'
  fold = 'on' if record.get('fold_qkv_bias') else 'off'
  return ['--fold-qkv-bias', fold, '--xla-options', text]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('results', help='JSON lines of pretrain_throughput.py')
  parser.add_argument('--batch', type=int, required=True)
  args = parser.parse_args(argv)
  try:
    with open(args.results) as f:
      record = fastest(f, args.batch)
  except FileNotFoundError:
    record = None
  if record is None:
    print(f'fastest_mode: no mae_jax result at batch {args.batch} in '
          f'{args.results}; using the defaults', file=sys.stderr)
    record = DEFAULT
  print(shlex.join(as_arguments(record)))


if __name__ == '__main__':
  main()
