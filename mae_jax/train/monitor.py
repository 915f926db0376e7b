"""Progress lines, JSON-lines and TensorBoard metrics, figures.

Only the active process (process 0) writes; every process checks values and
takes part in the on-device metric sums (they are SPMD computations).

TensorBoard events are written with tensorboardX, not clu.metric_writers:
clu 0.0.12's metric_writers package imports its TensorFlow summary writer
on import, and the training loops must run without TensorFlow (only
mae_jax.data uses it).
"""
import contextlib
import io
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from mae_jax import extras, paths
from mae_jax.errors import NonFiniteError


def mesh_text(mesh):
  """'data=1 fsdp=1' for a jax.sharding.Mesh."""
  return ' '.join(f'{k}={v}' for k, v in mesh.shape.items())


def _json_value(value):
  """A JSON-safe value: non-finite floats become None (JSON null)."""
  if isinstance(value, dict):
    return {k: _json_value(v) for k, v in value.items()}
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


@jax.jit
def _add(total, metrics):
  return jax.tree.map(jnp.add, total, metrics)


def _restart_records(path, start_step):
  """Rewrites metrics.jsonl (atomically) without the records of steps after
  `start_step`, the step a run resumes from: they belong to updates that
  will be done again. Lines that do not parse (the last line of a killed
  run) are dropped, NaN/Infinity of older files become null."""
  if not path.exists():
    return
  lines = path.read_text().splitlines()
  kept = []
  for line in lines:
    try:
      record = json.loads(line)
    except ValueError:
      continue
    if isinstance(record, dict) and record.get('step', 0) <= start_step:
      kept.append(json.dumps(_json_value(record), allow_nan=False))
  if kept != lines:
    paths.write_atomic(path, ''.join(line + '\n' for line in kept))


def _summary_writer():
  """tensorboardX's SummaryWriter class, imported without PyTorch.

  tensorboardX imports torch whenever it is installed (about 2 s of every
  run's start-up), only to name torch.Tensor in type hints, and uses
  NumPy's types when that import fails; the monitor writes numbers and
  NumPy arrays.
  """
  with extras.imports_failing('torch'):
    from tensorboardX import SummaryWriter
  return SummaryWriter


