"""Times converting a random mae_vit_huge_patch14 full checkpoint (~2.6 GB).

Builds the file with the test reference (tests/torch_mae.py), then runs
convert_torch_weights.py under /usr/bin/time -v and prints wall time, peak
RSS and their ratio to the file size.

  .venv/bin/python benchmarks/convert_huge.py [--workdir /tmp/mae_huge_bench]
"""
import argparse
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_checkpoint(path):
  import torch  # pylint: disable=import-outside-toplevel
  from tests import torch_mae  # pylint: disable=import-outside-toplevel
  model = torch_mae.make_mae('huge_patch14')
  torch.save({'model': model.state_dict()}, path)


def measure(cmd):
  """Runs cmd under /usr/bin/time -v -> (wall_s, peak_rss_bytes, output)."""
  start = time.perf_counter()
  proc = subprocess.run(['/usr/bin/time', '-v', *cmd], capture_output=True,
                        text=True, check=False, cwd=ROOT)
  wall = time.perf_counter() - start
  if proc.returncode:
    raise SystemExit(f'conversion failed:\n{proc.stdout}\n{proc.stderr}')
  rss_kb = int(re.search(r'Maximum resident set size \(kbytes\): (\d+)',
                         proc.stderr).group(1))
  return wall, rss_kb * 1024, proc.stdout


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', default='/tmp/mae_huge_bench')
  args = parser.parse_args()
  work = pathlib.Path(args.workdir)
  work.mkdir(parents=True, exist_ok=True)
  src, dst = work / 'mae_pretrain_vit_huge_full.pth', work / 'mae_huge'
  if not src.exists():
    make_checkpoint(src)
  shutil.rmtree(dst, ignore_errors=True)
  cmd = [sys.executable, 'convert_torch_weights.py', str(src), str(dst)]
  wall, rss, out = measure(cmd)
  size = os.path.getsize(src)
  print(out.strip())
  print(f'command: /usr/bin/time -v {" ".join(cmd)}')
  print(f'file size: {size / 2**30:.2f} GiB; wall: {wall:.1f} s; peak RSS: '
        f'{rss / 2**30:.2f} GiB ({rss / size:.2f}x file size)')


if __name__ == '__main__':
  main()
