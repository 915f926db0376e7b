"""Weighted k-nearest-neighbour classification of frozen features, the
online probe of representation quality during pretraining.

As in Wu et al. 2018 ("Unsupervised Feature Learning via Non-Parametric
Instance Discrimination") and DINO (Caron et al. 2021): features are
L2-normalised; each query's k most cosine-similar bank entries vote for
their labels with weight exp(similarity / temperature); the class with the
largest summed weight wins (ties: the smallest label).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

QUERY_CHUNK = 1024  # queries scored at once: memory is QUERY_CHUNK x bank


def pooled(tokens, pool):
  """(N, 1 + L, D) encoder tokens -> (N, D): the cls token ('cls') or the
  mean of the patch tokens ('mean')."""
  if pool == 'cls':
    return tokens[:, 0]
  if pool == 'mean':
    return jnp.mean(tokens[:, 1:], axis=1)
  raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")


def _normalise(x):
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnames=('num_classes', 'k'))
def _votes(bank, bank_labels, queries, num_classes, k, temperature):
  sims = _normalise(queries) @ _normalise(bank).T          # (Q, B)
  top, index = jax.lax.top_k(sims, k)                      # (Q, k)
  weights = jnp.exp(top / temperature)
  labels = jax.nn.one_hot(bank_labels[index], num_classes)  # (Q, k, C)
  return jnp.einsum('qk,qkc->qc', weights, labels)


def predict(bank, bank_labels, queries, num_classes, k=20, temperature=0.07):
  """Predicted labels int32 (Q,) of `queries` (Q, D) from the labelled
  `bank` (B, D), bank_labels int (B,). k is capped at B."""
  bank = jnp.asarray(bank)
  bank_labels = jnp.asarray(bank_labels, jnp.int32)
  k = min(int(k), bank.shape[0])
  out = [np.asarray(jnp.argmax(_votes(bank, bank_labels,
                                      jnp.asarray(queries[i:i + QUERY_CHUNK]),
                                      num_classes, k, temperature), axis=-1))
         for i in range(0, len(queries), QUERY_CHUNK)]
  return np.concatenate(out).astype(np.int32) if out else np.zeros(
      (0,), np.int32)


def top1(bank, bank_labels, queries, labels, num_classes, k=20,
         temperature=0.07):
  """Top-1 accuracy (%) of `predict` against labels (Q,)."""
  pred = predict(bank, bank_labels, queries, num_classes, k, temperature)
  return 100.0 * float(np.mean(pred == np.asarray(labels)))
