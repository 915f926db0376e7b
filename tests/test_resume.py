"""Resuming: relative workdirs, refusal of trajectory changes, overrides,
and a failed asynchronous save ending the run at the next update."""
import errno
import json
import os
import re
import shutil
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mae_jax.errors import CheckpointSaveError, ConfigError
from mae_jax.train import classify, pretrain, sharding
from tests.helpers import tiny_config, tiny_pretrain_config

pytestmark = pytest.mark.long


def _mesh():
  return jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1),
                           ('data', 'fsdp'))


def _steps(path):
  return [json.loads(l)['step'] for l in open(path / 'metrics.jsonl')]


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
  """A relative workdir trained to step 4 (checkpoints 2 and 4), then
  copied to an absolute place for the refusal tests."""
  root = tmp_path_factory.mktemp('resume')
  cwd = os.getcwd()
  os.chdir(root)
  try:
    pretrain.train(tiny_pretrain_config(total_steps=4), 'runs/w', _mesh())
  finally:
    os.chdir(cwd)
  return root / 'runs' / 'w'


def test_resume_from_an_earlier_step_keeps_one_metrics_record_per_step(
    finished, tmp_path, monkeypatch, capsys):
  assert sorted(os.listdir(finished / 'checkpoints')) == ['2', '4']
  shutil.copytree(finished, tmp_path / 'w')
  shutil.rmtree(tmp_path / 'w' / 'checkpoints' / '4')  # killed before 4
  monkeypatch.chdir(tmp_path)
  pretrain.train(tiny_pretrain_config(total_steps=6,
                                     resume_override='total_steps'),
                'w', _mesh())
  out = capsys.readouterr().out
  assert 'resuming at step 2/6 in w on mesh data=1 fsdp=1' in out
  assert ('resuming with changed fields (config.resume_override): '
          'total_steps: 4 -> 6') in out
  assert ('done: pretrain step 6/6; checkpoints in w/checkpoints, metrics in '
          'w/metrics.jsonl') in out
  assert _steps(tmp_path / 'w') == [1, 2, 3, 4, 5, 6]  # no duplicates
  assert '6' in os.listdir(tmp_path / 'w' / 'checkpoints')


@pytest.mark.parametrize('field,value', [
    ('mask_ratio', 0.6), ('blr', 1e-3), ('weight_decay', 0.0), ('b2', 0.99),
    ('min_lr', 1e-6), ('seed', 1), ('total_steps', 8), ('warmup_steps', 3),
    ('norm_pix_loss', True), ('dtype', 'bfloat16'), ('data.repeats', 2),
    ('data.shuffle_buffer', 5), ('accum_iter', 2), ('scan_blocks', True)])
def test_resume_refuses_a_trajectory_change_naming_the_field(
    finished, field, value):
  config = tiny_pretrain_config(**{"total_steps": 4, field: value})
  with pytest.raises(ConfigError, match=re.escape(f'{field}=') + r'.*'
                     r'\(checkpoint\) != .*\(now\).*resume_override'):
    pretrain.train(config, str(finished), _mesh())


def test_resume_accepts_logging_changes_and_named_overrides(finished,
                                                            capsys):
  pretrain.train(tiny_pretrain_config(total_steps=4, log_every_steps=3,
                                     checkpoint_every_steps=1,
                                     keep_checkpoints=5),
                str(finished), _mesh())
  assert 'resuming at step 4/4' in capsys.readouterr().out
  config = tiny_pretrain_config(total_steps=4, blr=1e-3, resume_override='blr')
  pretrain.train(config, str(finished), _mesh())
  assert "blr: 0.0015 -> 0.001" in capsys.readouterr().out
  with pytest.raises(ConfigError, match="resume_override names 'nosuch'"):
    pretrain.train(tiny_pretrain_config(resume_override='nosuch'),
                  str(finished), _mesh())


def _finetune_config(**fields):
  return tiny_config('finetune', **{
      'total_steps': 12, 'checkpoint_every_steps': 4,
      'eval_every_steps': 100, **fields})


