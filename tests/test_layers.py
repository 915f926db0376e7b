import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from mae_jax.models import blocks, layers


def _x(shape, seed=0):
  return jax.random.normal(jax.random.key(seed), shape)


def test_attention_matches_manual_softmax():
  x = _x((2, 7, 24))
  attn = layers.Attention(num_heads=4)
  params = attn.init(jax.random.key(1), x)['params']
  out = np.asarray(attn.apply({'params': params}, x))
  wq, bq = np.asarray(params['qkv']['kernel']), np.asarray(params['qkv']['bias'])
  qkv = (np.asarray(x) @ wq + bq).reshape(2, 7, 3, 4, 6)
  q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
  s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(6)
  s = np.exp(s - s.max(-1, keepdims=True))
  s /= s.sum(-1, keepdims=True)
  o = (s @ v).transpose(0, 2, 1, 3).reshape(2, 7, 24)
  ref = o @ np.asarray(params['proj']['kernel']) + np.asarray(
      params['proj']['bias'])
  np.testing.assert_allclose(out, ref, atol=1e-5)


def test_mlp_uses_exact_gelu():
  x = _x((3, 5, 8))
  mlp = layers.Mlp(hidden_dim=32)
  params = mlp.init(jax.random.key(1), x)['params']
  h = np.asarray(x) @ np.asarray(params['fc1']['kernel']) + np.asarray(
      params['fc1']['bias'])
  h = 0.5 * h * (1 + erf(h / math.sqrt(2)))
  ref = h @ np.asarray(params['fc2']['kernel']) + np.asarray(
      params['fc2']['bias'])
  np.testing.assert_allclose(np.asarray(mlp.apply({'params': params}, x)), ref,
                             atol=1e-5)


def test_layernorm_eps_and_init_distributions():
  x = _x((2, 5, 64))
  blk = blocks.Block(num_heads=4)
  params = blk.init(jax.random.key(0), x)['params']
  assert blk.apply({'params': params}, x).shape == x.shape
  np.testing.assert_array_equal(params['norm1']['scale'], 1.0)
  np.testing.assert_array_equal(params['attn']['qkv']['bias'], 0.0)
  # Xavier-uniform over the fused (D, 3D) qkv matrix: bound sqrt(6 / (D + 3D)).
  bound = math.sqrt(6 / (64 + 192))
  qkv = np.asarray(params['attn']['qkv']['kernel'])
  assert np.abs(qkv).max() <= bound and np.abs(qkv).max() > 0.9 * bound
  assert layers.LN_EPS == 1e-6


def test_patch_embed_is_strided_conv_with_linear_xavier_init():
  imgs = _x((2, 16, 16, 3))
  pe = layers.PatchEmbed(patch_size=8, embed_dim=32)
  params = pe.init(jax.random.key(0), imgs)['params']
  assert params['kernel'].shape == (8, 8, 3, 32)
  bound = math.sqrt(6 / (8 * 8 * 3 + 32))
  k = np.asarray(params['kernel'])
  assert np.abs(k).max() <= bound and np.abs(k).max() > 0.9 * bound
  conv = jax.lax.conv_general_dilated(
      imgs, params['kernel'], (8, 8), 'VALID',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + params['bias']
  np.testing.assert_allclose(np.asarray(pe.apply({'params': params}, imgs)),
                             np.asarray(conv).reshape(2, 4, 32), atol=1e-5)


def test_drop_path_only_in_training():
  x = _x((16, 3, 8))
  blk = blocks.Block(num_heads=2, drop_path_rate=0.5)
  params = blk.init(jax.random.key(0), x)
  det = blk.apply(params, x, deterministic=True)
  np.testing.assert_array_equal(det, blk.apply(params, x))
  a = blk.apply(params, x, deterministic=False,
                rngs={'dropout': jax.random.key(1)})
  b = blk.apply(params, x, deterministic=False,
                rngs={'dropout': jax.random.key(2)})
  assert not np.allclose(a, det) and not np.allclose(a, b)
  with pytest.raises(Exception, match='dropout'):
    blk.apply(params, x, deterministic=False)


def _attention_and_grad(x, **fields):
  """(output, d sum(out^2) / d params) of an Attention with `fields` and the
  parameters drawn from key 1."""
  attn = layers.Attention(num_heads=3, **fields)
  params = layers.Attention(num_heads=3).init(jax.random.key(1), x)['params']
  loss = lambda p: jnp.sum(attn.apply({'params': p}, x) ** 2)
  return attn.apply({'params': params}, x), jax.grad(loss)(params)


@pytest.mark.parametrize('impl', ['xla', 'chunked'])
def test_split_qkv_has_the_fused_projections_parameters_and_values(impl):
  # Three matmuls on the kernel's column blocks: the same parameter tree and
  # initial values as one Dense(3D), the same outputs and gradients.
  x = _x((2, 7, 24))
  fused = layers.Attention(num_heads=3, split_qkv=False).init(
      jax.random.key(1), x)
  split = layers.Attention(num_heads=3, split_qkv=True).init(
      jax.random.key(1), x)
  assert jax.tree.structure(fused) == jax.tree.structure(split)
  for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(split)):
    np.testing.assert_array_equal(a, b)
  out_f, grad_f = _attention_and_grad(x, split_qkv=False,
                                      attention_impl=impl)
  out_s, grad_s = _attention_and_grad(x, split_qkv=True, attention_impl=impl)
  np.testing.assert_allclose(out_s, out_f, atol=1e-6)
  for a, b in zip(jax.tree.leaves(grad_s), jax.tree.leaves(grad_f)):
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize('t', [7, 8])
@pytest.mark.parametrize('split', [True, False])
def test_odd_length_padding_is_exact(t, split):
  # cuDNN needs an even token count when training: the tokens are padded by
  # one hidden from every query and dropped after the projection; values and
  # gradients must be the unpadded ones (fp32 rounding only).
  x = _x((2, t, 24))
  plain, grad_plain = _attention_and_grad(x, attention_impl='xla',
                                          split_qkv=split, pad_odd=False)
  padded, grad_padded = _attention_and_grad(x, attention_impl='xla',
                                            split_qkv=split, pad_odd=True)
  assert padded.shape == (2, t, 24)
  np.testing.assert_allclose(padded, plain, atol=1e-6)
  for a, b in zip(jax.tree.leaves(grad_padded), jax.tree.leaves(grad_plain)):
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize('pad', [False, True])
def test_folded_qkv_biases_give_the_same_attention_and_gradients(pad):
  # k's bias shifts all of a query's scores alike (softmax cancels it) and
  # v's passes through the convex combination: dropping the one and folding
  # the other into the projection's bias is the same function, with the
  # same parameters. Biases made large so that a wrong fold shows.
  x = _x((2, 7, 24))
  attn = layers.Attention(num_heads=3, attention_impl='xla', pad_odd=pad)
  folded = layers.Attention(num_heads=3, attention_impl='xla', pad_odd=pad,
                            fold_qkv_bias=True)
  params = attn.init(jax.random.key(1), x)['params']
  assert (jax.tree.structure(folded.init(jax.random.key(1), x)['params'])
          == jax.tree.structure(params))
  params = jax.tree.map(lambda p: p + _x(p.shape, seed=3), params)
  outs, grads = [], []
  for module in (attn, folded):
    loss = lambda p, m=module: jnp.sum(m.apply({'params': p}, x) ** 2)
    outs.append(module.apply({'params': params}, x))
    grads.append(jax.grad(loss)(params))
  scale = float(jnp.abs(outs[0]).max())
  assert scale > 1
  np.testing.assert_allclose(outs[1], outs[0], atol=1e-6 * scale)
  for a, b in zip(jax.tree.leaves(grads[1]), jax.tree.leaves(grads[0])):
    np.testing.assert_allclose(a, b, atol=1e-5 * float(jnp.abs(b).max()))
  k_bias = slice(24, 48)
  assert not np.any(grads[1]['qkv']['bias'][k_bias])  # exactly zero
  # The plain form's k-bias gradient is zero up to rounding, and the
  # gradients of q's and v's biases are not.
  bias_grad = np.abs(grads[0]['qkv']['bias'])
  assert bias_grad[k_bias].max() < 1e-5 * bias_grad.max()
  assert bias_grad[:24].min() > 0 and bias_grad[48:].min() > 0


