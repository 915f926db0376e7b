"""Does MAE pretraining help pose estimation? The tiny chain, end to end.

  python benchmarks/pose_check.py --out DIR [--seeds N] [--doc]
      [--pose KEY=VALUE ...] [--pretrain KEY=VALUE ...]

For each seed s = 0 .. N-1 (default 2), each stage a `train.py` process
(this interpreter, cwd the repository root, the caller's environment), its
output in DIR/<stage>/log.txt:
  1. DIR/mae_s: MAE pretraining, configs/pretrain.py:tiny (the photographs
     bundled with scikit-image), config.seed=s, the --pretrain overrides;
  2. DIR/pose_mae_s: ViTPose, configs/pose.py:tiny (the generated keypoint
     set of mae_jax.pose.synthetic), config.init_from=DIR/mae_s;
  3. DIR/pose_random_s: the same pose run from random initialisation.
Both pose runs take config.seed=s and the same --pose overrides, so the
same budget. A stage is finished when its workdir holds the checkpoint of
its last step and a wall_s.json (its seconds); a rerun reuses finished
stages and resumes the others (train.py resumes a workdir).

Scores: the last evaluation of each pose run (metrics.jsonl, at its last
step): COCO OKS AP / AP50 in [0, 1] (pycocotools) and PCK@0.2 of the box
size, on the val split. Writes DIR/summary.json (per seed and median over
seeds; wall seconds per stage; the exact commands; machine, date, versions)
and, with --doc, docs/pose_training.md plus docs/pose_training.png (the last
figure of the first seed's pretrained pose run).
"""
import argparse
import datetime
import glob
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time

ENV = dict(os.environ)  # the caller's, before downstream_check's defaults
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.downstream_check import evals, parse_overrides  # noqa: E402
from benchmarks.machine import cpu_name  # noqa: E402
from configs import pose, pretrain  # noqa: E402
from mae_jax import paths  # noqa: E402

POSE_CONFIG = 'configs/pose.py:tiny'
PRETRAIN_CONFIG = 'configs/pretrain.py:tiny'
SET_HERE = ('seed', 'init_from')  # the check sets these per stage
DOC = os.path.join(ROOT, 'docs', 'pose_training.md')
FIGURE = os.path.join(ROOT, 'docs', 'pose_training.png')
SCORES = ('AP', 'AP50', 'PCK')
STAGES = ('mae', 'pose_mae', 'pose_random')


class StageError(RuntimeError):
  """A stage that failed or stopped short; one line naming its log."""


def load_config(module, items, spec):
  """The tiny config of `module` with the KEY=VALUE `items`."""
  config = module.get_config('tiny')
  for key, value in parse_overrides(items).items():
    if key in SET_HERE:
      raise ValueError(f'{key}={value}: set by this check per stage, not an '
                       'override')
    try:
      config.update_from_flattened_dict({key: value})
    except (KeyError, AttributeError) as e:
      raise ValueError(f'{key}={value}: not a field of {spec}') from e
    except (TypeError, ValueError) as e:
      raise ValueError(f'{key}={value}: {e}') from e
  if config.total_steps <= 0 or config.checkpoint_every_steps <= 0:
    raise ValueError(
        f'{spec}: total_steps={config.total_steps}, '
        f'checkpoint_every_steps={config.checkpoint_every_steps}: both must '
        'be > 0 (a finished stage is judged by its last checkpoint)')
  if module is pose and config.eval_every_steps <= 0:
    raise ValueError(f'{spec}: eval_every_steps={config.eval_every_steps}: '
                     'must be > 0 (the scores are the last evaluation)')
  return config


def final_checkpoint(workdir, total):
  return os.path.isdir(os.path.join(workdir, 'checkpoints', str(total),
                                    'model'))


