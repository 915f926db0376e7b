"""Measures the README's `make demo` as a new user runs it, and records it.

  python benchmarks/demo_check.py [--out docs/DEMO.md]

Clones the committed HEAD into a temporary directory (a fresh checkout,
no .venv), then runs there, each under `/usr/bin/time -v`:
  1. the demo's install alone (`make .venv/.demo-installed`), then
  2. `make demo`, exactly as the README writes it (default DEMO_DIR,
     the relative `workdirs/demo`).
Checks that the loss falls by at least 30% from the first logged value,
copies the last reconstruction figure to docs/, and writes the wall times,
peak memory and loss table to the report. Exits 1 when a check fails.
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


def timed(cmd, cwd):
  """(wall clock text, peak RSS in MiB, stdout) of `cmd` under time -v."""
  proc = subprocess.run(['/usr/bin/time', '-v', *cmd], cwd=cwd,
                        capture_output=True, text=True)
  sys.stdout.write(proc.stdout)
  if proc.returncode:
    sys.stderr.write(proc.stderr[-5000:])
    sys.exit(f'{" ".join(cmd)} failed with exit code {proc.returncode}')
  wall = re.search(r'Elapsed \(wall clock\) time.*: (\S+)', proc.stderr)[1]
  rss_kb = int(re.search(r'Maximum resident set size \(kbytes\): (\d+)',
                         proc.stderr)[1])
  return wall, rss_kb / 1024, proc.stdout


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', default=os.path.join(ROOT, 'docs', 'DEMO.md'))
  args = parser.parse_args()
  clone = tempfile.mkdtemp(prefix='mae_demo_clone_')
  subprocess.run(['git', 'clone', '-q', ROOT, clone], check=True)
  head = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=clone,
                        capture_output=True, text=True, check=True).stdout
  install_wall, _, _ = timed(['make', '.venv/.demo-installed'], clone)
  wall, rss, log = timed(['make', 'demo'], clone)
  workdir = os.path.join(clone, 'workdirs', 'demo')
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  first, last = records[0]['loss'], records[-1]['loss']
  fall = 1 - last / first
  figures = sorted(os.listdir(os.path.join(workdir, 'figures')))
  docs = os.path.dirname(args.out)
  os.makedirs(docs, exist_ok=True)
  figure = os.path.join(docs, 'demo_reconstruction.png')
  shutil.copy(os.path.join(workdir, 'figures', figures[-1]), figure)
  rate = lambda r: f'{r["img_per_s"]:.1f}' if 'img_per_s' in r else '–'
  rows = '\n'.join(f'| {r["step"]} | {r["loss"]:.4f} | {r["lr"]:.2e} | '
                   f'{rate(r)} |' for r in records)
  lines = [l for l in log.splitlines() if l.startswith(('starting', 'done'))]
  with open(args.out, 'w') as f:
    f.write(f"""# `make demo`: measured run

Machine: {platform.machine()}, {os.cpu_count()} cores (the project's CPU
machine); date {datetime.date.today()}; command
`python benchmarks/demo_check.py`: a fresh clone of commit {head.strip()}
(no `.venv`), where the demo's install and then `make demo`, as the README
writes it, run under `/usr/bin/time -v`.

- install (`.venv` with `mae_jax[data,viz]`, pip's cache as this machine
  had it): {install_wall}
- `make demo` (training; includes start-up and compilation): {wall}
- peak resident memory of `make demo`: {rss:.0f} MiB
- loss (mean over each log interval): {first:.4f} at the first log,
  {last:.4f} at the end: a fall of {100 * fall:.0f}% (required: at least 30%)

```
{chr(10).join(lines)}
```

| step | loss | lr | img/s |
|---|---|---|---|
{rows}

img/s leaves out compilation, figures and restored steps; the first line has
none (nothing measured yet).

Reconstructions of a fixed batch at the last step
(`{os.path.basename(figure)}`; pixel-loss tiny model, 75% of patches removed):

![demo reconstructions]({os.path.basename(figure)})
""")
  print(f'install {install_wall}, make demo {wall}, peak RSS {rss:.0f} MiB, '
        f'loss {first:.4f} -> {last:.4f} ({100 * fall:.0f}% fall); '
        f'report: {args.out}')
  shutil.rmtree(clone)
  if fall < 0.30:
    sys.exit(f'loss fell by only {100 * fall:.0f}% (< 30%)')


if __name__ == '__main__':
  main()
