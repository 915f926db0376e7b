"""A block stack pads an odd token count once, not around every block."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mae_jax.models import blocks

DEPTH, WIDTH, HEADS = 3, 16, 2


class Stack(nn.Module):
  """DEPTH blocks run by blocks.run_stack; pad_odd as Attention's."""
  pad_odd: bool
  scan: bool = False
  depth: int = DEPTH

  @nn.compact
  def __call__(self, x):
    if self.scan:
      stack = blocks.scan_block_class(False, self.depth)(
          HEADS, pad_odd=self.pad_odd, name='stack')
    else:
      stack = [blocks.Block(HEADS, pad_odd=self.pad_odd, name=f'stack_{i}')
               for i in range(self.depth)]
    return blocks.run_stack(stack, x, self.depth)


def _x(t, seed=0):
  return jax.random.normal(jax.random.key(seed), (2, t, WIDTH))


def _value_and_grads(module, params, x):
  """The module's output and the gradients of sum(sin(output)) with respect
  to the parameters and the input, in one jitted call."""
  def loss(p, x):
    out = module.apply({'params': p}, x)
    return jnp.sum(jnp.sin(out)), out
  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1),
                                               has_aux=True))(params, x)
  return out, grads


@pytest.mark.parametrize('scan', [False, True])
def test_a_stack_padded_once_gives_the_unpadded_values_and_gradients(scan):
  # The pad token is a key every query ignores and a query whose output is
  # dropped, so outputs and all gradients are those of the 7 real tokens.
  x = _x(7)
  plain, padded = Stack(False, scan), Stack(True, scan)
  params = jax.jit(plain.init)(jax.random.key(1), x)['params']
  # Non-zero biases and LayerNorm offsets, so the pad row is not zero.
  rng = np.random.default_rng(2)
  params = jax.tree.map(
      lambda p: p + 0.1 * rng.standard_normal(p.shape, np.float32), params)
  out, grads = _value_and_grads(plain, params, x)
  out_p, grads_p = _value_and_grads(padded, params, x)
  assert out_p.shape == (2, 7, WIDTH)
  np.testing.assert_allclose(out_p, out, atol=1e-5)
  for a, b in zip(jax.tree.leaves(grads_p), jax.tree.leaves(grads)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def _token_copies(depth, pad_odd):
  """The pad and slice ops between the 7 real and 8 padded tokens' (2, T,
  WIDTH) activations in the jitted gradient of an unrolled stack."""
  x = _x(7)
  module = Stack(pad_odd, depth=depth)
  params = jax.eval_shape(module.init, jax.random.key(1), x)['params']
  loss = lambda p, x: jnp.sum(module.apply({'params': p}, x) ** 2)
  text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).as_text()
  return [line for line in text.splitlines()
          if re.search(r'stablehlo\.(slice|pad)\b', line)
          and f'tensor<2x7x{WIDTH}x' in line and f'tensor<2x8x{WIDTH}x' in line]


def test_a_stack_pads_odd_tokens_once_not_around_every_block():
  # Forward: one pad before the first block, one slice after the last;
  # backward: their transposes. Depth does not add any.
  assert _token_copies(DEPTH, pad_odd=False) == []
  once = _token_copies(1, pad_odd=True)
  assert len(once) == 4
  assert len(_token_copies(DEPTH, pad_odd=True)) == len(once)


def test_a_stack_of_no_blocks_returns_its_input():
  x = _x(7)
  module = Stack(True, depth=0)
  np.testing.assert_array_equal(module.apply(module.init(jax.random.key(1),
                                                         x), x), x)
