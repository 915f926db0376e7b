"""Tiny MAE pretraining, then linear probe / fine-tuning on the embedded task.

  python benchmarks/downstream_check.py [--pretrain_steps 600]
      [--workdir DIR] [--out docs/DOWNSTREAM.md] [--margin 10]
      [--pretrain KEY=VALUE ...] [--classifier KEY=VALUE ...]

The chain, all on CPU with the `tiny` configs: MAE pretraining
(configs/pretrain.py:tiny, --pretrain_steps updates) on the training part of
the 20 embedded photographs; a linear probe (configs/linprobe.py:tiny) of
that encoder and the same probe of a randomly initialised one; fine-tuning
(configs/finetune.py:tiny) from the pretrained and from the random encoder.
Every classifier is scored on the held-out validation tiles
(sources.embedded, split 'validation'), which no stage trains on:
pretraining reads split 'train' too.

Diagnostics: the frozen features of both encoders (and 12 colour/gradient
statistics of the pixels) scored without training, by nearest class mean and
by the nearest training crop.

Writes the accuracies, wall times, machine and command to --out. Exits 1
unless probe(pretrained) - probe(random) >= --margin points and
fine-tune(pretrained) > probe(pretrained).
"""
import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import tempfile
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import logging  # noqa: E402

from configs import finetune, linprobe, pretrain  # noqa: E402
from mae_jax.train import classify, pretrain as pretrain_task  # noqa: E402
from mae_jax.data import pipeline, sources  # noqa: E402

CROP_EPOCHS = 2  # diagnostics: training crops = CROP_EPOCHS x the train epoch


def parse_value(text):
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    return text


def run_pretraining(steps, overrides, workdir):
  config = pretrain.get_config('tiny')
  config.update_from_flattened_dict(dict(
      total_steps=steps, checkpoint_every_steps=steps, figure_every_steps=0,
      **overrides))
  assert config.data.split == 'train'  # no validation pixel is seen
  pretrain_task.train(config, workdir)
  return config


def run_classifier(module, init_from, overrides, workdir):
  config = module.get_config('tiny')
  config.update_from_flattened_dict(overrides)
  config.init_from = init_from
  result = classify.train(config, workdir)
  return config, result


def features(config, init_from, images):
  """Frozen features (N, D) of `images` from the probe's encoder: the
  pretrained one (init_from) or the random init the probe starts from."""
  model = classify.build_model(config, len(sources.EMBEDDED_FILES))
  key = jax.random.key(config.seed)
  size = config.data.image_size
  variables = jax.jit(model.init)(key, jnp.zeros((1, size, size, 3)))
  if init_from:
    variables = {**variables, 'params': classify.load_pretrained(
        init_from, model, key)[0]}
  apply = jax.jit(lambda x: model.apply(variables, x, return_features=True))
  return np.concatenate([np.asarray(apply(images[i:i + 64]))
                         for i in range(0, len(images), 64)])


def crops(config):
  """(train crops, labels, validation tiles, labels) as the probe sees them:
  CROP_EPOCHS epochs of its training transform, one pass of eval tiles."""
  data = config.data
  steps = pipeline.steps_per_epoch(data, config.batch_size)
  it = pipeline.make_iterator(data, config.batch_size, seed=config.seed)
  train = [next(it) for _ in range(CROP_EPOCHS * steps)]
  eval_cfg = dict(data.to_dict(), split=data.eval_split, repeats=1)
  held_out = [b for b in pipeline.make_iterator(
      eval_cfg, config.batch_size, seed=config.seed, train=False)]
  join = lambda bs, k: np.concatenate([b[k] for b in bs])  # noqa: E731
  valid = join(held_out, 'valid')
  return (join(train, 'image'), join(train, 'label'),
          join(held_out, 'image')[valid], join(held_out, 'label')[valid])


def pixel_statistics(images):
  """12 numbers per image: channel means, stds and mean |gradient| along
  each axis."""
  return np.concatenate([
      images.mean((1, 2)), images.std((1, 2)),
      np.abs(np.diff(images, axis=1)).mean((1, 2)),
      np.abs(np.diff(images, axis=2)).mean((1, 2))], axis=1)


