"""Throughput of the MAE pretraining step, optionally beside a PyTorch peer.

  python benchmarks/pretrain_throughput.py --model mae_vit_base_patch16 \
      --batch 16 --dtype float32 --steps 5 [--torch-peer] [--out r.jsonl]

Times the full jitted update of mae_jax.train.pretrain (forward, backward,
AdamW update, buffers donated) on synthetic batches after warm-up; prints
compile time, median step time, img/s, achieved TFLOP/s and MFU, and peak
device memory where the backend reports it (the process's peak, so with
several modes the largest). `--attention xla,chunked` times several
attention modes in one process (a failing mode is reported, the rest go
on); `--fuse-gather on,off` times the model with and without the
patch-embedding/masking-gather fusion (config.fuse_patch_gather),
`--split-qkv on,off` with q, k, v from three matmuls or slices of one
(config.split_qkv), `--fold-qkv-bias off,on` with k's bias dropped and v's
folded into the output projection (config.fold_qkv_bias);
`--xla-options 'base;lt=xla_gpu_enable_cublaslt=true'` compiles the step
once per named set of XLA compiler options (`name=option=value,...`; `base`
alone is XLA's defaults). All modes and the peers are compiled and set up
first, then step in turn, `--chain` steps each per round with one wait for
the device at the end of each (as the training loop waits only at its log
intervals), so the ratios are measured side by side. FLOPs:
the analytic count (forward per block 24*N*D^2 + 4*N^2*D for N tokens of
width D, training about 3x forward; used for MFU) and XLA's cost analysis
of the compiled step (printed beside it). `--torch-peer eager,compile`
times Hugging Face transformers' ViTMAEForPreTraining of the same size in
the same process (SDPA attention, fused AdamW with betas 0.9/0.95 on CUDA;
bf16 via torch.autocast), as written and under torch.compile, at the same
batch or at `--peer-batch`, and prints the ratios of images per second.
One JSON line per configuration goes to --out. Imports no TensorFlow.
"""
import argparse
import collections
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from configs import pretrain as pretrain_config  # noqa: E402
from mae_jax import MAE_CONFIGS  # noqa: E402
from mae_jax.train import pretrain, sharding  # noqa: E402
from benchmarks.torch_peer import peer_step  # noqa: E402
from mae_jax.schema import ATTENTION  # noqa: E402

# Dense peak TFLOP/s by device kind and dtype (vendor figures).
PEAK_TFLOPS = {('H100', 'bfloat16'): 989.0, ('H100', 'float32'): 494.7,
               ('H200', 'bfloat16'): 989.0, ('H200', 'float32'): 494.7,
               ('A100', 'bfloat16'): 312.0, ('A100', 'float32'): 156.0}


def analytic_flops(model_name, img_size=224, mask_ratio=0.75):
  """Training FLOPs per image: 3 x forward, 2 per multiply-add; per block
  24*N*D^2 + 4*N^2*D, plus patch embedding, decoder embed and prediction."""
  c = MAE_CONFIGS[model_name]
  p, d, dd = c['patch_size'], c['embed_dim'], c['decoder_embed_dim']
  length = (img_size // p) ** 2
  n_enc = 1 + int(length * (1 - mask_ratio))
  n_dec = 1 + length
  block = lambda n, w: 24 * n * w * w + 4 * n * n * w
  fwd = (c['depth'] * block(n_enc, d) + c['decoder_depth'] * block(n_dec, dd)
         + 2 * length * p * p * 3 * d + 2 * n_enc * d * dd
         + 2 * n_dec * dd * p * p * 3)
  return 3 * fwd


def peak_tflops(dtype):
  kind = jax.devices()[0].device_kind
  for (name, dt), value in PEAK_TFLOPS.items():
    if name in kind and dt == dtype:
      return value
  return None


def step_config(args, **fields):
  """The 'base' pretraining config at args.model / dtype / batch /
  image_size, 1000 steps on the embedded photos, with `fields` set."""
  config = pretrain_config.get_config('base')
  config.update_from_flattened_dict({
      'model': args.model, 'dtype': args.dtype, 'batch_size': args.batch,
      'total_steps': 1000, 'warmup_steps': 10, 'data.name': 'embedded',
      'data.image_size': args.image_size, **fields})
  return config


def build_step(args, attention='default', fuse=True, options=None,
               split=True, remat=False, fold=False):
  """(compiled train step, state, images, compile seconds) of mae_jax's
  pretraining step for args.model / batch / dtype / image_size,
  on all devices (data parallel), with a synthetic batch; `options`: XLA
  compiler options ({name: value}) for this compile."""
  config = step_config(args, attention=attention, remat=remat,
                       fuse_patch_gather=fuse, split_qkv=split,
                       fold_qkv_bias=fold)
  devices = jax.devices()
  mesh = sharding.make_mesh((len(devices), 1), devices)
  t = pretrain.PretrainTask(config, mesh)
  state = t.init_state()
  images = {'image': jax.device_put(
      jax.random.normal(jax.random.key(0),
                        (1, args.batch, args.image_size, args.image_size, 3)),
      sharding.batch_sharding(mesh, stacked=True))}
  start = time.perf_counter()
  compiled = t.update.lower(state, images, jnp.int32(0)).compile(
      compiler_options=options or None)
  return compiled, state, images, time.perf_counter() - start


def add_step_args(parser):
  """The flags that name the timed step: --model --batch --dtype
  --image-size --steps."""
  parser.add_argument('--model', default='mae_vit_base_patch16',
                      choices=sorted(MAE_CONFIGS))
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--dtype', default='float32',
                      choices=('float32', 'bfloat16'))
  parser.add_argument('--image-size', type=int, default=224)
  parser.add_argument('--steps', type=int, default=5)


