"""The fast formulations of stgcn_jax.layers against the straightforward ones, in float64: forward and gradient.

The parity with mmaction2 itself is tests/test_model.py; these pin each re-formulation on small random inputs
so that a regression points at the layer that caused it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stgcn_jax import graph
from stgcn_jax.layers import (MSTCN, BatchNorm, TemporalConv, UnitGCN, aggregate_joints, max_pool_time,
                              split_channels)

F64 = dict(dtype=jnp.float64, param_dtype=jnp.float64)


@pytest.fixture(autouse=True, scope='module')
def _x64():
  jax.config.update('jax_enable_x64', True)
  yield
  jax.config.update('jax_enable_x64', False)


def _rand(key, shape):
  return jax.random.normal(jax.random.key(key), shape, jnp.float64)


def _close(a, b, rtol=1e-12):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    x, y = np.asarray(x), np.asarray(y)
    scale = max(np.abs(y).max(), 1e-300)
    np.testing.assert_allclose(x, y, rtol=0, atol=rtol * scale)


def _to(x, channel_axis):
  """Channels-last ``(B, T, V, C)`` test data in the layout ``channel_axis`` names."""
  return jnp.moveaxis(x, -1, 0) if channel_axis == 0 else x


def _back(x, channel_axis):
  """A layer's output in the layout ``channel_axis`` names, back to channels last."""
  return jnp.moveaxis(x, 0, -1) if channel_axis == 0 else x


LAYOUTS = pytest.mark.parametrize('channel_axis', [-1, 0], ids=['channels_last', 'channels_first'])


@LAYOUTS
@pytest.mark.parametrize('w', [17, 11])   # 11: target joints ≠ source joints, to pin every axis of the gradient
def test_aggregate_joints_matches_einsum_forward_and_gradient(w, channel_axis):
  a = jnp.asarray(graph.adjacency('coco'), jnp.float64)[..., :w] + 0.1 * _rand(0, (3, 17, w))
  x = _rand(1, (2, 5, 17, 4))
  ct = _rand(2, (2, 5, w, 12))
  agg = lambda x, a: _back(aggregate_joints(_to(x, channel_axis), a, channel_axis), channel_axis)
  fast = lambda x, a: jnp.sum(agg(x, a) * ct)
  ref = lambda x, a: jnp.sum(jnp.einsum('btvc,kvw->btwkc', x, a).reshape(2, 5, w, 12) * ct)
  _close(agg(x, a), jnp.einsum('btvc,kvw->btwkc', x, a).reshape(2, 5, w, 12))
  _close(jax.grad(fast, argnums=(0, 1))(x, a), jax.grad(ref, argnums=(0, 1))(x, a))
  # A hand-checked entry: joint w of subset k sums its sources v weighted by a[k, v, w].
  np.testing.assert_allclose(agg(x, a)[1, 3, 4, 2 * 4 + 1], sum(a[2, v, 4] * x[1, 3, v, 1] for v in range(17)),
                             rtol=1e-12)


def _gcn_reference(gcn: UnitGCN, x, train: bool):
  """``unit_gcn`` written directly (channels last): 1×1 conv to K·C_out, then the einsum with A (conv_pos='pre')."""
  b, t, v, _ = x.shape
  y = jnp.dot(x, gcn.conv.kernel[...]) + gcn.conv.bias[...]
  y = jnp.einsum('btvkc,kvw->btwc', y.reshape(b, t, v, gcn.num_subsets, gcn.c_out), gcn.adjacency())
  y = gcn.bn(y, train=train)
  y = y + (gcn.down_bn(gcn.down_conv(x), train=train) if gcn.down_conv is not None else x)
  return jax.nn.relu(y)


@LAYOUTS
@pytest.mark.parametrize('c_in, c_out', [(6, 8), (8, 8)])
@pytest.mark.parametrize('train', [False, True])
def test_unit_gcn_pre_reassociated_matches_conv_then_aggregate(c_in, c_out, train, channel_axis):
  a = graph.adjacency('coco')
  gcn = UnitGCN(c_in, c_out, a, rngs=nnx.Rngs(0), **F64)
  x = _rand(4, (3, 6, 17, c_in))
  ct = _rand(5, (3, 6, 17, c_out))
  fast = lambda m, x: _back(m(_to(x, channel_axis), train=train, channel_axis=channel_axis), channel_axis)
  _fast_matches_reference(gcn, x, ct, fast, lambda m, x: _gcn_reference(m, x, train), seed=3,
                          zero_bias_of=('down_conv',) if train else ())