class Monitor:
  """Writes `metrics.jsonl`, TensorBoard events and figures in the workdir.

  Per update the loop calls `add(metrics)` (an on-device running sum, no
  host transfer); `log` prints and records the means over the updates
  since the previous log. Throughput counts only the updates of this
  process after its first one (which includes compiling); `started(step)`
  marks the end of that first update, and time spent inside `paused()`
  (figures, evaluation) is not counted either.
  """

  def __init__(self, workdir, total_steps, config, active=True,
               start_step=0):
    self.workdir = paths.resolve(workdir)
    self.total, self.active = total_steps, active
    self.images_per_step = config.batch_size * config.accum_iter
    self.start_time, self.first, self.paused_s = time.time(), None, 0.0
    self.sum, self.count, self.latest = None, 0, None
    self.tb = self.jsonl = None
    if active:
      self.workdir.mkdir(parents=True, exist_ok=True)
      path = self.workdir / 'metrics.jsonl'
      _restart_records(path, start_step)
      self.tb = _summary_writer()(os.fspath(self.workdir / 'tb'))
      self.tb.add_text('config', _config_markdown(config), start_step)
      if paths.is_uri(path):  # object stores cannot append: write it anew
        kept = path.read_text() if path.exists() else ''
        self.jsonl = path.open('w')
        self.jsonl.write(kept)
      else:
        self.jsonl = path.open('a')

  def note(self, text):
    if self.active:
      print(text, flush=True)

  def check_finite(self, step, metrics, last_good=None, skip=False,
                   skipped=0):
    """Checks the loss and gradient norm of update `step` (0-based).

    Not finite: raises NonFiniteError naming the step and the last good
    checkpoint, or with `skip` (the step already left the state unchanged)
    notes it. Returns the number of skipped updates (0 or 1); `skipped` is
    the count so far.
    """
    values = {k: float(np.asarray(metrics[k])) for k in ('loss', 'grad_norm')}
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if not bad:
      return 0
    text = ", ".join(f"{k}={v}" for k, v in bad.items())
    if skip:
      self.note(f'skipped update {step}: non-finite {text}; {skipped + 1} '
                'updates skipped so far')
      return 1
    where = (f'the last good checkpoint is step {last_good}'
             if last_good is not None else 'no checkpoint was written yet')
    raise NonFiniteError(
        f'non-finite {text} at update {step}; {where}. Lower config.blr, '
        'check the data, train in float32, or set config.skip_nonfinite=True.')

  def add(self, metrics):
    """Adds one update's metrics (device arrays) to the running sums."""
    self.sum = metrics if self.sum is None else _add(self.sum, metrics)
    self.count += 1
    self.latest = metrics

  def started(self, step):
    """Marks the end of this process's first update (`step` updates done);
    waits for it, once, so that compiling is not counted as throughput."""
    jax.block_until_ready(self.latest)
    self.first, self.paused_s = (step, time.time()), 0.0

  @contextlib.contextmanager
  def paused(self):
    """Time spent inside is not training time (throughput, ETA)."""
    begin = time.time()
    try:
      yield
    finally:
      self.paused_s += time.time() - begin

  def _training_s(self, now):
    """Seconds of training since `started`, or None before it."""
    return None if self.first is None else now - self.first[1] - self.paused_s

  def _rate(self, step, now):
    """(images/s, updates/s) since `started`, or (None, None)."""
    seconds = self._training_s(now)
    if seconds is None or step <= self.first[0] or seconds <= 0:
      return None, None
    steps_per_s = (step - self.first[0]) / seconds
    return steps_per_s * self.images_per_step, steps_per_s

  def log(self, step, skipped=0):
    """Progress line (bar, loss, lr, img/s, ETA) and metric records of the
    updates added since the last call: loss and grad_norm are their means,
    lr the latest. `skipped`: non-finite updates skipped so far (recorded
    when > 0). Returns the record."""
    sums, latest = jax.device_get((self.sum, self.latest))
    means = {k: float(v) / self.count for k, v in sums.items()}
    means['lr'] = float(latest['lr'])
    means.pop('skipped', None)
    self.sum, self.count = None, 0
    now = time.time()
    img_per_s, steps_per_s = self._rate(step, now)
    record = {'step': step, **means, 'elapsed_s': now - self.start_time}
    if img_per_s is not None:
      record['img_per_s'] = img_per_s
    if skipped:
      record['skipped_total'] = skipped
    if not self.active:
      return record
    bar = tqdm.format_meter(step, self.total, self._training_s(now) or 0.0,
                            ncols=60, initial=self.first[0] if self.first
                            else step, rate=steps_per_s)
    print(f'{bar} loss {record["loss"]:.4f} lr {record["lr"]:.2e}'
          + (f' {img_per_s:.1f} img/s' if img_per_s is not None else '')
          + (f' skipped {skipped}' if skipped else ''), flush=True)
    self._write(record)
    for k, v in record.items():
      if k != 'step' and math.isfinite(v):
        self.tb.add_scalar(f'train/{k}', v, step)
    return record

  def log_eval(self, step, result, text):
    """Records an evaluation `result` (a dict of numbers) at `step` and
    prints `text`, the task's words for it."""
    if not self.active or result is None:
      return
    print(f'eval at step {step}: {text}', flush=True)
    self._write({'step': step, 'eval': result})
    for k, v in result.items():
      self.tb.add_scalar(f'eval/{k}', v, step)

  def _write(self, record):
    self.jsonl.write(json.dumps(_json_value(record), allow_nan=False) + '\n')
    self.jsonl.flush()

  def figure(self, step, imgs, pred, mask, patch_size, norm_pix_loss,
             mean=None, std=None):
    """Writes the reconstruction figure as WORKDIR/figures/step_N.png and
    as a TensorBoard image; returns the path. mean / std: the per-channel
    statistics the images were normalised with."""
    if not self.active:
      return None
    from mae_jax.figures import save_reconstruction_figure
    png = io.BytesIO()
    save_reconstruction_figure(png, imgs, pred, mask, patch_size,
                               norm_pix_loss, title=f'step {step}',
                               mean=mean, std=std)
    return self.write_figure(step, png.getvalue(), 'reconstruction')

  def write_figure(self, step, png, tag):
    """Writes the PNG bytes `png` as WORKDIR/figures/step_N.png and as the
    TensorBoard image `tag`; returns the path."""
    if not self.active:
      return None
    from PIL import Image
    path = self.workdir / 'figures' / f'step_{step:07d}.png'
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png)
    image = np.asarray(Image.open(io.BytesIO(png)).convert('RGB'))
    self.tb.add_image(tag, image, step, dataformats='HWC')
    print(f'figure: {paths.shown(path)}', flush=True)
    return path

  def close(self):
    """Flushes and closes the files. A write that fails here (a full disk)
    is reported in one warning line, not raised: it must not hide the
    error that ends the run, nor come back at interpreter exit."""
    if not self.active:
      return
    errors = []
    writers = list((self.tb.all_writers or {}).values())
    try:
      self.tb.close()
    except OSError as e:
      errors.append(e)
      for writer in writers:  # tensorboardX retries close() at exit
        writer.event_writer = _ClosedEventWriter()
    try:
      self.jsonl.close()
    except OSError as e:
      errors.append(e)
    if errors:
      print(f'warning: metrics of {paths.shown(self.workdir)} may be '
            'incomplete: '
            f'{errors[0]}', file=sys.stderr, flush=True)


def _config_markdown(config):
  """The config as an indented (preformatted) Markdown block."""
  text = config.to_json(indent=2) if hasattr(config, 'to_json') else str(
      config)
  return '\n'.join('    ' + line for line in text.splitlines())


class _ClosedEventWriter:
  """Stands in for a tensorboardX event writer whose final flush failed."""

  def close(self):
    pass

  def flush(self):
    pass
