"""Installs: what the core install holds, what needs an extra, the Makefile.

test_pip_install_core_... installs from the package index into a fresh venv
(40-80 s on the shared 2-core machine); `-m "not network"` leaves it out.
"""
import ast
import importlib.metadata
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
import types

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from mae_jax import extras

ROOT = pathlib.Path(__file__).resolve().parent.parent
HEAVY = ('tensorflow', 'torch', 'matplotlib')


def _setup_kwargs():
  """The keyword arguments setup.py passes to setuptools.setup (read with a
  stand-in setuptools: the test venv need not have it)."""
  captured = {}
  stand_in = types.ModuleType('setuptools')
  stand_in.setup = captured.update
  stand_in.find_packages = lambda **kwargs: []
  real = sys.modules.get('setuptools')
  sys.modules['setuptools'] = stand_in
  try:
    exec(compile((ROOT / 'setup.py').read_text(), 'setup.py', 'exec'),
         {'__name__': '__main__'})
  finally:
    if real is None:
      del sys.modules['setuptools']
    else:
      sys.modules['setuptools'] = real
  return captured


def _run(code, cwd=ROOT, python=sys.executable, timeout=300):
  env = {k: v for k, v in os.environ.items()
         if k not in ('PYTHONPATH', 'XLA_FLAGS')}
  env['JAX_PLATFORMS'] = 'cpu'
  proc = subprocess.run([python, '-c', code], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.splitlines()[-1])


def test_core_modules_import_without_tensorflow_torch_or_matplotlib():
  modules = ['mae_jax', 'mae_jax.checkpoint', 'mae_jax.convert',
             'mae_jax.torch_io', 'mae_jax.train.loop',
             'mae_jax.train.pretrain', 'mae_jax.train.classify',
             'mae_jax.train.monitor', 'mae_jax.train.optim', 'mae_jax.paths',
             'mae_jax.figures', 'mae_jax.schema']
  loaded = _run(f"""
import importlib, json, sys
out = {{}}
for name in {modules!r}:
  importlib.import_module(name)
  out[name] = sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r})
print(json.dumps(out))
""")
  assert loaded == {m: [] for m in modules}


# Makes `blocked` look uninstalled: every finder on sys.meta_path passes it by.
HIDE = """
import sys
class Hide:
  def __init__(self, inner):
    self.inner = inner
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] == {blocked!r}:
      return None
    return self.inner.find_spec(name, path, target)
  def __getattr__(self, attr):
    return getattr(self.inner, attr)
sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
"""
CATCH = """
import json
try:
{body}
  print(json.dumps(['no error', '']))
except Exception as e:
  print(json.dumps([type(e).__name__, str(e)]))
"""


def _error_without(blocked, body):
  body = '\n'.join('  ' + line for line in body.strip().splitlines())
  return _run(HIDE.format(blocked=blocked) + CATCH.format(body=body))


@pytest.mark.parametrize('blocked, body, extra', [
    pytest.param('torch', "open(PTH, 'wb').close()\n"
                 "from mae_jax import torch_io\n"
                 "torch_io.read_state_dict(PTH)", 'torch', id='pth-file'),
    pytest.param('skimage', 'from mae_jax import embedded\n'
                 'embedded.embedded_paths()', 'viz', id='embedded-photos'),
    pytest.param('matplotlib', 'from mae_jax import visualize\n'
                 "visualize.visualize('no_checkpoint_here')", 'viz',
                 id='figures'),
    pytest.param('tensorflow', 'import mae_jax.data', 'data',
                 id='input-pipeline'),
])
def test_feature_without_its_extra_fails_in_one_line_naming_it(
    blocked, body, extra, tmp_path):
  kind, message = _error_without(
      blocked, f"PTH = {str(tmp_path / 'w.pth')!r}\n" + body)
  assert kind == 'MissingExtraError', (kind, message)
  assert '\n' not in message
  assert f"pip install 'mae_jax[{extra}]'" in message
  assert message.startswith(f'{blocked} is not installed')


def test_require_names_the_missing_parent_package():
  kind, message = _error_without(
      'matplotlib', "from mae_jax import extras\n"
      "extras.require('matplotlib.figure', 'viz', 'figures')")
  assert kind == 'MissingExtraError'
  assert message == ("matplotlib is not installed; it is needed for figures: "
                     "pip install 'mae_jax[viz]'")


def test_require_reraises_an_installed_module_with_a_broken_import(
    tmp_path, monkeypatch):
  (tmp_path / 'half_installed').mkdir()
  (tmp_path / 'half_installed' / '__init__.py').write_text(
      'import a_dependency_that_is_not_there\n')
  monkeypatch.syspath_prepend(str(tmp_path))
  with pytest.raises(ModuleNotFoundError) as info:
    extras.require('half_installed', 'viz')
  assert not isinstance(info.value, extras.MissingExtraError)
  assert info.value.name == 'a_dependency_that_is_not_there'


def _require_calls():
  """(file, module, extra) of every extras.require call in mae_jax."""
  calls = []
  for path in sorted((ROOT / 'mae_jax').rglob('*.py')):
    for node in ast.walk(ast.parse(path.read_text())):
      if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
          and node.func.attr == 'require' and len(node.args) >= 2):
        module, extra = (a.value if isinstance(a, ast.Constant) else None
                         for a in node.args[:2])
        calls.append((path.relative_to(ROOT).as_posix(), module, extra))
  return calls


