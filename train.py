"""MAE pretraining, fine-tuning and linear probing from the command line.

  python train.py --config configs/pretrain.py:tiny --workdir runs/tiny \
      [--config.key=value ...]
  python train.py --config configs/finetune.py:base --workdir runs/ft \
      --config.init_from=mae_pretrain_vit_base.pth
  python train.py --config configs/linprobe.py:base --workdir runs/lp \
      --config.init_from=runs/base

A workdir that holds a checkpoint is resumed automatically; SIGTERM saves
the current step and exits 0. Multi-host: pass --coordinator_address/
--num_processes/--process_id, or --distributed on platforms where
jax.distributed.initialize() detects them (TPU, Slurm).

User mistakes (flags, config values, a workdir in use, a checkpoint of
another config) print one line `error: ...` and exit 2; a run stopped by a
non-finite loss or a failed checkpoint save prints one line and exits 1.
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file('config', None, 'Config file:variant.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints and logs.')
flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize().')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0.')
flags.DEFINE_integer('num_processes', 1, 'Number of processes.')
flags.DEFINE_integer('process_id', 0, 'Index of this process.')
flags.mark_flags_as_required(['config', 'workdir'])
FLAGS = flags.FLAGS


def _fail(message, code=2):
  print(f'error: {" ".join(message.split())}', file=sys.stderr)
  sys.exit(code)


def _unknown_override(argv, error):
  """The --config.KEY of argv whose last part ml_collections named in
  `error` (the unknown field), or None."""
  name = str(error).strip('"\'')
  for arg in argv:
    key = arg[len('--config.'):].split('=', 1)[0]
    if arg.startswith('--config.') and key.split('.')[-1] == name:
      return key
  return None


def parse_flags(argv):
  """absl flag parsing whose errors are one line naming the flag."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    _fail(lines[0] if len(lines) == 1 else f'{lines[0]} {lines[-1]}')
  except (AttributeError, KeyError) as e:  # ml_collections: unknown field
    key = _unknown_override(argv, e)
    _fail(f'--config.{key}: unknown config field {key!r}' if key
          else f'{type(e).__name__}: {e}')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.WARNING)  # orbax logs every file at INFO
  import jax
  from mae_jax import classify, trainer
  from mae_jax.monitor import NonFiniteError
  from mae_jax.workdir import WorkdirLocked

  if FLAGS.num_processes > 1:
    jax.distributed.initialize(FLAGS.coordinator_address,
                               FLAGS.num_processes, FLAGS.process_id)
  elif FLAGS.distributed:
    jax.distributed.initialize()
  try:
    run = trainer.train if FLAGS.config.task == 'pretrain' else classify.train
    run(FLAGS.config, FLAGS.workdir)
  except (ValueError, WorkdirLocked, FileNotFoundError) as e:
    _fail(str(e))  # ConfigError, CheckpointError are ValueErrors
  except (NonFiniteError, trainer.CheckpointSaveError) as e:
    _fail(str(e), code=1)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
