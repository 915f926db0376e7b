"""What a compiled step costs, counted from its programs rather than timed.

`matmul_flops(fn, *args)`: the multiply-add FLOPs of the matrix products and
convolutions in the jaxpr of `fn` (2 per multiply-add), with scan bodies
counted once per iteration. This is the "model FLOPs" of MFU: elementwise
work is left out, and a remat'd function counts its recomputation too.
XLA's own `cost_analysis()['flops']` is not used: for a scanned step it
counts a loop body once (or not at all), and its `optimal_seconds` can come
back negative.

`collectives(hlo_text)`: every collective of an optimized, SPMD-partitioned
HLO module (`compiled.as_text()`), with how often one step runs it (loop
bodies times their trip count) and the bytes of its per-device operand or
result; a collective that the TPU compiler spreads over several fusions
(start, overlapped compute, done: one channel id) counts once, and the
all-reduce inside its fused all-reduce-scatter computations counts as the
reduce-scatter it is. `wire_bytes` is what one device sends in a ring (bandwidth-optimal)
implementation over a group of n devices:
  all-gather      result size * (n-1)/n
  reduce-scatter  result size * (n-1)        (operand = result * n)
  all-reduce      2 * size * (n-1)/n
  all-to-all      size * (n-1)/n
  collective-permute  size
`memory(compiled)`: per-device bytes of the compiled program.
"""
import collections
import math
import re

import jax
import jax.extend as jex

KINDS = ('all-gather', 'reduce-scatter', 'all-reduce', 'all-to-all',
         'collective-permute')
DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 'f8e4m3fn': 1, 'f8e5m2': 1,
               's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2, 's32': 4, 'u32': 4,
               'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16}


# -- FLOPs from the jaxpr -----------------------------------------------------

def _dot_flops(eqn):
  (lhs_contract, _), _ = eqn.params['dimension_numbers']
  lhs = eqn.invars[0].aval.shape
  out = eqn.outvars[0].aval.shape
  return 2 * math.prod(out) * math.prod(lhs[d] for d in lhs_contract)


def _conv_flops(eqn):
  rhs = eqn.invars[1].aval.shape  # kernel: out features, in features / groups
  out = eqn.outvars[0].aval.shape
  spec = eqn.params['dimension_numbers'].rhs_spec  # (out, in, spatial...)
  per_output = math.prod(rhs[d] for d in spec[1:])
  return 2 * math.prod(out) * per_output


def _jaxpr_flops(jaxpr):
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'dot_general':
      total += _dot_flops(eqn)
    elif name == 'conv_general_dilated':
      total += _conv_flops(eqn)
    elif name == 'scan':
      total += eqn.params['length'] * _jaxpr_flops(eqn.params['jaxpr'].jaxpr)
    elif name == 'cond':
      total += max(_jaxpr_flops(b.jaxpr) for b in eqn.params['branches'])
    elif name == 'while':
      raise ValueError('matmul_flops: a while loop has no static trip count')
    else:
      for sub in jex.core.jaxprs_in_params(eqn.params):
        total += _jaxpr_flops(sub)
  return total


def matmul_flops(fn, *args):
  """FLOPs (2 per multiply-add) of the matrix products and convolutions of
  `fn(*args)`; args may be ShapeDtypeStructs (nothing is computed)."""
  return _jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)


# -- collectives from the optimized HLO ---------------------------------------