_MSTCN_CONVS = ('conv', 'tconv', 'branch_1x1', 'transform_conv')   # each feeds a BatchNorm


def _is_bias_of(path, modules) -> bool:
  names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
  return len(names) >= 2 and names[-1] == 'bias' and names[-2] in modules


def _fast_matches_reference(module, x, ct, fast, reference, seed, zero_bias_of=()):
  """Moves the parameters (A included) and BatchNorm statistics off their initial values so every term is
  exercised, then checks ``fast(m, x)`` against ``reference(m, x)``: the loss ``Σ y·ct``, its gradients for
  the parameters and ``x``, and the updated statistics. Returns (updated statistics, initial ones).

  ``zero_bias_of`` names convolutions whose output goes straight into a training BatchNorm, which subtracts
  the batch mean: their bias has exactly zero gradient, and both sides give round-off of either sign, which
  has no relative accuracy. Those gradients are checked to be zero, to 1e-12 of the largest gradient, on both
  sides; every other gradient is compared."""
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  params = jax.tree.map(lambda p: p + 0.05 * _rand(seed, p.shape), params)
  rest = jax.tree.map(lambda s: s + 0.1 if s.dtype == jnp.float64 else s, rest)

  def loss(params, x, use_fast):
    m = nnx.merge(graphdef, params, rest, copy=True)
    y = fast(m, x) if use_fast else reference(m, x)
    return jnp.sum(y * ct), nnx.state(m, nnx.BatchStat)

  (v_fast, st_fast), g_fast = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x, True)
  (v_ref, st_ref), g_ref = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x, False)
  np.testing.assert_allclose(v_fast, v_ref, rtol=1e-12)
  leaves_fast, leaves_ref = jax.tree_util.tree_leaves_with_path(g_fast), jax.tree.leaves(g_ref)
  zero = [_is_bias_of(path, zero_bias_of) for path, _ in leaves_fast]
  largest = max(float(np.abs(g).max()) for g in leaves_ref)
  for (path, g_f), g_r, is_zero in zip(leaves_fast, leaves_ref, zero, strict=True):
    if is_zero:
      for g in (g_f, g_r):
        np.testing.assert_allclose(g, 0.0, rtol=0, atol=1e-12 * largest, err_msg=jax.tree_util.keystr(path))
    else:
      _close(g_f, g_r, rtol=1e-11)
  _close(st_fast, st_ref)
  return st_fast, rest


@pytest.mark.parametrize('groups', [1, 2])
def test_batch_norm_train_matches_formula(groups):
  bn = BatchNorm(5, param_dtype=jnp.float64)
  bn.scale[...] = 1 + 0.1 * _rand(6, (5,))
  bn.bias[...] = 0.1 * _rand(7, (5,))
  x = _rand(8, (4, 3, 2, 5)) * 3 + 1
  y = bn(x, train=True, groups=groups)
  xg = np.asarray(x).reshape(groups, -1, 5)
  mean, var = xg.mean(1, keepdims=True), xg.var(1, keepdims=True)
  expect = ((xg - mean) / np.sqrt(var + 1e-5) * np.asarray(bn.scale[...]) + np.asarray(bn.bias[...])).reshape(x.shape)
  np.testing.assert_allclose(y, expect, rtol=1e-12, atol=1e-12)
  n = xg.shape[1]
  np.testing.assert_allclose(bn.mean[...], 0.1 * mean.mean((0, 1)), rtol=1e-12)
  np.testing.assert_allclose(bn.var[...], 0.9 + 0.1 * (var * n / (n - 1)).mean((0, 1)), rtol=1e-12)

  # Gradient of the 2-D one-group path against the grouped (G, rows, C) formula written out.
  def fast(x):
    return jnp.sum(jnp.sin(BatchNorm(5, param_dtype=jnp.float64)(x, train=True, groups=groups)))

  def ref(x):
    xg = x.reshape(groups, -1, 5)
    m = xg.mean(1, keepdims=True)
    v = jnp.square(xg - m).mean(1, keepdims=True)
    return jnp.sum(jnp.sin((xg - m) * jax.lax.rsqrt(v + 1e-5)))

  _close(jax.grad(fast)(x), jax.grad(ref)(x), rtol=1e-12)


