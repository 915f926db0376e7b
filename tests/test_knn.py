"""The online k-NN probe: weighted votes of the k most cosine-similar bank
entries (mae_jax.train.knn), reported during pretraining."""
import json

import numpy as np
import pytest

from mae_jax.train import knn


def _brute_force(bank, bank_labels, queries, num_classes, k, temperature):
  bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
  queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
  out = []
  for q in queries:
    sims = bank @ q
    nearest = np.argsort(-sims, kind='stable')[:k]
    votes = np.zeros(num_classes)
    for i in nearest:
      votes[bank_labels[i]] += np.exp(sims[i] / temperature)
    out.append(np.argmax(votes))
  return np.array(out)


def test_knn_predictions_equal_a_brute_force_weighted_vote():
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(5, 16))
  bank_labels = rng.integers(0, 5, 300)
  bank = centres[bank_labels] + rng.normal(size=(300, 16))
  query_labels = rng.integers(0, 5, 2100)  # > one QUERY_CHUNK
  queries = centres[query_labels] + rng.normal(size=(2100, 16))
  got = knn.predict(bank.astype(np.float32), bank_labels,
                    queries.astype(np.float32), 5, k=20, temperature=0.07)
  want = _brute_force(bank, bank_labels, queries, 5, 20, 0.07)
  assert (got == want).mean() > 0.999  # float32 vs float64 near-ties
  assert knn.top1(bank, bank_labels, queries, query_labels, 5) > 80


def test_close_neighbours_outvote_a_farther_majority_at_low_temperature():
  # Query along x: two class-1 entries at cosine 0.99, three class-0 ones
  # at cosine 0.5. Weighted votes (T = 0.07) pick 1; near-uniform ones pick
  # the majority, 0.
  angle = lambda c: [c, np.sqrt(1 - c * c)]
  bank = np.array([angle(0.99)] * 2 + [angle(0.5)] * 3, np.float32)
  labels = np.array([1, 1, 0, 0, 0])
  query = np.array([[1.0, 0.0]], np.float32)
  assert knn.predict(bank, labels, query, 2, k=5, temperature=0.07)[0] == 1
  assert knn.predict(bank, labels, query, 2, k=5, temperature=100.0)[0] == 0


def test_k_above_the_bank_size_uses_the_whole_bank():
  bank = np.eye(3, dtype=np.float32)
  assert knn.predict(bank, [0, 1, 2], bank, 3, k=20).tolist() == [0, 1, 2]


def test_pooled_feature_is_the_cls_token_or_the_patch_mean():
  tokens = np.arange(2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3)
  np.testing.assert_array_equal(knn.pooled(tokens, 'cls'), tokens[:, 0])
  np.testing.assert_allclose(knn.pooled(tokens, 'mean'),
                             tokens[:, 1:].mean(axis=1))
  with pytest.raises(ValueError, match="'max'"):
    knn.pooled(tokens, 'max')


def test_pretraining_reports_knn_top1_to_progress_metrics_and_tensorboard(
    tmp_path, capsys):
  tf = pytest.importorskip('tensorflow')
  from tests.helpers import tiny_pretrain_config
  from mae_jax.train import pretrain
  # On every device of the suite (8): features are gathered across the
  # mesh, the 60 tiles padded to batches of 8.
  config = tiny_pretrain_config(total_steps=4, eval_every_steps=2,
                                checkpoint_every_steps=4, mesh=(-1, 1),
                                figure_every_steps=0, knn_k=5)
  pretrain.train(config, str(tmp_path))
  out = capsys.readouterr().out
  # The embedded photos: the bank is split 'train', the queries the 60
  # held-out tiles of split 'validation'.
  assert 'eval at step 2: k-NN top-1' in out and 'on 60 images (k=5' in out
  with open(tmp_path / 'metrics.jsonl') as f:
    evals = [r for r in map(json.loads, f) if 'eval' in r]
  assert [r['step'] for r in evals] == [2, 4]
  for r in evals:
    assert 0 <= r['eval']['knn_top1'] <= 100 and r['eval']['count'] == 60
  steps = [event.step
           for events in sorted((tmp_path / 'tb').glob('events.out.*'))
           for event in tf.compat.v1.train.summary_iterator(str(events))
           for value in event.summary.value if value.tag == 'eval/knn_top1']
  assert steps == [2, 4]


def test_knn_fields_are_checked_by_the_schema():
  from mae_jax import schema
  from mae_jax.errors import ConfigError
  from tests.helpers import tiny_pretrain_config
  for field, value, words in (('knn_k', 0, 'must be >= 1'),
                              ('knn_temperature', 0.0, 'must be > 0'),
                              ('knn_pool', 'max', 'allowed: cls, mean')):
    config = tiny_pretrain_config()
    config[field] = value
    with pytest.raises(ConfigError, match=f'config.{field}=.*{words}'):
      schema.check(config)
