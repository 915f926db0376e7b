"""Where the pretraining step spends its time: op time by kind, traced.

  python benchmarks/profile_step.py --model mae_vit_base_patch16 --batch 16 \
      [--dtype float32] [--attention default] [--steps 3] [--out p.json]

A jax.profiler trace of the compiled train step, its op times summed by
kind. Runs the real jitted train step of mae_jax.train.pretrain (as
benchmarks/pretrain_throughput.py does) on a synthetic batch, traces
--steps steps after two warm-up steps, and classifies every XLA op of the
trace by what its HLO computes: matmuls (dot, alone or fused), cuDNN's
fused attention, GELU (erf), exp (softmax, GELU backward), reductions
(LayerNorm, loss, bias gradients, optimizer norms), sort (masking argsort),
gather/scatter, copies/transposes, and the rest (mostly elementwise: AdamW,
residual adds). A second table sums the same op
times by where they come from in the model (the op_name of each op: dense
layers, attention core, GELU, LayerNorm, the rest of the model, outside it),
forward and backward apart. --torch-peer adds the PyTorch peer's step
(transformers' ViTMAEForPreTraining, benchmarks/torch_peer.py) by
torch.profiler, its op self times summed by group. Prints ms per step and
share of the traced op time, the slowest kernels, and the share of the
traced span the device was busy (the steps are dispatched back to back, one
wait at the end); --out writes the tables as JSON, --keep-trace and
--keep-hlo keep the trace and the optimized HLO, from which
benchmarks/trace_tables.py rebuilds the tables. The classification is in
benchmarks/trace_tables.py. Imports no TensorFlow.
"""
import argparse
import collections
import glob
import gzip
import json
import os
import re
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.pretrain_throughput import (add_step_args, build_step,  # noqa: E402
                                            parse_options)
from benchmarks.torch_peer import peer_step  # noqa: E402
from benchmarks.trace_tables import (device_events, read_trace,  # noqa: E402
                                     summarize, table)
from mae_jax.schema import ATTENTION  # noqa: E402

# The PyTorch peer's ops by group: first match on the aten op's name wins.
TORCH_GROUPS = (('matmul', r'^aten::(mm|addmm|bmm|matmul|linear)$'),
                ('attention', r'scaled_dot_product|attention'),
                ('GELU', r'gelu'),
                ('LayerNorm', r'layer_norm'),
                ('convolution (patch embedding)', r'convolution'),
                ('other', r''))

def torch_profile(args):
  """[{'group', 'ms_per_step', 'share'}] of the PyTorch peer's step: the
  self CPU time of its ops by torch.profiler, summed by TORCH_GROUPS."""
  import torch  # pylint: disable=import-outside-toplevel
  step = peer_step(args.model, args.image_size, args.batch, args.dtype)
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


def trace_steps(compiled, state, images, steps, keep=None):
  """The trace events of `steps` updates dispatched back to back (one wait
  at the end); the trace file is copied to `keep` if given."""
  with tempfile.TemporaryDirectory() as tmp:
    jax.profiler.start_trace(tmp, create_perfetto_trace=True)
    for i in range(steps):
      state, metrics = compiled(state, images, jnp.int32(i))
    jax.block_until_ready(metrics)
    jax.profiler.stop_trace()
    path = glob.glob(os.path.join(tmp, '**', '*.trace.json.gz'),
                     recursive=True)[0]
    if keep:
      shutil.copyfile(path, keep)
    return read_trace(path)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_step_args(parser)
  parser.add_argument('--attention', default='default', choices=ATTENTION,
                      help='config.attention')
  parser.add_argument('--split-qkv', default='on', choices=('on', 'off'),
                      help='config.split_qkv')
  parser.add_argument('--xla-options', default='',
                      help='XLA compiler options of the step, '
                      "'option=value,...'")
  parser.add_argument('--torch-peer', action='store_true',
                      help='also profile the PyTorch peer of the same shape')
  parser.add_argument('--out', help='write the tables here as JSON')
  parser.add_argument('--keep-trace', help='copy the trace (.json.gz) here')
  parser.add_argument('--keep-hlo', help='write the optimized HLO (gzip) here')
  parser.set_defaults(steps=3)
  args = parser.parse_args()

  options = dict(parse_options('x=' + args.xla_options))['x']
  compiled, state, images, _ = build_step(args, args.attention,
                                          options=options,
                                          split=args.split_qkv == 'on')
  hlo_text = compiled.as_text()
  if args.keep_hlo:
    with gzip.open(args.keep_hlo, 'wt') as f:
      f.write(hlo_text)
  for i in range(2):
    state, metrics = compiled(state, images, jnp.int32(i))
  jax.block_until_ready(metrics)
  events, on_device = device_events(trace_steps(
      compiled, state, images, args.steps, args.keep_trace))
  result = summarize(events, hlo_text, args.steps, on_device,
                     f'{args.model} batch {args.batch} {args.dtype} on '
                     f'{jax.devices()[0].device_kind}')
  peer = torch_profile(args) if args.torch_peer else None
  if args.out:
    with open(args.out, 'w') as f:
      json.dump({'model': args.model, 'batch': args.batch,
                 'dtype': args.dtype, 'attention': args.attention,
                 'split_qkv': args.split_qkv == 'on', 'xla_options': options,
                 'jax': jax.__version__,
                 'device': jax.devices()[0].device_kind, **result,
                 'torch_peer': peer}, f, indent=1)


if __name__ == '__main__':
  main()