@pytest.mark.parametrize('groups', [1, 2])
@pytest.mark.parametrize('train', [True, False])
def test_batch_norm_channels_first_matches_channels_last(groups, train):
  """``channel_axis=0`` on (C, B, T, V) is the same BatchNorm as the last axis of (B, T, V, C): output, gradient
  (input, scale, bias) and running statistics; the groups split the sample axis B in both."""
  def make():
    bn = BatchNorm(5, param_dtype=jnp.float64)
    bn.scale[...] = 1 + 0.1 * _rand(6, (5,))
    bn.bias[...] = 0.1 * _rand(7, (5,))
    bn.mean[...], bn.var[...] = 0.2 * _rand(30, (5,)), 1 + 0.3 * jnp.abs(_rand(31, (5,)))
    return bn
  x = _rand(8, (4, 3, 2, 5)) * 3 + 1                           # (B, T, V, C)
  ct = _rand(9, x.shape)
  first, last = make(), make()

  def loss(bn, x, channel_axis):
    y = bn(_to(x, channel_axis), train=train, groups=groups, channel_axis=channel_axis)
    return jnp.sum(_back(y, channel_axis) * ct)

  grads = [nnx.grad(loss, argnums=(0, 1))(bn, x, axis) for bn, axis in ((first, 0), (last, -1))]
  _close(grads[0], grads[1], rtol=1e-13)
  _close(nnx.state(first, nnx.BatchStat), nnx.state(last, nnx.BatchStat), rtol=1e-15)
  _close(loss(first, x, 0), loss(last, x, -1), rtol=1e-13)
  with pytest.raises(ValueError, match='channel_axis must be 0 or -1'):
    first(x, train=train, channel_axis=1)


def _conv_reference(m: TemporalConv, x):
  """The ``(K, 1)`` convolution as ``lax.conv_general_dilated`` on channels-last ``(B, T, V, C)``, symmetric
  zero padding ``dilation·(K − 1) // 2`` like PyTorch's."""
  kt = m.kernel.shape[0]
  pad = m.dilation * (kt - 1) // 2
  y = jax.lax.conv_general_dilated(x, m.kernel[...][:, None], (m.stride, 1), [(pad, pad), (0, 0)],
                                   rhs_dilation=(m.dilation, 1), dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                   precision=jax.lax.Precision.HIGHEST)
  return y + m.bias[...]


@LAYOUTS
@pytest.mark.parametrize('kernel_size, stride, dilation, t', [
    (3, 1, 1, 8), (3, 2, 1, 9), (3, 1, 4, 7), (3, 2, 3, 8), (9, 1, 1, 12), (9, 2, 1, 11), (4, 1, 1, 8),
    (4, 2, 3, 9), (3, 1, 4, 2), (1, 1, 1, 5), (1, 2, 1, 5)])
def test_temporal_conv_matches_conv_general_dilated(kernel_size, stride, dilation, t, channel_axis):
  m = TemporalConv(3, 5, kernel_size, stride=stride, dilation=dilation, rngs=nnx.Rngs(0), **F64)
  x = _rand(20, (2, t, 4, 3))
  t_out = _conv_reference(m, x).shape[1]
  ct = _rand(21, (2, t_out, 4, 5))
  fast = lambda m, x: _back(m(_to(x, channel_axis), channel_axis=channel_axis), channel_axis)
  _fast_matches_reference(m, x, ct, fast, _conv_reference, seed=22)


def _mstcn_reference(m: MSTCN, x, train: bool, groups: int):
  """``mstcn`` branch by branch (channels last): each branch's own 1×1 conv and BatchNorm, then concatenation."""
  outs = []
  for branch in m.branches:
    y = jax.nn.relu(branch.bn(branch.conv(x), train=train, groups=groups))
    outs.append(max_pool_time(y, stride=branch.stride) if branch.tconv is None else branch.tconv(y))
  outs.append(m.branch_1x1(x))
  y = jax.nn.relu(m.transform_bn(jnp.concatenate(outs, axis=-1), train=train, groups=groups))
  return m.bn(m.transform_conv(y), train=train, groups=groups)


