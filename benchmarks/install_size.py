"""Install time and size of each install target, each in a fresh venv.

  python benchmarks/install_size.py [--targets core,demo,test] [--cache]

For each target: a new venv in a temporary directory, `pip install --upgrade
pip` (as the Makefile does), then the target's install, from PyPI with pip's
configuration files and environment ignored (--isolated: a default set-up)
and, unless --cache, without pip's cache (--no-cache-dir: a first run).
Prints one markdown table row per target: install time (venv + pip upgrade +
install), venv size (du), number of distributions, and whether TensorFlow,
PyTorch and matplotlib were installed. Exits 1 if an install fails or the
core install brings TensorFlow or PyTorch.
"""
import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = {  # name: (what it stands for, pip install arguments)
    'core': ('pip install .', ['.']),
    'demo': ("make demo: pip install -e '.[data,viz]'", ['-e', '.[data,viz]']),
    'test': ("make test: pip install -e '.[test]'", ['-e', '.[test]']),
}
HEAVY = ('tensorflow', 'tensorflow-cpu', 'torch', 'matplotlib')
LIST_DISTS = ('import importlib.metadata as m, re; '
              'print("\\n".join(sorted({re.sub("[-_.]+", "-", '
              'd.metadata["Name"]).lower() for d in m.distributions()})))')


def install(name, cache, python):
  venv = tempfile.mkdtemp(prefix=f'mae_install_{name}_')
  pip = [os.path.join(venv, 'bin', 'python'), '-m', 'pip', 'install', '-q',
         '--isolated'] + ([] if cache else ['--no-cache-dir'])
  start = time.time()
  try:
    subprocess.run([python, '-m', 'venv', venv], check=True)
    subprocess.run(pip + ['--upgrade', 'pip'], check=True)
    subprocess.run(pip + TARGETS[name][1], cwd=ROOT, check=True)
    seconds = time.time() - start
    size = int(subprocess.run(['du', '-sb', venv], capture_output=True,
                              text=True, check=True).stdout.split()[0])
    dists = subprocess.run([os.path.join(venv, 'bin', 'python'), '-c',
                            LIST_DISTS], capture_output=True, text=True,
                           check=True).stdout.split()
  finally:
    shutil.rmtree(venv, ignore_errors=True)
  return seconds, size, dists


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--targets', default='core,demo,test')
  parser.add_argument('--cache', action='store_true',
                      help="use pip's cache (default: --no-cache-dir)")
  parser.add_argument('--python', default=sys.executable,
                      help='interpreter that creates the venvs')
  args = parser.parse_args()
  names = args.targets.split(',')
  unknown = [n for n in names if n not in TARGETS]
  if unknown:
    parser.error(f'unknown target {unknown[0]!r}; choose from '
                 f'{", ".join(TARGETS)}')
  version = subprocess.run([args.python, '--version'], capture_output=True,
                           text=True, check=True).stdout.strip()
  print(f'{datetime.date.today()}, {platform.machine()}, {os.cpu_count()} '
        f'cores, {version}, pip cache: {"on" if args.cache else "off"}')
  print('| target | command | time | venv size | distributions | '
        + ' | '.join(HEAVY) + ' |')
  print('|---' * (5 + len(HEAVY)) + '|')
  failed = False
  for name in names:
    seconds, size, dists = install(name, args.cache, args.python)
    present = ['yes' if d in dists else 'no' for d in HEAVY]
    print(f'| {name} | `{TARGETS[name][0]}` | {seconds / 60:.1f} min | '
          f'{size / 2**30:.2f} GiB | {len(dists)} | ' + ' | '.join(present)
          + ' |', flush=True)
    if name == 'core' and 'yes' in present[:3]:
      failed = True
  sys.exit(1 if failed else 0)


if __name__ == '__main__':
  main()
