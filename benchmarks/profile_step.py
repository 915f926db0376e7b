"""Where the pretraining step spends its time: op time by kind, traced.

  python benchmarks/profile_step.py --model mae_vit_base_patch16 --batch 16 \
      [--dtype float32] [--steps 3] [--out profile.json]

A jax.profiler trace of the compiled train step, its op times summed by
kind. Runs the real jitted train step of mae_jax.trainer (as
benchmarks/pretrain_throughput.py does) on a synthetic batch, traces
--steps steps after two warm-up steps, and classifies every XLA op of the
trace by what its HLO computes: matmuls (dot, alone or fused), attention
softmax (exp), GELU (erf), reductions (LayerNorm, loss, optimizer norms),
sort (masking argsort), gather/scatter, copies/transposes, and the rest
(mostly elementwise: AdamW, residual adds). Prints ms per step and share of
the traced op time; --out writes the table as JSON. Imports no TensorFlow.
"""
import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.pretrain_throughput import add_step_args, build_step  # noqa: E402

# First match wins: a fusion holding a dot is a matmul whatever else it does.
KINDS = (('matmul', ('dot(', 'convolution(')),
         ('softmax (exp)', ('exponential(',)),
         ('gelu (erf)', ('erf(',)),
         ('sort (masking)', ('sort(',)),
         ('gather / scatter', ('gather(', 'scatter(')),
         ('reduce (norms, loss)', ('reduce(',)),
         ('copy / transpose', ('copy(', 'transpose(')))


def hlo_kinds(hlo_text):
  """{instruction name: kind} for the entry computation's instructions,
  looking inside the computations a fusion or call refers to."""
  bodies, current = {}, None
  for line in hlo_text.splitlines():
    head = re.match(r'^(ENTRY )?%?([\w.\-]+) .*\{$', line)
    if head:
      current = head.group(2)
      bodies[current] = []
    elif current and line.strip() and line.strip() != '}':
      bodies[current].append(line.strip())

  def text_of(name, seen):
    if name in seen or name not in bodies:
      return ''
    seen.add(name)
    out = '\n'.join(bodies[name])
    for called in re.findall(r'(?:calls|to_apply|body|condition)=%?([\w.\-]+)',
                             out):
      out += '\n' + text_of(called, seen)
    return out

  kinds = {}
  for body in bodies.values():
    for line in body:
      m = re.match(r'^(?:ROOT )?%?([\w.\-]+) = .*?\b([\w\-]+)\(', line)
      if not m:
        continue
      name, text = m.group(1), line
      for called in re.findall(r'(?:calls|to_apply)=%?([\w.\-]+)', line):
        text += '\n' + text_of(called, set())
      kinds[name] = next((k for k, keys in KINDS
                          if any(key in text for key in keys)), 'other')
  return kinds


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_step_args(parser)
  parser.add_argument('--out', help='write the table here as JSON')
  parser.set_defaults(steps=3)
  args = parser.parse_args()

  compiled, state, images, _ = build_step(args)
  micro = jnp.int32(0)
  kinds = hlo_kinds(compiled.as_text())
  for i in range(2):
    state, metrics = compiled(state, images, jnp.int32(i), micro)
  jax.block_until_ready(metrics)
  with tempfile.TemporaryDirectory() as tmp:
    jax.profiler.start_trace(tmp, create_perfetto_trace=True)
    for i in range(args.steps):
      state, metrics = compiled(state, images, jnp.int32(i), micro)
      jax.block_until_ready(metrics)
    jax.profiler.stop_trace()
    path = glob.glob(os.path.join(tmp, '**', '*.trace.json.gz'),
                     recursive=True)[0]
    with gzip.open(path) as f:
      trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  per_kind, per_op = collections.Counter(), collections.Counter()
  for e in events:
    if e.get('ph') == 'X' and e['name'] in kinds:
      per_kind[kinds[e['name']]] += e.get('dur', 0) / 1e3 / args.steps
      per_op[e['name']] += e.get('dur', 0) / 1e3 / args.steps
  total = sum(per_kind.values())
  print(f'{args.model} batch {args.batch} {args.dtype} on '
        f'{jax.devices()[0].device_kind}: {total:.0f} ms of op time per step '
        f'({len(per_op)} ops; ops may overlap on several threads)')
  rows = []
  for kind, ms in per_kind.most_common():
    rows.append({'kind': kind, 'ms_per_step': ms, 'share': ms / total})
    print(f'  {kind:22s} {ms:9.1f} ms  {100 * ms / total:5.1f}%')
  print('  slowest ops: ' + ', '.join(
      f'{name} ({kinds[name]}) {ms:.0f} ms'
      for name, ms in per_op.most_common(6)))
  if args.out:
    with open(args.out, 'w') as f:
      json.dump({'model': args.model, 'batch': args.batch,
                 'dtype': args.dtype, 'jax': jax.__version__,
                 'device': jax.devices()[0].device_kind,
                 'op_ms_per_step': total, 'kinds': rows}, f, indent=1)


if __name__ == '__main__':
  main()
