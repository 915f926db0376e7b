"""MAE pretraining, fine-tuning and linear probing from the command line.

  python train.py --config configs/pretrain.py:tiny --workdir runs/tiny \
      [--config.key=value ...]
  python train.py --config configs/finetune.py:base --workdir runs/ft \
      --config.init_from=mae_pretrain_vit_base.pth
  python train.py --config configs/linprobe.py:base --workdir runs/lp \
      --config.init_from=runs/base

A workdir that holds a checkpoint is resumed automatically. Multi-host:
pass --coordinator_address/--num_processes/--process_id, or --distributed
on platforms where jax.distributed.initialize() detects them (TPU, Slurm).
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.WARNING)  # orbax logs every file at INFO
  import jax
  from mae_jax import classify, trainer
  from mae_jax.config_check import ConfigError

  if FLAGS.num_processes > 1:
    jax.distributed.initialize(FLAGS.coordinator_address,
                               FLAGS.num_processes, FLAGS.process_id)
  elif FLAGS.distributed:
    jax.distributed.initialize()
  try:
    run = trainer.train if FLAGS.config.task == 'pretrain' else classify.train
    run(FLAGS.config, FLAGS.workdir)
  except (ConfigError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main)