def parse_options(text):
  """[(name, {XLA option: value})] from 'base;name=opt=value,opt=value'."""
  sets = []
  for part in filter(None, text.split(';')):
    name, _, rest = part.partition('=')
    options = {}
    for item in filter(None, rest.split(',')):
      key, sep, value = item.partition('=')
      if not sep:
        raise ValueError(f'--xla-options: {item!r} is not option=value')
      lowered = value.lower()
      options[key] = (lowered == 'true' if lowered in ('true', 'false')
                      else int(value) if value.lstrip('-').isdigit()
                      else value)
    sets.append((name, options))
  return sets


# One timed mae_jax configuration: config.attention, fuse_patch_gather,
# split_qkv, fold_qkv_bias, and the name of its set of XLA options.
Mode = collections.namedtuple('Mode', 'attention fuse split fold options')


class JaxStep:
  """One compiled mae_jax train step on its own state; each call runs
  `chain` steps and waits for the last."""

  def __init__(self, args, mode, options):
    self.compiled, self.state, self.images, self.compile_s = build_step(
        args, mode.attention, fuse=mode.fuse, options=options,
        split=mode.split, remat=args.remat, fold=mode.fold)
    self.chain = args.chain
    cost = self.compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    self.xla_flops = (float(cost.get('flops', float('nan'))) if cost
                      else float('nan'))
    self.step, self.loss = 0, None

  def __call__(self):
    for _ in range(self.chain):
      self.state, metrics = self.compiled(self.state, self.images,
                                          jnp.int32(self.step))
      self.step += 1
    self.loss = float(jax.block_until_ready(metrics['loss']))


def round_robin(steppers, warmup, steps, deadline=None):
  """({name: [seconds of each timed call]}, {name: error}).

  The steppers take one call each (`--chain` steps) in turn for warmup +
  steps rounds, so the drifts of a shared machine reach every mode alike;
  past `deadline` (time.monotonic()) no round starts once one was timed.
  A stepper that raises is dropped and its error kept."""
  times, errors = {name: [] for name in steppers}, {}
  for r in range(warmup + steps):
    if r > warmup and deadline and time.monotonic() > deadline:
      print(f'time limit: {r - warmup} of {steps} timed rounds', flush=True)
      break
    for name, step in list(steppers.items()):
      start = time.perf_counter()
      try:
        step()
      except Exception as e:  # pylint: disable=broad-except
        errors[name] = f'{type(e).__name__}: {e}'[:2000]
        del steppers[name]
        continue
      if r >= warmup:
        times[name].append(time.perf_counter() - start)
  return times, errors


def mode_name(mode):
  """'cudnn', 'xla unfused-gather', 'cudnn folded-bias lt' ... of a Mode."""
  return (mode.attention + ('' if mode.fuse else ' unfused-gather')
          + ('' if mode.split else ' fused-qkv')
          + (' folded-bias' if mode.fold else '')
          + ('' if mode.options == 'base' else f' {mode.options}'))


