r"""Gradient accumulation: one jitted update with a lax.scan over the
micro-batches (mae_jax.train.task) against optax.MultiSteps with one
dispatch per micro-batch (the scheme it replaced), side by side.

  python benchmarks/accumulation.py [--model mae_vit_tiny_patch8]
      [--batch 32] [--accum 4] [--image-size 64] [--repeats 5]

Both run the same pretraining loss, AdamW and batch on one device; each
timed unit is one whole update (accum micro-batches), the two schemes
alternating, median of --repeats after a warm-up. Also prints the compiled
temporary memory of each (XLA's memory analysis): the scan's update and the
MultiSteps micro-step. Writes a Markdown table to --out.
"""
import argparse
import datetime
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from configs import pretrain as pretrain_config  # noqa: E402
from mae_jax import paths  # noqa: E402
from mae_jax.train import optim, pretrain, sharding  # noqa: E402


def make_task(args):
  config = pretrain_config.get_config('tiny')
  config.update_from_flattened_dict({
      'model': args.model, 'batch_size': args.batch,
      'accum_iter': args.accum, 'data.image_size': args.image_size,
      'total_steps': 1000, 'warmup_steps': 10})
  return pretrain.PretrainTask(config, sharding.make_mesh(
      (1, 1), jax.devices()[:1]))


class ScanUpdate:
  """The project's update: accum micro-batches in one jitted call."""

  def __init__(self, task, images):
    self.task, self.step = task, 0
    self.state = task.init_state()
    self.batch = sharding.global_batch(task.mesh, {'image': images},
                                       stacked=True)
    self.compiled = task.update.lower(self.state, self.batch,
                                      jnp.int32(0)).compile()

  def temp_bytes(self):
    return self.compiled.memory_analysis().temp_size_in_bytes

  def __call__(self):
    self.state, metrics = self.compiled(self.state, self.batch,
                                        jnp.int32(self.step))
    self.step += 1
    return jax.block_until_ready(metrics['loss'])


class MultiStepsUpdate:
  """optax.MultiSteps: one jitted micro-step per micro-batch."""

  def __init__(self, task, images):
    config = task.config
    params = task.init_state()['params']
    self.tx = optax.MultiSteps(
        optim.pretrain_optimizer(task.schedule, config.weight_decay, params,
                                 config.b1, config.b2),
        every_k_schedule=config.accum_iter)
    self.state = {'params': params, 'opt_state': self.tx.init(params)}
    self.task, self.step = task, 0
    self.images = [jnp.asarray(x) for x in images]

    def micro_step(state, images, step, micro):
      def loss_fn(params):
        return task.loss(params, {}, {'image': images}, step, micro)[0]
      loss, grads = jax.value_and_grad(loss_fn)(state['params'])
      updates, opt_state = self.tx.update(grads, state['opt_state'],
                                          state['params'])
      return {'params': optax.apply_updates(state['params'], updates),
              'opt_state': opt_state}, loss

    self.micro_step = jax.jit(micro_step, donate_argnums=(0,))
    self.compiled = self.micro_step.lower(
        self.state, self.images[0], jnp.int32(0), jnp.int32(0)).compile()

  def temp_bytes(self):
    return self.compiled.memory_analysis().temp_size_in_bytes

  def __call__(self):
    for micro, images in enumerate(self.images):
      self.state, loss = self.compiled(self.state, images,
                                       jnp.int32(self.step), jnp.int32(micro))
    self.step += 1
    return jax.block_until_ready(loss)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model', default='mae_vit_tiny_patch8')
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--accum', type=int, default=4)
  parser.add_argument('--image-size', type=int, default=64)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--out', default=os.path.join(
      ROOT, 'benchmarks', 'results', 'accumulation.md'))
  args = parser.parse_args()
  task = make_task(args)
  images = np.asarray(jax.random.normal(
      jax.random.key(0),
      (args.accum, args.batch, args.image_size, args.image_size, 3)))
  runs = {'lax.scan (one update)': ScanUpdate(task, images),
          'optax.MultiSteps (per micro-batch)': MultiStepsUpdate(task, images)}
  times = {name: [] for name in runs}
  for name, run in runs.items():  # warm-up
    run()
  for _ in range(args.repeats):
    for name, run in runs.items():
      start = time.perf_counter()
      run()
      times[name].append(time.perf_counter() - start)
  lines = [
      '# Gradient accumulation: lax.scan vs optax.MultiSteps',
      '',
      f'{args.model}, {args.accum} micro-batches of {args.batch} images of '
      f'{args.image_size}x{args.image_size}, float32, one '
      f'{jax.devices()[0].device_kind} device; {platform.machine()}, '
      f'{os.cpu_count()} cores; {datetime.date.today()}; median of '
      f'{args.repeats} updates after a warm-up, the two alternating.',
      '',
      f'    python benchmarks/accumulation.py --model {args.model} --batch '
      f'{args.batch} --accum {args.accum} --image-size {args.image_size} '
      f'--repeats {args.repeats}',
      '',
      '| scheme | s / update | compiled temp memory (MiB) |',
      '|---|---|---|']
  for name, run in runs.items():
    lines.append(f'| {name} | {statistics.median(times[name]):.3f} | '
                 f'{run.temp_bytes() / 2**20:.1f} |')
  print('\n'.join(lines))
  paths.write_atomic(args.out, '\n'.join(lines) + '\n')


if __name__ == '__main__':
  main()
