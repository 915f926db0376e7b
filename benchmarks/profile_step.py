"""Where the pretraining step spends its time: op time by kind, traced.

  python benchmarks/profile_step.py --model mae_vit_base_patch16 --batch 16 \
      [--dtype float32] [--attention default] [--steps 3] [--out p.json]

A jax.profiler trace of the compiled train step, its op times summed by
kind. Runs the real jitted train step of mae_jax.train.pretrain (as
benchmarks/pretrain_throughput.py does) on a synthetic batch, traces
--steps steps after two warm-up steps, and classifies every XLA op of the
trace by what its HLO computes: matmuls (dot, alone or fused), attention
softmax (exp), GELU (erf), reductions (LayerNorm, loss, optimizer norms),
sort (masking argsort), gather/scatter, copies/transposes, and the rest
(mostly elementwise: AdamW, residual adds). A second table sums the same op
times by where they come from in the model (the op_name of each op: dense
layers, attention core, GELU, LayerNorm, the rest of the model, outside it),
forward and backward apart. --torch-peer adds the PyTorch peer's step
(transformers' ViTMAEForPreTraining, as in pretrain_throughput.py) by
torch.profiler, its op self times summed by group. Prints ms per step and
share of the traced op time; --out writes the tables as JSON. Imports no
TensorFlow.
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

from benchmarks.pretrain_throughput import (add_step_args, build_step,  # noqa: E402
                                            torch_step)
from mae_jax.schema import ATTENTION  # noqa: E402

# The PyTorch peer's ops by group: first match on the aten op's name wins.
TORCH_GROUPS = (('matmul', r'^aten::(mm|addmm|bmm|matmul|linear)$'),
                ('attention', r'scaled_dot_product|attention'),
                ('GELU', r'gelu'),
                ('LayerNorm', r'layer_norm'),
                ('convolution (patch embedding)', r'convolution'),
                ('other', r''))

# First match wins: a fusion holding a dot is a matmul whatever else it does.
KINDS = (('matmul', ('dot(', 'convolution(')),
         ('softmax (exp)', ('exponential(',)),
         ('gelu (erf)', ('erf(',)),
         ('sort (masking)', ('sort(',)),
         ('gather / scatter', ('gather(', 'scatter(')),
         ('reduce (norms, loss)', ('reduce(',)),
         ('copy / transpose', ('copy(', 'transpose(')))


# First match wins, on the op_name JAX gives each op.
SOURCES = (('dense layers (qkv, proj, fc1, fc2)', r'/(qkv|proj|fc1|fc2)/'),
           ('attention core (scores, softmax, weighted sum)', r'/attn/'),
           ('GELU', r'/mlp/'),
           ('LayerNorm', r'/(decoder_)?norm\d?/'),
           ('rest of the model (embedding, masking, loss)',
            r'MaskedAutoencoder'),
           ('outside the model (optimizer, gradient sums)', r''))


def hlo_sources(hlo_text):
  """{instruction name: 'SOURCE, forward' or 'SOURCE, backward'} from the
  op_name metadata of every instruction in the module."""
  sources = {}
  for line in hlo_text.splitlines():
    m = re.match(r'^\s*(?:ROOT )?%?([\w.\-]+) = ', line)
    if not m:
      continue
    op = re.search(r'op_name="([^"]*)"', line)
    op = op.group(1) if op else ''
    source = next(name for name, pattern in SOURCES if re.search(pattern, op))
    backward = 'transpose(jvp(' in op
    if source.startswith('outside'):
      sources[m.group(1)] = source
    else:
      sources[m.group(1)] = source + (', backward' if backward else
                                      ', forward')
  return sources


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


def table(counter, key, width):
  """Rows {key, 'ms_per_step', 'share'} of a Counter of ms, largest first,
  each also printed."""
  total = sum(counter.values())
  rows = []
  for name, ms in counter.most_common():
    rows.append({key: name, 'ms_per_step': ms, 'share': ms / total})
    print(f'  {name:{width}s} {ms:9.1f} ms  {100 * ms / total:5.1f}%')
  return rows


def torch_profile(args):
  """[{'group', 'ms_per_step', 'share'}] of the PyTorch peer's step: the
  self CPU time of its ops by torch.profiler, summed by TORCH_GROUPS."""
  import torch  # pylint: disable=import-outside-toplevel
  step = torch_step(args)
  step()
  step()
  with torch.profiler.profile(
      activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    for _ in range(args.steps):
      step()
  per_group = collections.Counter()
  for event in prof.key_averages():
    group = next(name for name, pattern in TORCH_GROUPS
                 if re.search(pattern, event.key))
    per_group[group] += event.self_cpu_time_total / 1e3 / args.steps
  print(f'PyTorch peer: {sum(per_group.values()):.0f} ms of op self time '
        'per step')
  return table(per_group, 'group', 30)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_step_args(parser)
  parser.add_argument('--attention', default='default', choices=ATTENTION,
                      help='config.attention')
  parser.add_argument('--torch-peer', action='store_true',
                      help='also profile the PyTorch peer of the same shape')
  parser.add_argument('--out', help='write the tables here as JSON')
  parser.set_defaults(steps=3)
  args = parser.parse_args()

  compiled, state, images, _ = build_step(args, args.attention)
  hlo_text = compiled.as_text()
  kinds, sources = hlo_kinds(hlo_text), hlo_sources(hlo_text)
  for i in range(2):
    state, metrics = compiled(state, images, jnp.int32(i))
  jax.block_until_ready(metrics)
  with tempfile.TemporaryDirectory() as tmp:
    jax.profiler.start_trace(tmp, create_perfetto_trace=True)
    for i in range(args.steps):
      state, metrics = compiled(state, images, jnp.int32(i))
      jax.block_until_ready(metrics)
    jax.profiler.stop_trace()
    path = glob.glob(os.path.join(tmp, '**', '*.trace.json.gz'),
                     recursive=True)[0]
    with gzip.open(path) as f:
      trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  per_kind, per_op = collections.Counter(), collections.Counter()
  per_source = collections.Counter()
  # On an accelerator count only its kernels (named by kernel; the HLO op
  # is in args.hlo_op), not the host's launches of them.
  devices = {e['pid'] for e in events
             if e.get('ph') == 'M' and e.get('name') == 'process_name'
             and re.search(r'/device:(GPU|TPU)',
                           str(e.get('args', {}).get('name', '')))}
  for e in events:
    name = e.get('args', {}).get('hlo_op', e.get('name'))
    if (e.get('ph') == 'X' and name in kinds
        and (not devices or e.get('pid') in devices)):
      ms = e.get('dur', 0) / 1e3 / args.steps
      per_kind[kinds[name]] += ms
      per_op[name] += ms
      per_source[sources.get(name, 'unattributed')] += ms
  total = sum(per_kind.values())
  print(f'{args.model} batch {args.batch} {args.dtype} on '
        f'{jax.devices()[0].device_kind}: {total:.0f} ms of op time per step '
        f'({len(per_op)} ops; ops may overlap on several threads)')
  rows = table(per_kind, 'kind', 22)
  print('  by source:')
  source_rows = table(per_source, 'source', 58)
  print('  slowest ops: ' + ', '.join(
      f'{name} ({kinds[name]}) {ms:.0f} ms'
      for name, ms in per_op.most_common(6)))
  peer = torch_profile(args) if args.torch_peer else None
  if args.out:
    with open(args.out, 'w') as f:
      json.dump({'model': args.model, 'batch': args.batch,
                 'dtype': args.dtype, 'attention': args.attention,
                 'jax': jax.__version__,
                 'device': jax.devices()[0].device_kind,
                 'op_ms_per_step': total, 'kinds': rows,
                 'sources': source_rows, 'torch_peer': peer}, f, indent=1)


if __name__ == '__main__':
  main()