def report(args, mode, stepper, times, flops, options):
  """The result dict of one timed mae_jax mode (printed)."""
  step_times = [t / args.chain for t in times]
  result = {'model': args.model, 'batch': args.batch, 'dtype': args.dtype,
            'attention': mode.attention, 'remat': args.remat,
            'fuse_patch_gather': mode.fuse, 'split_qkv': mode.split,
            'fold_qkv_bias': mode.fold, 'mode': mode_name(mode),
            'xla_options': options, 'chain': args.chain,
            'device': jax.devices()[0].device_kind,
            'devices': jax.device_count(), 'host': platform.node(),
            'cpus': os.cpu_count(), 'jax': jax.__version__,
            'date': time.strftime('%Y-%m-%d'),
            'analytic_flops_per_image': flops,
            'xla_flags': os.environ.get('XLA_FLAGS', ''),
            'compile_s': stepper.compile_s,
            'step_s': statistics.median(step_times), 'step_s_all': step_times,
            'xla_flops_per_step': stepper.xla_flops, 'loss': stepper.loss}
  # The process's peak so far: with several modes, the largest of them.
  result['peak_bytes'] = (jax.devices()[0].memory_stats() or {}).get(
      'peak_bytes_in_use')
  result['img_per_s'] = args.batch / result['step_s']
  result['tflops_analytic'] = flops * result['img_per_s'] / 1e12
  result['tflops_xla'] = (result['xla_flops_per_step'] / result['step_s']
                          / 1e12)
  peak = peak_tflops(args.dtype)
  result['peak_tflops'] = peak
  result['mfu'] = result['tflops_analytic'] / peak if peak else None
  print(f'{args.model} batch {args.batch} {args.dtype} attention '
        f'{mode_name(mode)}{" remat" if args.remat else ""}'
        f' on {result["device"]}: compile '
        f'{result["compile_s"]:.1f} s, step {1000 * result["step_s"]:.1f} ms, '
        f'{result["img_per_s"]:.2f} img/s, {result["tflops_analytic"]:.3f} '
        f'TFLOP/s analytic ({result["tflops_xla"]:.3f} by XLA cost analysis)'
        + (f', MFU {100 * result["mfu"]:.1f}% (analytic)' if peak else '')
        + (f', peak memory {result["peak_bytes"] / 2**30:.2f} GiB'
           if result['peak_bytes'] else ''), flush=True)
  return result


def failed(args, mode, error):
  print(f'{args.model} batch {args.batch} attention {mode_name(mode)} '
        f'FAILED: {error.splitlines()[0][:300]}', flush=True)
  return {'model': args.model, 'batch': args.batch, 'dtype': args.dtype,
          'attention': mode.attention, 'fuse_patch_gather': mode.fuse,
          'split_qkv': mode.split, 'fold_qkv_bias': mode.fold,
          'mode': mode_name(mode), 'error': error}


PEERS = {'eager': 'autocast bf16', 'compile': 'torch.compile, autocast bf16'}


