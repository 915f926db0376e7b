"""The TPU table of docs/TPU.md: benchmarks/tpu_aot.py over pod slices.

  python benchmarks/tpu_table.py [--out docs/tpu_aot.jsonl] [--doc docs/TPU.md]
      [--only pretrain_4096|huge_variants|max_batch|fsdp_fix]

Runs tpu_aot.py once per row (each in its own process, on this CPU host;
rows already in --out with the same settings are not compiled again), then
writes the tables between the markers <!-- tpu_aot:begin --> and
<!-- tpu_aot:end --> of --doc (with --only, only the tables named). Rows:
- pretrain_4096: base / large / huge MAE pretraining at the paper's global
  batch 4096, data parallel, on v3 (128 cores, the paper's), v5p and v5e;
- huge_variants: huge on v5e 16x16 with and without FSDP, with remat;
- max_batch: the largest per-chip batch that fits a v5e chip (16 GiB), per
  size, data parallel on a 2x2 slice: doubling from 8 images per chip
  until one does not fit, then halving the gap down to 8 images;
- fsdp_fix: base with FSDP over 4 chips, with and without batch-sharded
  activations (tpu_aot.py --unpinned), the before/after of that fix, and
  with the qkv kernels sharded by columns (--qkv-columns) instead of rows.
"""
import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {'base': 'mae_vit_base_patch16', 'large': 'mae_vit_large_patch16',
          'huge': 'mae_vit_huge_patch14'}
PAPER = ('He et al. 2021 report ViT-L, 800 epochs of ImageNet-1k (1.28 M '
         'images) in 15.4 h on 128 TPU-v3 cores = 64 chips: about 289 '
         'images/s per chip, about 29% MFU (124.5 GFLOP per image)')
SLICES = (('v3:8x8', 128), ('v5p:4x4x4', 64), ('v5e:16x16', 256))
KEY = ('topology', 'task', 'model', 'batch', 'accum', 'mesh', 'dtype',
       'scan', 'remat', 'unpinned', 'qkv_columns')


def row(topology, size, batch, mesh, remat=False, unpinned=False,
        qkv_columns=False):
  return {'topology': topology, 'task': 'pretrain', 'model': MODELS[size],
          'batch': batch, 'accum': 1, 'mesh': list(mesh), 'dtype': 'bfloat16',
          'scan': True, 'remat': remat, 'unpinned': unpinned,
          'qkv_columns': qkv_columns}


def key(r):
  """Rows written before a flag existed ran without it."""
  return json.dumps([r.get(k, False) for k in KEY])


def run(r, out, done):
  """The result of row `r`: from `done` (earlier results by key) or a
  fresh tpu_aot.py process appending to `out`."""
  if key(r) in done:
    return done[key(r)]
  cmd = [sys.executable, os.path.join(ROOT, 'benchmarks', 'tpu_aot.py'),
         '--topology', r['topology'], '--model', r['model'], '--batch',
         str(r['batch']), '--mesh', ','.join(map(str, r['mesh'])),
         '--task', r['task'], '--dtype', r['dtype'], '--out', out]
  cmd += [f"--{k.replace('_', '-')}"
          for k in ('scan', 'remat', 'unpinned', 'qkv_columns') if r[k]]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  print(proc.stdout.strip() or proc.stderr.strip()[-2000:], flush=True)
  done.update(load(out))
  return done.get(key(r))


def load(path):
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return {key(r): r for r in map(json.loads, f) if r}


def fits(r):
  return bool(r) and r['status'] == 'ok' and r['fits']


