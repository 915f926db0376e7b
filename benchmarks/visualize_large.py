"""Times `python -m mae_jax.visualize` on a random mae_vit_large_patch16.

Creates (or reuses) a random-weight large checkpoint (checkpoint.save of
model.init params, ~1.3 GB) in --workdir, runs the CLI on one embedded
224 px image as a subprocess --runs times (wall time: Python start, load,
compile, run, figure), then times the stages in-process once, and writes
the numbers with machine, command and date between the benchmark markers of
docs/visualize.md.

  .venv/bin/python benchmarks/visualize_large.py [--workdir /tmp/mae_large_viz]
"""
import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = ROOT / 'docs' / 'visualize.md'
START, END = '<!-- benchmark:start -->', '<!-- benchmark:end -->'
LIMIT_S = 60.0
sys.path.insert(0, str(ROOT))

from benchmarks.machine import cpu_name  # noqa: E402  pylint: disable=wrong-import-position


def make_checkpoint(path):
  """checkpoint.save of freshly initialised mae_vit_large_patch16 params."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import mae_jax  # pylint: disable=import-outside-toplevel
  model = mae_jax.mae_vit_large_patch16()
  imgs = jnp.zeros((1, model.img_size, model.img_size, 3))
  noise = jnp.zeros((1, model.num_patches))
  variables = jax.jit(lambda k: model.init(k, imgs, noise=noise))(
      jax.random.key(0))
  mae_jax.save(path, model, variables)


def stages(ckpt):
  """Seconds of import / load / first reconstruct (compile + run) / second
  reconstruct (run only) / figure, in a fresh process (run with --stages)."""
  t0 = time.perf_counter()
  from mae_jax import images, visualize  # pylint: disable=import-outside-toplevel
  t1 = time.perf_counter()
  model, variables = visualize.load_model(ckpt)
  t2 = time.perf_counter()
  _, imgs = images.load_images(images.resolve(None), model.img_size)
  pred, mask, _ = visualize.reconstruct(model, variables, imgs)
  t3 = time.perf_counter()
  visualize.reconstruct(model, variables, imgs, seed=1)
  t4 = time.perf_counter()
  visualize.figure_png(visualize.reconstruction_figure(
      imgs, pred, mask, model.patch_size, model.norm_pix_loss))
  t5 = time.perf_counter()
  return {'import': t1 - t0, 'load checkpoint': t2 - t1,
          'image + compile + first run': t3 - t2, 'second run': t4 - t3,
          'figure': t5 - t4}


def machine():
  return (f'{cpu_name()}, {os.cpu_count()} CPU cores visible, '
          f'{platform.system()} {platform.release()}, Python '
          f'{platform.python_version()}; load average before the runs '
          f'{os.getloadavg()[0]:.1f} (shared machine)')


def write_doc(text):
  doc = DOC.read_text(encoding='utf-8') if DOC.exists() else ''
  if START in doc and END in doc:
    doc = doc[:doc.index(START)] + text + doc[doc.index(END) + len(END):]
  else:
    doc = doc.rstrip('\n') + '\n\n' + text + '\n'
  DOC.write_text(doc, encoding='utf-8')


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', default='/tmp/mae_large_viz')
  parser.add_argument('--runs', type=int, default=3)
  parser.add_argument('--stages', metavar='CKPT',
                      help='only print the stage times of CKPT as JSON')
  args = parser.parse_args()
  if args.stages:
    print(json.dumps(stages(args.stages)))
    return
  work = pathlib.Path(args.workdir)
  work.mkdir(parents=True, exist_ok=True)
  ckpt = work / 'mae_vit_large_patch16'
  if not ckpt.exists():
    make_checkpoint(ckpt)
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  cmd = [sys.executable, '-m', 'mae_jax.visualize', '--checkpoint', str(ckpt),
         '--out', str(work / 'large.png')]
  info = machine()
  walls = []
  for _ in range(args.runs):
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True,
                          text=True, check=False)
    walls.append(time.perf_counter() - start)
    if proc.returncode:
      raise SystemExit(f'visualize failed:\n{proc.stdout}\n{proc.stderr}')
  proc = subprocess.run([sys.executable, __file__, '--stages', str(ckpt)],
                        cwd=ROOT, env=env, capture_output=True, text=True,
                        check=True)
  parts = json.loads(proc.stdout.splitlines()[-1])
  median = statistics.median(walls)
  verdict = 'under' if median < LIMIT_S else 'OVER'
  lines = [
      START,
      f'Measured {datetime.date.today().isoformat()} by '
      '`benchmarks/visualize_large.py` on: ' + info + '.',
      '',
      'Command (random-weight mae_vit_large_patch16, 1.2 GB checkpoint, one '
      '224 px image):',
      '',
      '```',
      ' '.join(['python'] + cmd[1:]),
      '```',
      '',
      f'Wall time per run (Python start, load, compile, run, figure): '
      f'{", ".join(f"{w:.1f}" for w in walls)} s; median **{median:.1f} s**, '
      f'{verdict} the {LIMIT_S:.0f} s target.',
      '',
      'Stages, timed inside one fresh process:',
      '',
      '| stage | seconds |',
      '|---|---|',
      *[f'| {k} | {v:.1f} |' for k, v in parts.items()],
      END,
  ]
  write_doc('\n'.join(lines))
  print('\n'.join(lines))


if __name__ == '__main__':
  main()