def peer_record(args, name, stepper, times, results):
  """The result dict of one timed PyTorch peer (printed), with the ratio of
  every timed mae_jax mode to it."""
  step_times = [t / args.chain for t in times]
  step_s = statistics.median(step_times)
  batch = args.peer_batch or args.batch
  peer = {'framework': 'torch', 'peer': name, 'model': args.model,
          'batch': batch, 'dtype': args.dtype, 'chain': args.chain,
          'step_s': step_s, 'step_s_all': step_times,
          'img_per_s': batch / step_s,
          'torch_version': stepper.version,
          'device': jax.devices()[0].device_kind,
          'date': time.strftime('%Y-%m-%d'), 'ratio_vs_torch': {}}
  label = PEERS[name] if args.dtype == 'bfloat16' else name + ' fp32'
  print(f'  PyTorch peer (transformers ViTMAEForPreTraining, {label}, '
        f'batch {batch}): {peer["img_per_s"]:.2f} img/s', flush=True)
  for mode, result in results.items():
    if 'img_per_s' in result:
      ratio = result['img_per_s'] / peer['img_per_s']
      peer['ratio_vs_torch'][mode_name(mode)] = ratio
      print(f'  mae_jax ({mode_name(mode)} attention) / torch {name} = '
            f'{ratio:.2f}', flush=True)
  return peer


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_step_args(parser)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--chain', type=int, default=1,
                      help='steps per timed call (one wait for the device '
                      'at its end)')
  parser.add_argument('--attention', default='default',
                      help="comma-separated modes from 'default', 'xla', "
                      "'cudnn', 'cudnn_long', 'chunked'; each is timed, a "
                      "failing one is reported")
  parser.add_argument('--remat', action='store_true')
  parser.add_argument('--fuse-gather', default='on',
                      help="'on', 'off' or 'on,off': embed only the visible "
                      "patches (config.fuse_patch_gather)")
  parser.add_argument('--split-qkv', default='on',
                      help="'on', 'off' or 'on,off': q, k, v from three "
                      "matmuls (config.split_qkv)")
  parser.add_argument('--fold-qkv-bias', default='off',
                      help="'off', 'on' or 'off,on': k's bias dropped, v's "
                      "folded into the output projection "
                      "(config.fold_qkv_bias)")
  parser.add_argument('--xla-options', default='base',
                      help="';'-separated named sets of XLA compiler options, "
                      "e.g. 'base;lt=xla_gpu_enable_cublaslt=true'")
  parser.add_argument('--torch-peer', nargs='?', const='eager', default='',
                      help="comma-separated PyTorch peers: 'eager', "
                      "'compile' (torch.compile)")
  parser.add_argument('--peer-batch', type=int,
                      help='batch of the PyTorch peers (default --batch)')
  parser.add_argument('--time-limit', type=float,
                      help='seconds: build no step and start no timed round '
                      'after this (one round is always timed)')
  parser.add_argument('--out', help='append one JSON line per mode here')
  args = parser.parse_args()
  deadline = args.time_limit and time.monotonic() + args.time_limit
  for mode in args.attention.split(','):
    if mode not in ATTENTION:
      parser.error(f'--attention: unknown mode {mode!r}')
  fuses, splits = args.fuse_gather.split(','), args.split_qkv.split(',')
  folds = args.fold_qkv_bias.split(',')
  for flag, values in (('--fuse-gather', fuses), ('--split-qkv', splits),
                       ('--fold-qkv-bias', folds)):
    for value in values:
      if value not in ('on', 'off'):
        parser.error(f'{flag}: expected on/off, got {value!r}')
  peers = list(filter(None, args.torch_peer.split(',')))
  for name in peers:
    if name not in PEERS:
      parser.error(f'--torch-peer: unknown peer {name!r}')
  try:
    option_sets = dict(parse_options(args.xla_options))
  except ValueError as e:
    parser.error(str(e))
  modes = [Mode(attention, fuse == 'on', split == 'on', fold == 'on', options)
           for attention in args.attention.split(',') for fuse in fuses
           for split in splits for fold in folds for options in option_sets]

  flops = analytic_flops(args.model, args.image_size)
  steppers, results = {}, {}
  for mode in modes:
    if deadline and time.monotonic() > deadline:
      results[mode] = failed(args, mode, 'not built: time limit')
      continue
    try:
      steppers[mode] = JaxStep(args, mode, option_sets[mode.options])
    except Exception as e:  # pylint: disable=broad-except
      results[mode] = failed(args, mode, f'{type(e).__name__}: {e}'[:2000])
  jax_steppers = dict(steppers)
  peer_errors = {}
  for name in peers:
    try:
      steppers[name] = peer_step(args.model, args.image_size,
                                 args.peer_batch or args.batch, args.dtype,
                                 args.chain, compiled=name == 'compile')
    except Exception as e:  # pylint: disable=broad-except
      peer_errors[name] = f'{type(e).__name__}: {e}'[:2000]
  torch_steppers = {name: steppers[name] for name in peers
                    if name in steppers}
  times, errors = round_robin(steppers, args.warmup, args.steps, deadline)
  errors.update(peer_errors)
  for mode in modes:
    if mode in errors:
      results[mode] = failed(args, mode, errors[mode])
    elif mode in jax_steppers:
      results[mode] = report(args, mode, jax_steppers[mode], times[mode],
                             flops, option_sets[mode.options])
    write_line(args.out, results[mode])
  for name in peers:
    if name in errors:
      print(f'  PyTorch peer {name} FAILED: '
            f'{errors[name].splitlines()[0][:300]}', flush=True)
      write_line(args.out, {'framework': 'torch', 'peer': name,
                            'model': args.model,
                            'batch': args.peer_batch or args.batch,
                            'error': errors[name]})
    else:
      write_line(args.out, peer_record(args, name, torch_steppers[name],
                                       times[name], results))


def write_line(path, record):
  """Appends one JSON line to `path` (if given) at once, so a run cut short
  keeps what it measured."""
  if path:
    with open(path, 'a') as f:
      f.write(json.dumps(record) + '\n')


if __name__ == '__main__':
  main()
