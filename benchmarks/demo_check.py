"""Runs `make demo` in a fresh workdir under /usr/bin/time and records it.

  python benchmarks/demo_check.py [--out docs/DEMO.md]

Checks that the loss falls by at least 30% from the first logged value,
copies the last reconstruction figure to docs/, and writes the wall time,
peak memory and loss table to the report. Exits 1 when the check fails.
"""
import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', default=os.path.join(ROOT, 'docs', 'DEMO.md'))
  args = parser.parse_args()
  workdir = tempfile.mkdtemp(prefix='mae_demo_')
  cmd = ['/usr/bin/time', '-v', 'make', '-C', ROOT, 'demo',
         f'DEMO_DIR={workdir}']
  proc = subprocess.run(cmd, capture_output=True, text=True)
  sys.stdout.write(proc.stdout)
  if proc.returncode:
    sys.stderr.write(proc.stderr[-5000:])
    sys.exit(f'make demo failed with exit code {proc.returncode}')
  wall = re.search(r'Elapsed \(wall clock\) time.*: (\S+)', proc.stderr)[1]
  rss_kb = int(re.search(r'Maximum resident set size \(kbytes\): (\d+)',
                         proc.stderr)[1])
  records = [json.loads(l) for l in open(os.path.join(workdir,
                                                      'metrics.jsonl'))]
  first, last = records[0]['loss'], records[-1]['loss']
  fall = 1 - last / first
  figures = sorted(os.listdir(os.path.join(workdir, 'figures')))
  docs = os.path.dirname(args.out)
  os.makedirs(docs, exist_ok=True)
  figure = os.path.join(docs, 'demo_reconstruction.png')
  shutil.copy(os.path.join(workdir, 'figures', figures[-1]), figure)
  rows = '\n'.join(f'| {r["step"]} | {r["loss"]:.4f} | {r["lr"]:.2e} | '
                   f'{r["img_per_s"]:.1f} |' for r in records)
  with open(args.out, 'w') as f:
    f.write(f"""# `make demo`: measured run

Machine: {platform.machine()}, {os.cpu_count()} cores (the project's CPU
machine); date {datetime.date.today()}; command
`python benchmarks/demo_check.py` (runs `make demo` with an installed
`.venv` under `/usr/bin/time -v`).

- wall time: {wall} (includes start-up and compilation)
- peak resident memory: {rss_kb / 1024:.0f} MiB
- loss: {first:.4f} at the first log, {last:.4f} at the end: a fall of
  {100 * fall:.0f}% (required: at least 30%)

| step | loss | lr | img/s |
|---|---|---|---|
{rows}

Reconstructions of a fixed batch at the last step
(`{os.path.basename(figure)}`; pixel-loss tiny model, 75% of patches removed):

![demo reconstructions]({os.path.basename(figure)})
""")
  print(f'wall {wall}, peak RSS {rss_kb / 1024:.0f} MiB, loss {first:.4f} -> '
        f'{last:.4f} ({100 * fall:.0f}% fall); report: {args.out}')
  shutil.rmtree(workdir)
  if fall < 0.30:
    sys.exit(f'loss fell by only {100 * fall:.0f}% (< 30%)')


if __name__ == '__main__':
  main()