def run_stage(command, workdir, total):
  """Runs `command` (a train.py argv) for `workdir` unless finished; returns
  its wall seconds (those of the run that finished it)."""
  record = os.path.join(workdir, 'wall_s.json')
  name = os.path.basename(workdir)
  if final_checkpoint(workdir, total) and os.path.exists(record):
    with open(record) as f:
      seconds = json.load(f)
    print(f'{name}: finished before ({seconds:.0f} s), reused', flush=True)
    return seconds
  os.makedirs(workdir, exist_ok=True)
  log = os.path.join(workdir, 'log.txt')
  print(f'{name}: {shlex.join(command)}', flush=True)
  start = time.time()
  with open(log, 'a') as f:
    f.write(f'$ {shlex.join(command)}\n')
    f.flush()
    code = subprocess.run(command, cwd=ROOT, env=ENV, stdout=f,
                          stderr=subprocess.STDOUT, check=False).returncode
  seconds = time.time() - start
  if code != 0:
    raise StageError(f'{name}: train.py exited {code}; see {log}')
  if not final_checkpoint(workdir, total):
    raise StageError(f'{name}: stopped before step {total} (no checkpoint '
                     f'of step {total}); see {log}')
  paths.write_atomic(record, json.dumps(seconds))
  print(f'{name}: done in {seconds:.0f} s', flush=True)
  return seconds


def train_command(spec, workdir, items, seed, init_from=None):
  command = [sys.executable, 'train.py', '--config', spec, '--workdir',
             workdir]
  command += [f'--config.{item}' for item in items]
  command.append(f'--config.seed={seed}')
  if init_from:
    command.append(f'--config.init_from={init_from}')
  return command


def last_eval(workdir, total):
  done = evals(workdir)
  if not done or done[-1][0] != total:
    raise StageError(f'{os.path.basename(workdir)}: no evaluation at step '
                     f'{total} in its metrics.jsonl')
  return done[-1][1]


def run_seed(seed, args, out, totals):
  """(scores, wall seconds per stage, commands) of one seed."""
  dirs = {k: os.path.join(out, f'{k}_{seed}') for k in STAGES}
  commands = {
      'mae': train_command(PRETRAIN_CONFIG, dirs['mae'], args.pretrain, seed),
      'pose_mae': train_command(POSE_CONFIG, dirs['pose_mae'], args.pose,
                                seed, init_from=dirs['mae']),
      'pose_random': train_command(POSE_CONFIG, dirs['pose_random'],
                                   args.pose, seed)}
  wall = {k: run_stage(commands[k], dirs[k], totals[k]) for k in STAGES}
  scores, people = {}, set()
  for init in ('pretrained', 'random'):
    stage = 'pose_mae' if init == 'pretrained' else 'pose_random'
    result = last_eval(dirs[stage], totals[stage])
    for key in SCORES:
      scores[f'{key.lower()}_{init}'] = result.get(key)
    people.add(result.get('count'))
  if len(people) != 1:
    raise StageError(f'seed {seed}: the two pose runs were evaluated on '
                     f'different sets ({sorted(people, key=str)} people)')
  print(f'seed {seed}: ' + ', '.join(f'{k} {v:.3f}' for k, v in
                                      scores.items() if v is not None),
        flush=True)
  return scores, wall, {k: shlex.join(v) for k, v in commands.items()}, \
      people.pop()


def median(values):
  values = [v for v in values if v is not None]
  return statistics.median(values) if values else None


def fmt(value):
  return '-' if value is None else f'{value:.3f}'