def nearest_scores(train, train_labels, test, test_labels):
  """Top-1 (%) of nearest class mean and of the nearest training example,
  cosine similarity of features standardised with the training statistics."""
  mean, std = train.mean(0), train.std(0) + 1e-6
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
  a, b = unit((train - mean) / std), unit((test - mean) / std)
  classes = np.unique(train_labels)
  centroids = unit(np.stack([a[train_labels == k].mean(0) for k in classes]))
  ncm = classes[np.argmax(b @ centroids.T, axis=1)]
  nn = train_labels[np.argmax(b @ a.T, axis=1)]
  return (100 * float(np.mean(ncm == test_labels)),
          100 * float(np.mean(nn == test_labels)))


def cpu_name():
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or 'unknown CPU'


def timed(fn, *args):
  start = time.time()
  out = fn(*args)
  return out, time.time() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--pretrain_steps', type=int, default=600)
  parser.add_argument('--pretrain', nargs='*', default=[],
                      metavar='KEY=VALUE',
                      help='overrides of configs/pretrain.py:tiny')
  parser.add_argument('--classifier', nargs='*', default=[],
                      metavar='KEY=VALUE',
                      help='overrides of the linprobe and finetune tiny '
                           'configs (e.g. total_steps=4 for a smoke run)')
  parser.add_argument('--workdir', default=None,
                      help='default: a fresh temporary directory')
  parser.add_argument('--margin', type=float, default=10.0,
                      help='required probe(pretrained) - probe(random), '
                           'points of top-1')
  parser.add_argument('--out',
                      default=os.path.join(ROOT, 'docs', 'DOWNSTREAM.md'))
  args = parser.parse_args()
  logging.set_verbosity(logging.WARNING)
  overrides, cls_overrides = (
      {k: parse_value(v) for k, v in (kv.split('=', 1) for kv in kvs)}
      for kvs in (args.pretrain, args.classifier))
  root = args.workdir or tempfile.mkdtemp(prefix='mae_downstream_')
  load_start = os.getloadavg()
  start = time.time()

  pre_dir = os.path.join(root, 'pretrain')
  pre_config, pre_s = timed(run_pretraining, args.pretrain_steps, overrides,
                            pre_dir)
  runs = {}
  for name, module, init in (
      ('probe, pretrained encoder', linprobe, pre_dir),
      ('probe, random encoder', linprobe, None),
      ('fine-tune, pretrained encoder', finetune, pre_dir),
      ('fine-tune, random encoder', finetune, None)):
    (config, result), seconds = timed(
        run_classifier, module, init, cls_overrides,
        os.path.join(root, name.replace(', ', '_').replace(' ', '_')))
    runs[name] = dict(config=config, result=result, seconds=seconds)
    print(f'{name}: top-1 {result["top1"]:.1f}% top-5 {result["top5"]:.1f}% '
          f'({result["count"]} tiles), {seconds:.0f} s', flush=True)

  probe_config = runs['probe, pretrained encoder']['config']
  (xt, yt, xe, ye), diag_s = timed(crops, probe_config)
  diagnostics = {
      'pretrained encoder': nearest_scores(features(probe_config, pre_dir, xt),
                                           yt, features(probe_config, pre_dir,
                                                        xe), ye),
      'random encoder': nearest_scores(features(probe_config, None, xt), yt,
                                       features(probe_config, None, xe), ye),
      '12 pixel statistics': nearest_scores(pixel_statistics(xt), yt,
                                            pixel_statistics(xe), ye),
  }
  for name, (ncm, nn) in diagnostics.items():
    print(f'{name}: nearest class mean {ncm:.1f}%, nearest crop {nn:.1f}%')
  total = time.time() - start
  load_end = os.getloadavg()

  top1 = {k: v['result']['top1'] for k, v in runs.items()}
  margin = top1['probe, pretrained encoder'] - top1['probe, random encoder']
  ft_gain = (top1['fine-tune, pretrained encoder']
             - top1['probe, pretrained encoder'])
  checks = [
      (f'probe(pretrained) - probe(random) = {margin:+.1f} points '
       f'>= {args.margin:g}', margin >= args.margin),
      (f'fine-tune(pretrained) - probe(pretrained) = {ft_gain:+.1f} points '
       '> 0', ft_gain > 0)]
  passed = all(ok for _, ok in checks)
  for text, ok in checks:
    print(f'{"PASS" if ok else "FAIL"}: {text}')

  command = 'python benchmarks/downstream_check.py ' + ' '.join(
      shlex.quote(a) for a in sys.argv[1:])
  count = runs['probe, random encoder']['result']['count']
  probe_c = runs['probe, pretrained encoder']['config']
  ft_c = runs['fine-tune, pretrained encoder']['config']
  table = '\n'.join(
      f'| {name} | {r["result"]["top1"]:.1f} | {r["result"]["top5"]:.1f} | '
      f'{r["seconds"]:.0f} |' for name, r in runs.items())
  diag = '\n'.join(f'| {name} | {ncm:.1f} | {nn:.1f} |'
                   for name, (ncm, nn) in diagnostics.items())
  check_lines = '\n'.join(f'- {"PASS" if ok else "FAIL"}: {text}'
                          for text, ok in checks)
  pre_over = ', '.join(f'{k}={v}' for k, v in overrides.items()) or 'none'
  p = top1['probe, random encoder'] / 100
  noise = 100 * (p * (1 - p) / count) ** 0.5
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w') as f:
    f.write(f"""# Downstream check: tiny pretraining, linear probe, fine-tuning

- command: `{command}` (writes this file)
- machine: {platform.machine()}, {os.cpu_count()} cores ({cpu_name()}),
  JAX on CPU; the cores were shared with other jobs (load average
  {load_start[0]:.1f} at the start, {load_end[0]:.1f} at the end)
- date: {datetime.date.today()}; total wall time {total / 60:.1f} min

## Task

The embedded labelled task: the 20 photographs shipped with scikit-image,
label = which photo. Each photo is cut across its longer side at 2/3; the
first part is split `train`, the last third is split `validation`, tiled
across the shorter side into {sources.EMBEDDED_EVAL_TILES} crops: {count}
validation tiles, one tile = {100 / count:.2f} points of top-1. The two
splits share no pixel; every stage below trains on `train` only,
pretraining included. Scores are top-1 / top-5 on the validation tiles
(eval transform: shorter side resized to 73 px, centre crop 64).

## Chain

1. Pretraining, `configs/pretrain.py:tiny`: mae_vit_tiny_patch8, 64 px,
   batch {pre_config.batch_size}, blr {pre_config.blr:g},
   norm_pix_loss={pre_config.norm_pix_loss}, {args.pretrain_steps} updates
   (overrides: {pre_over}); {pre_s:.0f} s.
2. Linear probe, `configs/linprobe.py:tiny`: {probe_c.total_steps} updates,
   batch {probe_c.batch_size}, LARS blr {probe_c.blr:g}, cls token,
   BatchNorm + linear head; of the pretrained encoder and of a randomly
   initialised one (`init_from` unset: the model's own init, seed
   {probe_c.seed}).
3. Fine-tuning, `configs/finetune.py:tiny`: {ft_c.total_steps} updates,
   batch {ft_c.batch_size}, blr {ft_c.blr:g}, layer decay
   {ft_c.layer_decay:g}, mixup {ft_c.mixup:g}, cutmix {ft_c.cutmix:g},
   smoothing {ft_c.smoothing:g}; from both encoders.

| run | top-1 (%) | top-5 (%) | wall time (s) |
|---|---|---|---|
{table}

## Check

Required: probe(pretrained) - probe(random) >= {args.margin:g} points, and
fine-tuning above the probe. The noise of one score is several points: the
binomial standard deviation of the random probe's top-1 on {count} tiles is
{noise:.1f} points, that of a difference of two scores about
{noise * 2 ** 0.5:.1f}.

{check_lines}

Result: **{"passed" if passed else "failed"}**.

## Diagnostics: the frozen features without a trained classifier

Features of {len(yt)} training crops ({CROP_EPOCHS} epochs of the probe's
training transform) and of the {len(ye)} validation tiles, standardised with
the training statistics; top-1 (%) by cosine similarity to the nearest class
mean and to the nearest training crop ({diag_s:.0f} s for the crops).

| features | nearest class mean | nearest crop |
|---|---|---|
{diag}
""")
  print(f'wrote {args.out}; {"passed" if passed else "FAILED"}')
  sys.exit(0 if passed else 1)


if __name__ == '__main__':
  main()
