"""Op time of a traced training step by kind, source and kernel.

  python benchmarks/trace_tables.py docs/gpu/trace_large_bf16.json.gz \
      docs/gpu/hlo_large_bf16.txt.gz --steps 3 [--out p.json]

Rebuilds the tables of benchmarks/profile_step.py from a kept trace
(jax.profiler's .trace.json.gz) and the step's optimized HLO text, so a
profile taken on a GPU machine can be read again anywhere. Every op event is
classified by what its HLO computes (KINDS) and by where it comes from in
the model (SOURCES, from the op_name metadata, forward and backward apart).
On an accelerator the kernels of the device's stream lines are counted; a
kernel launched from a command buffer (a CUDA graph) carries the buffer's
name, so it is matched to its HLO fusion by the kernel's name, and library
kernels (cuBLAS, cuDNN) by their names alone.
"""
import argparse
import collections
import gzip
import json
import re

ATTENTION = 'attention (cuDNN fused)'
# First match wins: a fusion holding a dot is a matmul whatever else it does.
KINDS = ((ATTENTION, ('__cudnn$fmha',)),
         ('matmul', ('dot(', 'convolution(', '__cublas$')),
         ('gelu (erf)', ('erf(',)),
         ('exp (softmax, GELU backward)', ('exponential(',)),
         ('sort (masking)', ('sort(',)),
         ('gather / scatter', ('gather(', 'scatter(')),
         ('reduce (norms, loss, bias gradients)', ('reduce(',)),
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


# Kinds of device kernels the HLO does not name (first match on the kernel
# name wins).
KERNEL_KINDS = ((ATTENTION, r'fmha|flash|cudnn'),
                ('matmul', r'gemm|nvjet|xmma|cutlass|wgmma'),
                ('copy / transpose', r'memcpy|memset|copy|transpose'),
                ('other', r''))


def device_events(events):
  """(events, on_device): the 'X' events of device kernels in a trace, on an
  accelerator those of its stream lines (the derived 'XLA Ops' / 'XLA
  Modules' lines repeat them); without one, every 'X' event (False)."""
  devices = {e['pid'] for e in events
             if e.get('ph') == 'M' and e.get('name') == 'process_name'
             and re.search(r'/device:(GPU|TPU)',
                           str(e.get('args', {}).get('name', '')))}
  if not devices:
    return [e for e in events if e.get('ph') == 'X'], False
  threads = {(e['pid'], e.get('tid')): str(e.get('args', {}).get('name', ''))
             for e in events if e.get('ph') == 'M'
             and e.get('name') == 'thread_name' and e.get('pid') in devices}
  streams = {key for key, name in threads.items()
             if re.search(r'stream', name, re.I)}
  return [e for e in events if e.get('ph') == 'X' and e.get('pid') in devices
          and (not streams or (e['pid'], e.get('tid')) in streams)], True


def busy_share(events):
  """(union of the events' intervals) / (first start to last end)."""
  spans = sorted((e['ts'], e['ts'] + e.get('dur', 0)) for e in events)
  if not spans:
    return None
  busy, (start, end) = 0.0, spans[0]
  for a, b in spans[1:]:
    if a > end:
      busy, start = busy + end - start, a
    end = max(end, b)
  busy += end - start
  wall = max(b for _, b in spans) - spans[0][0]
  return busy / wall if wall > 0 else None


def kernel_kind(name):
  """The kind of a kernel the HLO does not name, by its name."""
  return next(k for k, pattern in KERNEL_KINDS if re.search(pattern, name,
                                                            re.I))


def duration_groups(launches, steps, gap=1.25):
  """Launches [(kernel name, µs)] grouped by name and duration: each
  name's durations, sorted, split where one exceeds the one before by more
  than `gap` times, so the same kernel on differently shaped work (the
  encoder's and the decoder's attention) falls in separate groups.
  [{'kernel', 'launches_per_step', 'median_us', 'ms_per_step'}], largest
  total first."""
  by_name = collections.defaultdict(list)
  for name, us in launches:
    by_name[name].append(us)
  groups = []
  for name, durations in by_name.items():
    durations.sort()
    start = 0
    for i in range(1, len(durations) + 1):
      if i == len(durations) or durations[i] > gap * durations[i - 1]:
        part = durations[start:i]
        groups.append({'kernel': name[:90],
                       'launches_per_step': len(part) / steps,
                       'median_us': part[len(part) // 2],
                       'ms_per_step': sum(part) / 1e3 / steps})
        start = i
  return sorted(groups, key=lambda g: -g['ms_per_step'])


def summarize(events, hlo_text, steps, on_device, title):
  """Prints and returns the tables of `steps` traced steps: {'op_ms_per_step',
  'device_busy_share', 'kernels_per_step', 'kinds', 'sources',
  'kinds_and_sources', 'kernels', 'attention_groups'}."""
  kinds, sources = hlo_kinds(hlo_text), hlo_sources(hlo_text)
  by_kernel_name = {re.sub(r'[.\-]', '_', name): name for name in kinds}
  per_kind, per_source = collections.Counter(), collections.Counter()
  per_work = collections.Counter()
  per_kernel, launches = collections.Counter(), collections.Counter()
  counted, attention = [], []
  for e in events:
    name = e.get('name', '')
    op = e.get('args', {}).get('hlo_op', name)
    if op not in kinds:  # a kernel of a command buffer, or not the step's
      op = by_kernel_name.get(name)
      if op is None and not on_device:
        continue
    counted.append(e)
    ms = e.get('dur', 0) / 1e3 / steps
    kind = kinds.get(op) or kernel_kind(name)
    per_kind[kind] += ms
    source = sources.get(op) or 'library kernel'
    per_source[source if op in sources else f'{kind} (library kernel)'] += ms
    per_work[f'{kind} | {source}'] += ms
    per_kernel[(name[:90], kind)] += ms
    launches[(name[:90], kind)] += 1 / steps
    if kind == ATTENTION:
      attention.append((name, e.get('dur', 0)))
  total = sum(per_kind.values())
  busy = busy_share(counted)
  print(f'{title}: {total:.1f} ms of op time per step '
        f'({sum(launches.values()):.0f} ops or kernels per step; ops may '
        'overlap on several threads); device busy '
        + (f'{100 * busy:.1f}%' if busy else '?')
        + f' of the span of {steps} steps dispatched back to back')
  result = {'op_ms_per_step': total, 'device_busy_share': busy,
            'kernels_per_step': sum(launches.values()),
            'kinds': table(per_kind, 'kind', 24)}
  print('  by source:')
  result['sources'] = table(per_source, 'source', 58)
  print('  by kind and source:')
  result['kinds_and_sources'] = table(per_work, 'kind | source', 80)
  print('  slowest kernels (name, kind, launches per step):')
  result['kernels'] = []
  for (kernel, kind), ms in per_kernel.most_common(25):
    result['kernels'].append({'kernel': kernel, 'kind': kind,
                              'ms_per_step': ms, 'share': ms / total,
                              'launches_per_step': launches[(kernel, kind)]})
    print(f'  {ms:8.2f} ms {100 * ms / total:5.1f}%  x'
          f'{launches[(kernel, kind)]:<5.0f} {kind:14.14s} {kernel}')
  result['attention_groups'] = duration_groups(attention, steps)
  if attention:
    print('  attention kernels by name and duration (ms per step, launches '
          'per step, median µs per launch):')
  for g in result['attention_groups']:
    print(f"  {g['ms_per_step']:8.2f} ms  x{g['launches_per_step']:<5.0f} "
          f"{g['median_us']:8.1f} µs  {g['kernel']}")
  return result


def read_trace(path):
  """The events of a .trace.json.gz."""
  with gzip.open(path) as f:
    trace = json.load(f)
  return trace['traceEvents'] if isinstance(trace, dict) else trace


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('trace', help='.trace.json.gz of the traced steps')
  parser.add_argument('hlo', help="the step's optimized HLO text (gzip)")
  parser.add_argument('--steps', type=int, required=True,
                      help='steps in the trace')
  parser.add_argument('--out', help='write the tables here as JSON')
  args = parser.parse_args()
  with gzip.open(args.hlo, 'rt') as f:
    hlo_text = f.read()
  events, on_device = device_events(read_trace(args.trace))
  result = summarize(events, hlo_text, args.steps, on_device, args.trace)
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(result, f, indent=1)


if __name__ == '__main__':
  main()