def write_doc(s, figure):
  def row(name, scores, wall):
    return (f'| {name} | ' + ' | '.join(
        f'{fmt(scores[f"{k}_pretrained"])} / {fmt(scores[f"{k}_random"])}'
        for k in ('ap', 'ap50', 'pck')) + ' | '
            + ' / '.join(f'{wall[k]:.0f}' for k in STAGES) + ' |')
  rows = [row(seed, sc, wall)
          for seed, sc, wall in zip(s['seeds'], s['per_seed'], s['wall_s'])]
  rows.append(row('median', s['median'], s['median']['wall_s']))
  commands = '\n'.join(
      f'    {c.replace(sys.executable, "python", 1)}'
      for per_seed in s['commands'] for c in per_seed.values())
  shown = (f'![predicted skeletons, seed {s["seeds"][0]}, pretrained]'
           f'({os.path.basename(FIGURE)})\n\nThe last figure of the first '
           'seed\'s pretrained pose run: predicted skeletons on a held-out '
           'image.' if figure else
           'No figure: the pose runs wrote none (figure_every_steps=0).')
  text = f"""# Pose training: MAE pretraining against random initialisation

- command: `{s['command']}` (writes this file)
- machine: {s['machine']}; date {s['date']}; {', '.join(
      f'{k} {v}' for k, v in s['versions'].items())}

Per seed s: MAE pretraining ({PRETRAIN_CONFIG}, the photographs bundled
with scikit-image), then ViTPose ({POSE_CONFIG}, the generated keypoint set
of `mae_jax.pose.synthetic`) from that encoder (`config.init_from`) and from
random initialisation, with the same budget and `config.seed=s`. Scores: the
last evaluation of each pose run, on the val split
({s['eval_people']:.0f} people) with ground-truth boxes and the flip test:
COCO OKS AP and AP50 (pycocotools, in [0, 1]) and PCK at 0.2 of the box
size.

| seed | AP (pretrained / random) | AP50 | PCK@0.2 | wall s (MAE / pose pretrained / pose random) |
|---|---|---|---|---|
{chr(10).join(rows)}

{shown}

Commands (cwd the repository root):

{commands}
"""
  paths.write_atomic(DOC, text)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--out', required=True,
                      help='run directory: one workdir per stage and seed, '
                           'summary.json')
  parser.add_argument('--seeds', type=int, default=2,
                      help='seeds 0 .. N-1, one chain each (default 2)')
  parser.add_argument('--pose', nargs='*', default=[], metavar='KEY=VALUE',
                      help=f'overrides of {POSE_CONFIG}, both pose runs')
  parser.add_argument('--pretrain', nargs='*', default=[],
                      metavar='KEY=VALUE',
                      help=f'overrides of {PRETRAIN_CONFIG}')
  parser.add_argument('--doc', action='store_true',
                      help='write docs/pose_training.md and .png')
  args = parser.parse_args()
  if args.seeds < 1:
    parser.error(f'--seeds must be >= 1, got {args.seeds}')
  try:
    totals = {'mae': load_config(pretrain, args.pretrain,
                                 PRETRAIN_CONFIG).total_steps}
    totals['pose_mae'] = totals['pose_random'] = load_config(
        pose, args.pose, POSE_CONFIG).total_steps
  except ValueError as e:
    parser.error(' '.join(str(e).split()))
  out = os.fspath(paths.resolve(args.out))
  os.makedirs(out, exist_ok=True)
  seeds = list(range(args.seeds))
  try:
    per_seed = [run_seed(seed, args, out, totals) for seed in seeds]
  except StageError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  scores = [p[0] for p in per_seed]
  walls = [p[1] for p in per_seed]
  summary = {
      'seeds': seeds,
      'per_seed': scores,
      'wall_s': walls,
      'median': dict({k: median(s[k] for s in scores) for k in scores[0]},
                     wall_s={k: median(w[k] for w in walls)
                             for k in STAGES}),
      'commands': [p[2] for p in per_seed],
      'eval_people': per_seed[0][3],
      'command': 'python benchmarks/pose_check.py ' + shlex.join(
          sys.argv[1:]),
      'machine': f'{cpu_name()}, {os.cpu_count()} cores, '
                 f'{platform.system()} {platform.release()}',
      'date': datetime.datetime.now(datetime.timezone.utc).strftime(
          '%Y-%m-%d %H:%M UTC'),
      'versions': {k: importlib.metadata.version(k)
                   for k in ('jax', 'flax')} | {
                       'python': platform.python_version()}}
  path = os.path.join(out, 'summary.json')
  paths.write_atomic(path, json.dumps(summary, indent=1))
  if args.doc:
    figures = sorted(glob.glob(os.path.join(out, f'pose_mae_{seeds[0]}',
                                            'figures', 'step_*.png')))
    if figures:
      shutil.copy(figures[-1], FIGURE)
    elif os.path.exists(FIGURE):  # another run's: not this table's
      os.remove(FIGURE)
    write_doc(summary, bool(figures))
    print(f'doc: {DOC}')
  m = summary['median']
  print('median over seeds: ' + ', '.join(
      f'{k} {fmt(v)}' for k, v in m.items() if k != 'wall_s'))
  print(f'summary: {path}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
