"""Exact softmax attention computed a few heads at a time (for CPUs).

XLA's attention materialises the (N, H, T, T) scores and makes about a
dozen passes over them in forward and backward; for the base decoder at
batch 16 that is 40 MB per pass, out of cache. Here the (batch, head) pairs
are processed a chunk at a time inside a loop, so the scores of one chunk
stay in cache, and the backward recomputes them from q and k
(flash-attention style: saved per head are only q, k, v, the output and the
log-sum-exp of each row). Values equal plain softmax attention up to
floating-point rounding.
"""
import jax
import jax.numpy as jnp

F32 = jnp.float32


def _scores(q, k, scale):
  """(G, T, d) x (G, S, d) -> (G, T, S) float32 logits."""
  return jnp.einsum('gtd,gsd->gts', q, k, preferred_element_type=F32) * scale


def _forward(q, k, v, scale):
  s = _scores(q, k, scale)
  m = jnp.max(s, axis=-1, keepdims=True)
  e = jnp.exp(s - m)
  total = jnp.sum(e, axis=-1, keepdims=True)
  o = jnp.einsum('gts,gsd->gtd', e.astype(v.dtype), v,
                 preferred_element_type=F32) / total
  return o.astype(q.dtype), m + jnp.log(total)


def _make_core(scale):
  """softmax(q k^T * scale) v on (G, T, d) head stacks, with its VJP."""

  @jax.custom_vjp
  def core(q, k, v):
    return _forward(q, k, v, scale)[0]

  def fwd(q, k, v):
    o, lse = _forward(q, k, v, scale)
    return o, (q, k, v, o, lse)

  def bwd(res, do):
    q, k, v, o, lse = res
    p = jnp.exp(_scores(q, k, scale) - lse)  # (G, T, S) probabilities
    dv = jnp.einsum('gts,gtd->gsd', p.astype(do.dtype), do,
                    preferred_element_type=F32)
    dp = jnp.einsum('gtd,gsd->gts', do, v, preferred_element_type=F32)
    row = jnp.sum(do.astype(F32) * o.astype(F32), axis=-1, keepdims=True)
    ds = (p * (dp - row) * scale).astype(q.dtype)
    dq = jnp.einsum('gts,gsd->gtd', ds, k, preferred_element_type=F32)
    dk = jnp.einsum('gts,gtd->gsd', ds, q, preferred_element_type=F32)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)

  core.defvjp(fwd, bwd)
  return core


CHUNK_BYTES = 2 ** 21  # float32 scores of one chunk: 2 MiB, about an L2


def chunk_size(count, length, budget=CHUNK_BYTES):
  """Heads per chunk: the largest divisor of `count` (so nothing is padded)
  whose (chunk, length, length) float32 scores fit in `budget` bytes."""
  most = max(1, budget // (4 * length * length))
  return max(g for g in range(1, min(most, count) + 1) if count % g == 0)


def chunked_attention(q, k, v, scale, budget=CHUNK_BYTES):
  """softmax(q k^T * scale) v for head-major q, k, v (B, T, d) -> (B, T, d).

  B counts (batch, head) pairs; they are processed in chunks whose scores
  fit in `budget` bytes (see chunk_size).
  """
  b, t, d = q.shape
  g = chunk_size(b, t, budget)
  core = _make_core(scale)
  parts = tuple(a.reshape(b // g, g, *a.shape[1:]) for a in (q, k, v))
  out = jax.lax.map(lambda qkv: core(*qkv), parts)
  return out.reshape(b, t, d)