_COMPUTATION = re.compile(r'^(?:ENTRY )?%?([\w.\-]+) .*\{$')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%?[\w.\-]+ = (.*?) ([a-z\-]+)\((.*)$')
_ARRAY = re.compile(r'\b([a-z]+\d*(?:e\dm\d(?:fn)?)?)\[([\d,]*)\]')
_CALLED = re.compile(
    r'\b(?:calls|to_apply|body|condition)=%?([\w.\-]+)'
    r'|branch_computations=\{([^}]*)\}')
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


def _arrays(type_text, scalars=True):
  """Bytes of each array named in an HLO type string (`scalars`: also of
  rank-0 ones, which async collectives use as contexts)."""
  out = []
  for dtype, dims in _ARRAY.findall(type_text):
    shape = [int(d) for d in dims.split(',') if d]
    if dtype in DTYPE_BYTES and (scalars or shape):
      out.append(DTYPE_BYTES[dtype] * math.prod(shape))
  return out


def group_size(line):
  """Devices per replica group of a collective instruction line."""
  # mesh['axis_0'=4,'axis_1'=2][, device_ids=(...)] {'axis_0'}
  mesh = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", line)
  if mesh:
    sizes = dict(re.findall(r"'(\w+)'=(\d+)", mesh.group(1)))
    names = re.findall(r"'(\w+)'", mesh.group(2))
    return math.prod(int(sizes[n]) for n in names)
  iota = re.search(r'replica_groups=\[([\d,]+)\]<=', line)
  if iota:
    return int(iota.group(1).split(',')[-1])
  listed = re.search(r'replica_groups=\{\{([\d,]*)\}', line)
  if listed:
    return len([d for d in listed.group(1).split(',') if d])
  return 2 if 'source_target_pairs=' in line else 1


def _size(kind, result_type, starts):
  """Per-device data bytes of a collective (see the module docstring)."""
  arrays = _arrays(result_type, scalars=not starts)
  if starts and kind in ('all-gather', 'collective-permute'):
    # ((operands...), (results...), contexts): the results, second half
    half = len(arrays) // 2
    arrays = arrays[half:] if half else arrays
  return sum(arrays)


def _wire(kind, size, n):
  if n <= 1:
    return 0.0
  return {'all-gather': size * (n - 1) / n,
          'reduce-scatter': size * (n - 1),
          'all-reduce': 2 * size * (n - 1) / n,
          'all-to-all': size * (n - 1) / n,
          'collective-permute': float(size)}[kind]


def _parse(hlo_text):
  """({computation: ([(kind, size, n)], [(callee, times, line)])},
  {computation: its text}, entry name); times None: a while loop's."""
  comps, texts, entry, name = {}, {}, None, None
  for line in hlo_text.splitlines():
    head = _COMPUTATION.match(line)
    if head and not line.startswith(' '):
      name = head.group(1)
      comps[name], texts[name] = ([], []), ''
      if line.startswith('ENTRY'):
        entry = name
      continue
    if name:
      texts[name] += line + '\n'
    ins = _INSTRUCTION.match(line) if name else None
    if not ins:
      continue
    result_type, op = ins.group(1), ins.group(2)
    base = op[:-len('-start')] if op.endswith('-start') else op
    if base in KINDS:
      channel = re.search(r'channel_id=(\d+)', line)
      size, n = _size(base, result_type, op.endswith('-start')), group_size(line)
      if base == 'all-reduce' and name.startswith('all-reduce-scatter'):
        base, size = 'reduce-scatter', size // n  # TPU's fused form
      comps[name][0].append((base, size, n,
                             channel.group(1) if channel else None))
    times = 1
    if op == 'while':
      trip = _TRIP.search(line)
      times = int(trip.group(1)) if trip else None
    if op in ('async-done', 'async-update'):
      continue  # the same computation as its async-start
    for called, branches in _CALLED.findall(line):
      for callee in ([called] if called else
                     [b.strip().lstrip('%') for b in branches.split(',')]):
        comps[name][1].append((callee, times, line))
  return comps, texts, entry


def _trip_from_condition(texts, condition):
  """Trip count of a `while` whose condition compares the counter with a
  constant (index < N, counting from 0): N; None if it does not."""
  body = texts.get(condition, '')
  const = re.findall(r'constant\((\d+)\)', body)
  return int(const[0]) if len(const) == 1 and 'direction=LT' in body else None


def collectives(hlo_text):
  """{kind: {'count', 'bytes', 'wire_bytes'}} per step of a compiled module
  (`compiled.as_text()`), plus 'unknown_trip_counts' (loops counted once)."""
  comps, texts, entry = _parse(hlo_text)
  totals = collections.defaultdict(lambda: {'count': 0, 'bytes': 0,
                                            'wire_bytes': 0.0})
  unknown = 0

  def visit(comp, times, seen):
    nonlocal unknown
    ops, calls = comps.get(comp, ([], []))
    for kind, size, n, channel in ops:
      if channel is not None:  # TPU splits one collective over the fusions
        if channel in seen:    # of its start, its overlap and its done:
          continue             # they share the channel id
        seen.add(channel)
      totals[kind]['count'] += times
      totals[kind]['bytes'] += times * size
      totals[kind]['wire_bytes'] += times * _wire(kind, size, n)
    for callee, reps, line in calls:
      loop = ' while(' in line
      if loop and callee == re.search(r'condition=%?([\w.\-]+)',
                                      line).group(1):
        continue
      if reps is None:  # a while loop without a known trip count
        reps = _trip_from_condition(
            texts, re.search(r'condition=%?([\w.\-]+)', line).group(1))
        if reps is None:
          unknown += 1
          reps = 1
      # a loop body's collectives run (and count) once per iteration
      visit(callee, times * reps, set() if loop else seen)

  visit(entry, 1, set())
  out = {k: dict(totals[k]) for k in KINDS if k in totals}
  out['unknown_trip_counts'] = unknown
  return out


def memory(compiled):
  """Per-device bytes of a compiled program: arguments, outputs, aliased
  (outputs that reuse donated arguments), temporaries, generated code, and
  total = arguments + outputs - aliased + temporaries + code."""
  m = compiled.memory_analysis()
  out = {'arguments': m.argument_size_in_bytes,
         'outputs': m.output_size_in_bytes,
         'aliased': m.alias_size_in_bytes,
         'temporaries': m.temp_size_in_bytes,
         'code': m.generated_code_size_in_bytes}
  out['total'] = (out['arguments'] + out['outputs'] + out['code']
                  + out['temporaries'] - out['aliased'])
  return out
