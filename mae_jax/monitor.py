"""Progress lines, JSON-lines and TensorBoard metrics, figures.

Only the active process (process 0) writes; every process checks values.
"""
import json
import math
import os
import sys
import time

import numpy as np
from tqdm import tqdm


class NonFiniteError(FloatingPointError):
  """Loss or gradient norm turned NaN or Inf."""


class Monitor:
  """Writes `metrics.jsonl`, TensorBoard events and figures in the workdir."""

  def __init__(self, workdir, total_steps, config, active=True):
    self.workdir, self.total, self.active = workdir, total_steps, active
    self.images_per_step = config.batch_size * config.accum_iter
    self.start_time, self.last = time.time(), None
    self.tb = self.jsonl = None
    if active:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(os.path.join(workdir, 'tb'))
      self.jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')

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

  def log(self, step, metrics, skipped=0):
    """Progress line (bar, loss, lr, img/s, ETA) and metric records;
    `skipped`: non-finite updates skipped so far (recorded when > 0)."""
    now = time.time()
    if self.last is None:
      rate = float('nan')
    else:
      rate = (step - self.last[0]) * self.images_per_step / (now - self.last[1])
    self.last = (step, now)
    record = {'step': step, **{k: float(v) for k, v in metrics.items()},
              'img_per_s': rate, 'elapsed_s': now - self.start_time}
    record.pop('skipped', None)
    if skipped:
      record['skipped_total'] = skipped
    if not self.active:
      return record
    bar = tqdm.format_meter(step, self.total, now - self.start_time, ncols=60)
    print(f'{bar} loss {record["loss"]:.4f} lr {record["lr"]:.2e} '
          f'{rate:.1f} img/s' + (f' skipped {skipped}' if skipped else ''),
          flush=True)
    self.jsonl.write(json.dumps(record) + '\n')
    self.jsonl.flush()
    for k, v in record.items():
      if k != 'step' and math.isfinite(v):
        self.tb.add_scalar(f'train/{k}', v, step)
    return record

  def log_eval(self, step, result):
    """Evaluation line and records (top-1 / top-5 in %)."""
    if not self.active:
      return
    print(f'eval at step {step}: top-1 {result["top1"]:.2f}% top-5 '
          f'{result["top5"]:.2f}% on {result["count"]} images', flush=True)
    self.jsonl.write(json.dumps({'step': step, 'eval': result}) + '\n')
    self.jsonl.flush()
    for k in ('top1', 'top5'):
      self.tb.add_scalar(f'eval/{k}', result[k], step)

  def figure(self, step, imgs, pred, mask, patch_size, norm_pix_loss):
    if not self.active:
      return None
    from mae_jax.visualize import save_reconstruction_figure
    path = os.path.join(self.workdir, 'figures', f'step_{step:07d}.png')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_reconstruction_figure(path, imgs, pred, mask, patch_size,
                               norm_pix_loss, title=f'step {step}')
    print(f'figure: {path}', flush=True)
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
      print(f'warning: metrics of {self.workdir} may be incomplete: '
            f'{errors[0]}', file=sys.stderr, flush=True)


class _ClosedEventWriter:
  """Stands in for a tensorboardX event writer whose final flush failed."""

  def close(self):
    pass

  def flush(self):
    pass