def test_each_required_module_comes_with_the_extra_it_names():
  kwargs = _setup_kwargs()
  extras_require = kwargs['extras_require']
  dists = importlib.metadata.packages_distributions()
  calls = _require_calls()
  assert calls, 'no extras.require calls found'
  wrong = []
  for path, module, extra in calls:
    listed = {canonicalize_name(Requirement(r).name)
              for r in extras_require.get(extra, ())}
    provides = {canonicalize_name(d) for d in dists.get(module.split('.')[0], ())}
    if extra not in extras_require or not provides & listed:
      wrong.append(f'{path}: {module} with [{extra}]')
  assert not wrong, ('setup.py extras that do not bring the module: '
                     + '; '.join(wrong))


def test_core_requirements_leave_out_tensorflow_and_torch():
  kwargs = _setup_kwargs()
  core = {Requirement(r).name.lower() for r in kwargs['install_requires']}
  assert not core & {'tensorflow', 'tensorflow-cpu', 'torch', 'matplotlib'}
  test = {Requirement(r).name.lower()
          for r in kwargs['extras_require']['test']}
  for extra in ('data', 'viz', 'torch', 'gcs'):  # the suite tests them all
    names = {Requirement(r).name.lower()
             for r in kwargs['extras_require'][extra]}
    assert names <= test | {'torch'}, extra


def test_make_installs_each_extra_once_and_again_when_setup_py_changes(
    tmp_path):
  shutil.copy(ROOT / 'Makefile', tmp_path)
  shutil.copy(ROOT / 'setup.py', tmp_path)
  log = tmp_path / 'calls.log'
  fake = tmp_path / 'fake_python'
  fake.write_text(f"""#!/bin/sh
echo "$*" >> {log}
if [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin"; cp "$0" "$3/bin/python"; fi
""")
  fake.chmod(0o755)

  def make(target):
    log.write_text('')
    subprocess.run(['make', '-s', f'PYTHON={fake}', target], cwd=tmp_path,
                   check=True, capture_output=True)
    return [l for l in log.read_text().splitlines()
            if l.startswith(('-m venv', '-m pip'))]

  assert make('demo') == ['-m venv .venv', '-m pip install -q --upgrade pip',
                          '-m pip install -q --log .venv/pip-install.log -e '
                          '.[data,viz]']
  assert make('demo') == []
  # [test], then libtpu apart (the version jax names; the fake prints none)
  test_installs = ['-m pip install -q --log .venv/pip-install.log -e .[test]',
                   '-m pip install -q --log .venv/pip-install.log --no-deps '
                   '--upgrade --target .venv/libtpu']
  assert [l.strip() for l in make('test')] == test_installs
  assert make('demo') == [] and make('test') == []
  later = time.time() + 2
  os.utime(tmp_path / 'setup.py', (later, later))
  assert make('demo') == ['-m pip install -q --log .venv/pip-install.log -e '
                          '.[data,viz]']
  assert [l.strip() for l in make('test')] == test_installs


WEIGHTS = """
import json
import jax, numpy as np
from safetensors.numpy import save_file
import mae_jax
from mae_jax import convert
model = mae_jax.mae_vit_tiny_patch8()
imgs = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
noise = jax.random.uniform(jax.random.key(1), (2, model.num_patches))
params = model.init({'params': jax.random.key(2)}, imgs, noise=noise)['params']
state = convert.to_torch(model, params)
save_file({k: v.numpy() for k, v in state.items()}, 'w.safetensors')
np.save('imgs.npy', np.asarray(imgs))
np.save('noise.npy', np.asarray(noise))
print(json.dumps(float(model.apply({'params': params}, imgs, noise=noise)[0])))
"""
CORE_VENV = """
import importlib.metadata, importlib.util, json, re
import numpy as np
import mae_jax
from mae_jax import convert
convert.convert_file('w.safetensors', 'ckpt', 'mae_vit_tiny_patch8')
model, variables = mae_jax.load('ckpt')
imgs, noise = np.load('imgs.npy'), np.load('noise.npy')
loss = model.apply(variables, imgs, noise=noise)[0]
print(json.dumps({
    'mae_jax': mae_jax.__file__,
    'dists': sorted(re.sub(r'[-_.]+', '-', d.metadata['Name']).lower()
                    for d in importlib.metadata.distributions()),
    'importable': [m for m in %r if importlib.util.find_spec(m)],
    'loss': float(loss)}))
""" % (HEAVY,)


@pytest.mark.network
def test_pip_install_core_leaves_out_tensorflow_and_torch_and_runs_a_model(
    tmp_path):
  src = tmp_path / 'src'
  src.mkdir()
  shutil.copy(ROOT / 'setup.py', src)
  shutil.copytree(ROOT / 'mae_jax', src / 'mae_jax',
                  ignore=shutil.ignore_patterns('__pycache__'))
  work = tmp_path / 'work'
  work.mkdir()
  venv = tmp_path / 'venv'
  subprocess.run([sys.executable, '-m', 'venv', str(venv)], check=True)
  python = str(venv / 'bin' / 'python')
  # --no-compile: imports compile only what they use (saves half the time).
  pip = subprocess.Popen([python, '-m', 'pip', 'install', '-q', '--no-compile',
                          str(src)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
  try:
    expected = _run(WEIGHTS, cwd=work)  # written with this environment's torch
    _, stderr = pip.communicate(timeout=600)
  finally:
    pip.kill()
  assert pip.returncode == 0, (
      'pip install of the core package failed (this test needs the package '
      f'index): {stderr[-2000:]}')
  got = _run(CORE_VENV, cwd=work, python=python)
  assert got['mae_jax'].startswith(str(venv))
  assert got['importable'] == []
  assert not {'tensorflow', 'tensorflow-cpu', 'torch', 'matplotlib',
              'scikit-image'} & set(got['dists'])
  assert {'jax', 'flax', 'orbax-checkpoint', 'safetensors',
          'mae-jax'} <= set(got['dists'])
  assert got['loss'] == pytest.approx(expected, rel=1e-5)