@LAYOUTS
@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('train, groups', [(False, 1), (True, 1), (True, 3)])
def test_mstcn_fused_branch_convs_match_branch_by_branch(stride, train, groups, channel_axis):
  m = MSTCN(8, 14, stride=stride, rngs=nnx.Rngs(0), **F64)      # branch widths 4, 2, 2, 2, 2, 2
  x = _rand(10, (3, 8, 5, 8))
  ct = _rand(11, (3, 8 // stride, 5, 14))
  fast = lambda m, x: _back(m(_to(x, channel_axis), train=train, groups=groups, channel_axis=channel_axis),
                            channel_axis)
  st_fast, rest = _fast_matches_reference(m, x, ct, fast, lambda m, x: _mstcn_reference(m, x, train, groups),
                                          seed=9,
                                          zero_bias_of=_MSTCN_CONVS if train else ())
  if train:   # each branch's own running statistics moved (the fused BatchNorm updates every one of them)
    for i in range(5):
      before = np.asarray(rest['branches'][i]['bn']['mean'][...])
      assert not np.allclose(np.asarray(st_fast['branches'][i]['bn']['mean'][...]), before), i


@LAYOUTS
def test_split_channels_pieces_and_gradient(channel_axis):
  x = _to(_rand(12, (2, 3, 9)), channel_axis)
  a, b, c = split_channels(x, (2, 3, 4), channel_axis)
  np.testing.assert_array_equal(np.concatenate([a, b, c], channel_axis), x)
  assert [_back(p, channel_axis).shape for p in (a, b, c)] == [(2, 3, 2), (2, 3, 3), (2, 3, 4)]
  ws = [_rand(13 + i, p.shape) for i, p in enumerate((a, b, c))]
  f = lambda x: sum(jnp.sum(jnp.sin(p) * w) for p, w in zip(split_channels(x, (2, 3, 4), channel_axis), ws))
  piece = lambda x, lo, hi: jax.lax.slice_in_dim(x, lo, hi, axis=channel_axis)
  g = lambda x: sum(jnp.sum(jnp.sin(piece(x, lo, hi)) * w) for (lo, hi), w in zip(((0, 2), (2, 5), (5, 9)), ws))
  _close(jax.grad(f)(x), jax.grad(g)(x), rtol=1e-14)
  with pytest.raises(ValueError, match='do not add up to the 9 channels'):
    split_channels(x, (2, 3), channel_axis)


@pytest.mark.parametrize('shape, axis, param_shape', [
    ((7, 5), -2, (5,)), ((2, 7, 5), -2, (5,)),                # ([G,] rows, C)
    ((5, 7), -1, (5, 1)), ((5, 2, 7), -1, (5, 1, 1))])        # (C, [G,] rows)
def test_batch_norm_closed_form_gradient_matches_autodiff(shape, axis, param_shape):
  """The hand-written backward of the training normalisation, cotangents on y, mean and variance alike."""
  from stgcn_jax.layers import _normalize_batch, _normalize_batch_fwd
  x = _rand(20, shape) * 2 + 0.5
  scale, bias = 1 + 0.1 * _rand(21, param_shape), 0.1 * _rand(22, param_shape)
  stat_shape = shape[:axis] + (1,) + (shape[axis + 1:] if axis != -1 else ())
  cts = (_rand(23, shape), _rand(24, stat_shape), _rand(25, stat_shape))
  loss = lambda fn: lambda *args: sum(jnp.sum(o * c) for o, c in zip(fn(*args, axis), cts, strict=True))
  autodiff = lambda *args: _normalize_batch_fwd(*args)[0]
  _close(_normalize_batch(x, scale, bias, axis), autodiff(x, scale, bias, axis), rtol=1e-15)
  _close(jax.grad(loss(_normalize_batch), argnums=(0, 1, 2))(x, scale, bias),
         jax.grad(loss(autodiff), argnums=(0, 1, 2))(x, scale, bias), rtol=1e-12)