def test_finetuning_names_its_init_and_refuses_recipe_changes_on_resume(
    finished, tmp_path, capsys):
  config = _finetune_config(init_from=str(finished), total_steps=2,
                            warmup_steps=1, checkpoint_every_steps=2,
                            eval_every_steps=2)
  result = classify.train(config, str(tmp_path / 'ft'), _mesh())
  out = capsys.readouterr().out
  assert (f'initialised from {finished}: the encoder only (head and fc_norm '
          'newly initialised)') in out
  assert f"done: finetune step 2/2; top-1 {result['top1']:.2f}%" in out
  for field, value in (('layer_decay', 0.5), ('smoothing', 0.0),
                       ('drop_path', 0.2), ('init_from', str(tmp_path))):
    changed = _finetune_config(**{
        'init_from': str(finished), 'total_steps': 2, 'warmup_steps': 1,
        field: value})
    with pytest.raises(ConfigError, match=re.escape(f'{field}=')):
      classify.train(changed, str(tmp_path / 'ft'), _mesh())


@pytest.fixture
def failing_save(monkeypatch):
  """Makes the async save of step 4 fail in its background thread (after
  its files are written, as a failed commit would). Returns an Event set
  once orbax has recorded the failure."""
  failed = threading.Event()
  local = threading.local()
  manager = ocp.CheckpointManager
  real_wait, real_finalize = (manager._wait_for_checkpointers,
                              manager._finalize)

  def wait_for_checkpointers(self):
    real_wait(self)
    if getattr(local, 'fail', False):
      raise OSError(errno.EIO, 'Input/output error (injected)')

  def finalize(self, step, steps_to_remove):
    local.fail = step == 4
    try:
      return real_finalize(self, step, steps_to_remove)
    except BaseException:
      failed.set()
      raise
  monkeypatch.setattr(manager, '_wait_for_checkpointers',
                      wait_for_checkpointers)
  monkeypatch.setattr(manager, '_finalize', finalize)
  return failed


def _count_updates(event, monkeypatch):
  """Counts the batches put on devices (one per update): all of them, and
  those after `event`. Updates after the 4th take 0.5 s more, so that the
  failing save of step 4 fails long before the next save at step 8."""
  counts = {'all': 0, 'after': 0}
  real = sharding.global_batch

  def global_batch(*args, **kwargs):
    counts['all'] += 1
    counts['after'] += event.is_set()
    if counts['all'] > 4:
      time.sleep(0.5)
    return real(*args, **kwargs)
  monkeypatch.setattr(sharding, 'global_batch', global_batch)
  return counts


def test_failed_async_save_stops_pretraining_at_the_next_update(
    tmp_path, failing_save, monkeypatch):
  counts = _count_updates(failing_save, monkeypatch)
  with pytest.raises(CheckpointSaveError,
                     match=r'saving checkpoint step 4 in .* failed: OSError: '
                     r'.*injected.*; the older checkpoints \(none\) are intact'):
    pretrain.train(tiny_pretrain_config(total_steps=12,
                                       checkpoint_every_steps=4),
                  str(tmp_path / 'w'), _mesh())
  assert failing_save.is_set()
  # Stopped at the first update after the failure, before the next save.
  assert counts['after'] <= 1 and counts['all'] < 8, counts


def test_failed_async_save_stops_finetuning_at_the_next_update(
    tmp_path, failing_save, monkeypatch):
  config = _finetune_config()
  counts = _count_updates(failing_save, monkeypatch)
  with pytest.raises(CheckpointSaveError,
                     match=r'saving checkpoint step 4 .*injected.*; the '
                     r'older checkpoints \(none\) are intact'):
    classify.train(config, str(tmp_path / 'ft'), _mesh())
  assert failing_save.is_set()
  # Stopped at the first update after the failure, before the next save.
  assert counts['after'] <= 1 and counts['all'] < 8, counts