def rows_pretrain(out, done):
  """(row, result, [sharding choice]) per slice and size: data parallel;
  where that does not fit, with remat; then FSDP over 4 devices too."""
  rows = []
  for topology, n in SLICES:
    for size in MODELS:
      for spec, choice in (((n, 1), False), ((n, 1), True),
                           ((n // 4, 4), True)):
        r = row(topology, size, 4096, spec, remat=choice)
        result = run(r, out, done)
        rows.append((r, result, ['data parallel' + (' + remat' if choice
                                                    else '')
                                 if spec[1] == 1 else 'FSDP 4 + remat']))
        if fits(result):
          break
  return rows


def rows_huge():
  return [row('v5e:16x16', 'huge', 4096, mesh, remat)
          for mesh in ((256, 1), (64, 4)) for remat in (False, True)]


def rows_fsdp():
  return [row('v5e:2x2', 'base', 256, (1, 4), unpinned=u, qkv_columns=c)
          for u, c in ((True, False), (False, True), (False, False))]


def max_batch(size, out, done, chips=4):
  """(largest per-chip batch that fits, the rows tried)."""
  tried, per_chip, best, fails = [], 8, 0, None
  while fails is None:
    r = run(row('v5e:2x2', size, per_chip * chips, (chips, 1)), out, done)
    tried.append(r)
    if fits(r):
      best, per_chip = per_chip, per_chip * 2
    else:
      fails = per_chip
  while fails - best > 8 and best:
    mid = (best + fails) // 2 // 8 * 8
    r = run(row('v5e:2x2', size, mid * chips, (chips, 1)), out, done)
    tried.append(r)
    if fits(r):
      best = mid
    else:
      fails = mid
  return best, tried


# -- the tables ---------------------------------------------------------------

def gib(x):
  return f'{x / 2**30:.2f}'


def mem_cells(r):
  if r is None:
    return ['not run'] * 4
  if r['status'] != 'ok':
    need = re.search(r'temporaries \(([\d.]+G)\) exceeds available HBM '
                     r'\(([\d.]+G)\)', r.get('error', ''))
    why = (f'no: {need.group(1)} of temporaries, {need.group(2)} free'
           if need else f"{r['status']}: {r.get('error', '')[:60]}")
    return ['', '', '', why]
  m = r['memory']
  return [gib(m['arguments']), gib(m['temporaries']),
          f"{gib(m['total'])} / {gib(r['hbm_per_device'])}",
          'yes' if r['fits'] else '**no**']


def comm_cell(r):
  if not r or r['status'] != 'ok':
    return ''
  total = sum(v['wire_bytes'] for k, v in r['collectives'].items()
              if isinstance(v, dict))
  return f'{total / 2**20:,.0f}'


def bound_cells(r):
  if not r or r['status'] != 'ok':
    return ['', '', '']
  b = r['roofline']
  return [f"{b['step_s_bound'] * 1e3:,.0f} ({b['limited_by']})",
          f"{b['images_per_s_per_chip_bound']:,.0f}",
          f"{b['mfu_bound']:.0%}"]


def table(rows, extra_head=()):
  head = (['slice', 'model', 'global batch', 'mesh (data, fsdp)', *extra_head,
           'args GiB', 'temps GiB', 'total / HBM GiB', 'fits',
           'wire MiB / step', 'step ms bound', 'img/s/chip bound',
           'MFU bound', 'compile s'])
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for spec, r, extra in rows:
    cells = [spec['topology'], spec['model'], str(spec['batch']),
             str(tuple(spec['mesh'])), *extra, *mem_cells(r), comm_cell(r),
             *bound_cells(r),
             str(r.get('compile_s', '')) if r else '']
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def render(sections, results_path):
  stamp = (f'Measured {datetime.date.today().isoformat()} on a '
           f'{os.cpu_count()}-core {platform.machine()} CPU host (no TPU), '
           f'`python benchmarks/tpu_table.py`; raw lines: '
           f'`{os.path.relpath(results_path, ROOT)}`.')
  return '\n\n'.join([stamp, *sections])


def write_doc(doc, text):
  begin, end = '<!-- tpu_aot:begin -->', '<!-- tpu_aot:end -->'
  with open(doc) as f:
    page = f.read()
  if begin not in page:
    page = page.rstrip('\n') + f'\n\n{begin}\n{end}\n'
  head, rest = page.split(begin, 1)
  tail = rest.split(end, 1)[1]
  with open(doc, 'w') as f:
    f.write(f'{head}{begin}\n{text}\n{end}{tail}')


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', default=os.path.join(ROOT, 'docs',
                                                    'tpu_aot.jsonl'))
  parser.add_argument('--doc', default=os.path.join(ROOT, 'docs', 'TPU.md'))
  parser.add_argument('--only', nargs='*', default=None)
  args = parser.parse_args(argv)
  want = set(args.only or ('fsdp_fix', 'pretrain_4096', 'huge_variants',
                           'max_batch'))
  done = load(args.out)
  sections = []
  if 'fsdp_fix' in want:
    rows = [(r, run(r, args.out, done),
             ['no' if r['unpinned'] else 'yes',
              'columns' if r['qkv_columns'] else 'rows'])
            for r in rows_fsdp()]
    sections.append('**FSDP before/after** (batch-sharded activations, '
                    'then qkv kernels sharded by rows):\n\n'
                    + table(rows, ['activations pinned', 'qkv kernels by']))
  if 'pretrain_4096' in want:
    rows = rows_pretrain(args.out, done)
    sections.append('**Pretraining at global batch 4096** (scan_blocks, '
                    'bf16; a row that does not fit is followed by the next '
                    f'sharding choice). Paper: {PAPER}.\n\n'
                    + table(rows, ['choice']))
  if 'huge_variants' in want:
    rows = [(r, run(r, args.out, done), ['yes' if r['remat'] else 'no'])
            for r in rows_huge()]
    sections.append('**Huge on v5e 16x16**, FSDP and remat:\n\n'
                    + table(rows, ['remat']))
  if 'max_batch' in want:
    lines = ['| model | largest per-chip batch that fits (v5e, 16 GiB) | '
             'total GiB there | per-chip batches tried |', '|---|---|---|---|']
    for size in MODELS:
      best, tried = max_batch(size, args.out, done)
      at = [r for r in tried if r and r['batch'] == best * 4]
      total = gib(at[0]['memory']['total']) if at else ''
      seen = ', '.join(f"{r['batch'] // 4}{'' if fits(r) else ' (no)'}"
                       for r in tried if r)
      lines.append(f'| {MODELS[size]} | {best} | {total} | {seen} |')
    sections.append('**Largest per-chip batch** (data parallel on v5e 2x2, '
                    'scan_blocks, bf16, no remat):\n\n' + '\n'.join(lines))
  write_doc(args.doc, render(sections, args.out))
  return 0


if __name__ == '__main__':
  sys.exit(main())