def _token_adds(fold):
  """The adds over all (2 x 8) tokens' activations in the forward pass of
  an Attention of width 24."""
  x = _x((2, 8, 24))
  attn = layers.Attention(num_heads=3, attention_impl='xla',
                          fold_qkv_bias=fold)
  text = jax.jit(attn.apply).lower(attn.init(jax.random.key(1), x),
                                   x).as_text()
  return [line for line in text.splitlines()
          if re.search(r'stablehlo\.add\b', line) and 'tensor<16x24x' in line]


def test_folded_qkv_biases_remove_two_bias_adds_over_every_token():
  # q, k, v and the projection's bias adds; folded, q's and the projection's.
  assert len(_token_adds(fold=False)) == 4
  assert len(_token_adds(fold=True)) == 2


def test_folded_qkv_biases_need_split_qkv():
  attn = layers.Attention(num_heads=3, split_qkv=False, fold_qkv_bias=True)
  with pytest.raises(ValueError, match='fold_qkv_bias needs split_qkv'):
    attn.init(jax.random.key(1), _x((2, 8, 24)))


def test_cudnn_long_uses_cudnn_from_128_tokens():
  assert layers.implementation_for('cudnn_long', 127) == 'xla'
  assert layers.implementation_for('cudnn_long', 128) == 'cudnn'
  assert layers.implementation_for('cudnn', 50) == 'cudnn'
  assert layers.implementation_for(None, 50) is None


def _activation_copies(split):
  """The slice / pad / concatenate ops in the jitted gradient of an
  Attention (XLA attention, 2 x 8 tokens of width 24) with an operand or
  result as large as the qkv activations (2 * 8 * 72 elements)."""
  x = _x((2, 8, 24))
  attn = layers.Attention(num_heads=3, attention_impl='xla', split_qkv=split)
  params = attn.init(jax.random.key(1), x)['params']
  loss = lambda p, x: jnp.sum(attn.apply({'params': p}, x) ** 2)
  text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).as_text()
  copies = []
  for line in text.splitlines():
    if not re.search(r'stablehlo\.(slice|pad|concatenate)\b', line):
      continue
    sizes = [math.prod(int(n) for n in shape.split('x'))
             for shape in re.findall(r'tensor<([\dx]+)x[a-z]', line)]
    if 2 * 8 * 72 in sizes:
      copies.append(line.strip())
  return copies


def test_split_qkv_puts_no_copy_of_the_activations_around_attention():
  # One matmul and slices: q, k, v are sliced out of its output in the
  # forward pass and their gradients padded back to its shape and summed in
  # the backward pass.
  assert _activation_copies(split=False)
  assert _activation_copies(split=True) == []
