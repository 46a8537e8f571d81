"""Building blocks of ST-GCN / STGCN++ in Flax NNX, channels last.

Mirrors ``mmaction.models.backbones.stgcn`` and ``mmaction.models.utils.gcn_utils`` (identical in pyskl):
``unit_gcn``, ``unit_tcn``, ``mstcn`` and the PyTorch ``BatchNorm`` training semantics they rely on.

Shape letters: B = N·M (samples × persons folded), T frames, V joints (W: joints after aggregation),
C channels, K adjacency subsets. Activations are ``(B, T, V, C)``.

Submodule and parameter names follow the PyTorch state-dict keys where the key is a name; where PyTorch uses a
``Sequential`` index the attribute gets a descriptive name and ``stgcn_jax.convert`` holds the table.
Kernels are stored channels last: a 1×1 conv is ``(C_in, C_out)``, a temporal conv ``(K_t, C_in, C_out)``.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array
Dtype = Any

BN_EPS = 1e-5
BN_MOMENTUM = 0.1  # PyTorch convention: new = (1 - m) · old + m · batch. (Flax's momentum 0.9.)


class Buffer(nnx.Variable):
  """A non-trainable tensor that is part of the model state (a PyTorch ``register_buffer``)."""


# --------------------------------------------------------------------------------------------- initialisers
def _torch_default_uniform(fan_in: int):
  """PyTorch's default Conv/Linear init (kaiming_uniform with a=√5): U(±1/√fan_in), for weight and bias."""
  bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
  def init(key, shape, dtype):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def _kaiming_normal_fan_out(fan_out: int):
  """mmengine ``Kaiming(mode='fan_out')`` as used by ``unit_tcn``: N(0, 2/fan_out)."""
  std = math.sqrt(2.0 / fan_out)
  def init(key, shape, dtype):
    return std * jax.random.normal(key, shape, dtype)
  return init


# --------------------------------------------------------------------------------------------------- layers
class BatchNorm(nnx.Module):
  """BatchNorm over the last axis with PyTorch semantics.

  Training normalises with the biased batch variance and updates ``var`` with the unbiased one; momentum 0.1
  in PyTorch's convention. ``groups`` splits the leading axis into that many equal, contiguous groups, each
  normalised with its own statistics, as un-synchronised BatchNorm does per GPU; the running statistics move
  towards the mean of the group statistics. Statistics are computed in at least float32.
  """

  def __init__(self, num_features: int, *, param_dtype: Dtype = jnp.float32):
    self.num_features = num_features
    self.scale = nnx.Param(jnp.ones((num_features,), param_dtype))
    self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype))
    self.mean = nnx.BatchStat(jnp.zeros((num_features,), param_dtype))
    self.var = nnx.BatchStat(jnp.ones((num_features,), param_dtype))
    self.num_batches_tracked = nnx.BatchStat(jnp.zeros((), jnp.int32))  # PyTorch's counter, kept for export

  def __call__(self, x: Array, *, train: bool, groups: int = 1) -> Array:
    y, stats = batch_norm(x, self.scale[...], self.bias[...], self.mean[...], self.var[...], train=train,
                          groups=groups)
    if train:
      self.update(*stats)
    return y

  def update(self, batch_mean: Array, batch_var: Array) -> None:
    """Moves the running statistics towards a batch's mean and unbiased variance (momentum 0.1)."""
    m = BN_MOMENTUM
    self.mean[...] = ((1 - m) * self.mean[...] + m * batch_mean).astype(self.mean[...].dtype)
    self.var[...] = ((1 - m) * self.var[...] + m * batch_var).astype(self.var[...].dtype)
    self.num_batches_tracked[...] = self.num_batches_tracked[...] + 1


def batch_norm(x: Array, scale: Array, bias: Array, mean: Array, var: Array, *, train: bool, groups: int = 1
               ) -> tuple[Array, tuple[Array, Array] | None]:
  """PyTorch BatchNorm over the last axis of ``x`` as a function: ``(y, stats)``.

  Eval (``train=False``) uses the running ``mean``/``var``; ``stats`` is ``None``. Training normalises each of
  ``groups`` equal, contiguous slices of the leading axis with its biased batch variance and returns
  ``stats = (mean, unbiased variance)`` averaged over the groups, for :meth:`BatchNorm.update`. Statistics
  are computed in at least float32; ``y`` has ``x``'s dtype.
  """
  out_dtype = x.dtype
  stat_dtype = jnp.promote_types(x.dtype, jnp.float32)
  x = x.astype(stat_dtype)
  scale, bias = scale.astype(stat_dtype), bias.astype(stat_dtype)
  if not train:
    inv = jax.lax.rsqrt(var.astype(stat_dtype) + BN_EPS) * scale
    return (x * inv + (bias - mean.astype(stat_dtype) * inv)).astype(out_dtype), None
  if x.shape[0] % groups:
    raise ValueError(f'BatchNorm: leading axis {x.shape[0]} is not divisible into {groups} statistics groups')
  # One group: reduce a 2-D (rows, C) view. XLA's CPU gradient of a reduction over the middle axis of a
  # (1, rows, C) array is several times slower than over axis 0 of (rows, C), for the same result.
  xg = x.reshape(-1, x.shape[-1]) if groups == 1 else x.reshape(groups, -1, x.shape[-1])  # ([G,] rows, C)
  n = xg.shape[-2]
  y, batch_mean, batch_var = _normalize_batch(xg, scale, bias)      # mean, biased variance: ([G,] 1, C)
  unbiased = batch_var * (n / max(n - 1, 1))
  group_axes = tuple(range(batch_mean.ndim - 1))
  stats = (batch_mean.mean(axis=group_axes), unbiased.mean(axis=group_axes))
  return y.reshape(x.shape).astype(out_dtype), stats


@jax.custom_vjp
def _normalize_batch(x: Array, scale: Array, bias: Array) -> tuple[Array, Array, Array]:
  """``((x - mean) / sqrt(var + eps) * scale + bias, mean, var)`` with the batch mean and biased variance
  over axis -2 of ``x`` (``([G,] rows, C)``; statistics ``([G,] 1, C)``).

  The gradient is the closed form of BatchNorm's backward pass: two reductions and one elementwise pass
  over the activations, where differentiating the forward ops gives several more full-size intermediates.
  """
  return _normalize_batch_fwd(x, scale, bias)[0]


def _normalize_batch_fwd(x, scale, bias):
  mean = x.mean(axis=-2, keepdims=True)
  var = jnp.square(x - mean).mean(axis=-2, keepdims=True)
  rstd = jax.lax.rsqrt(var + BN_EPS)
  y = (x - mean) * rstd * scale + bias
  return (y, mean, var), (x, mean, rstd, scale)


def _normalize_batch_bwd(res, cotangents):
  x, mean, rstd, scale = res
  dy, dmean, dvar = cotangents
  n = x.shape[-2]
  centered = x - mean
  xhat = centered * rstd
  dbias_g = dy.sum(axis=-2, keepdims=True)                          # per group, ([G,] 1, C)
  dscale_g = (dy * xhat).sum(axis=-2, keepdims=True)
  # d/dx of y: rstd·scale·(dy − mean(dy) − x̂·mean(dy·x̂)); of the returned mean: dmean/n; of the
  # returned (biased) variance: 2·dvar·(x − mean)/n.
  dx = (scale * rstd) * (dy - dbias_g / n - xhat * (dscale_g / n)) + dmean / n + (2 / n) * dvar * centered
  reduce_groups = tuple(range(dy.ndim - 1))
  return dx, dscale_g.sum(axis=reduce_groups), dbias_g.sum(axis=reduce_groups)


_normalize_batch.defvjp(_normalize_batch_fwd, _normalize_batch_bwd)


def channel_matmul(x: Array, w: Array) -> Array:
  """``x (..., C_in) @ w (C_in, C_out)`` as one 2-D product over the flattened leading axes.

  The same products as ``jnp.dot(x, w)``, but on XLA's CPU backend the weight gradient of a dot over a 4-D
  ``x`` is compiled with a transposed copy of the output gradient (and its elementwise producer computed a
  second time into that copy); from the 2-D form it is one product contracting the rows of both operands.
  """
  lead = x.shape[:-1]
  return jnp.dot(x.reshape(-1, x.shape[-1]), w).reshape(*lead, w.shape[-1])


class Conv1x1(nnx.Module):
  """A 1×1 convolution (a matmul over channels) with bias, optional temporal stride."""

  def __init__(self, c_in: int, c_out: int, *, stride: int = 1, kaiming: bool = False,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    w_init = _kaiming_normal_fan_out(c_out) if kaiming else _torch_default_uniform(c_in)
    b_init = (lambda k, s, d: jnp.zeros(s, d)) if kaiming else _torch_default_uniform(c_in)
    self.kernel = nnx.Param(w_init(rngs.params(), (c_in, c_out), param_dtype))
    self.bias = nnx.Param(b_init(rngs.params(), (c_out,), param_dtype))
    self.stride = stride
    self.dtype = dtype

  def __call__(self, x: Array) -> Array:
    if self.stride > 1:
      x = x[:, ::self.stride]                                  # (B, T/s, V, C_in)
    return channel_matmul(x.astype(self.dtype), self.kernel[...].astype(self.dtype)) + self.bias[...].astype(self.dtype)


def temporal_taps(x: Array, kernel_size: int, *, stride: int, dilation: int, pad_value: float = 0.0) -> list[Array]:
  """The ``kernel_size`` frame-shifted views of ``x`` (B, T, V, C) a temporal window of that size sees.

  Zero-padded by ``dilation · (kernel_size - 1) / 2`` frames on each side like PyTorch's symmetric padding;
  each view has the output length ``T_out = (T + 2·pad − dilation·(kernel_size − 1) − 1) // stride + 1``.
  Written as slices (not ``conv_general_dilated`` / ``reduce_window``) because their gradients are plain
  pads and adds, which XLA compiles well on every backend.
  """
  pad = (dilation * (kernel_size - 1)) // 2
  t = x.shape[1]
  t_out = (t + 2 * pad - dilation * (kernel_size - 1) - 1) // stride + 1
  xp = jnp.pad(x, ((0, 0), (pad, pad), (0, 0), (0, 0)), constant_values=pad_value)
  span = (t_out - 1) * stride + 1
  return [xp[:, k * dilation:k * dilation + span:stride] for k in range(kernel_size)]


class TemporalConv(nnx.Module):
  """A ``(kernel_size, 1)`` convolution over frames with bias, dilation and stride (a ``unit_tcn`` conv)."""

  def __init__(self, c_in: int, c_out: int, kernel_size: int, *, stride: int = 1, dilation: int = 1,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    self.kernel = nnx.Param(_kaiming_normal_fan_out(c_out * kernel_size)(
        rngs.params(), (kernel_size, c_in, c_out), param_dtype))
    self.bias = nnx.Param(jnp.zeros((c_out,), param_dtype))
    self.kernel_size, self.stride, self.dilation, self.dtype = kernel_size, stride, dilation, dtype

  def __call__(self, x: Array) -> Array:
    if self.kernel_size == 1:
      taps = [x[:, ::self.stride]]
    else:
      taps = temporal_taps(x, self.kernel_size, stride=self.stride, dilation=self.dilation)
    kt, c_in, c_out = self.kernel[...].shape
    xs = jnp.concatenate(taps, axis=-1).astype(self.dtype)     # (B, T_out, V, K_t·C_in), tap-major
    w = self.kernel[...].reshape(kt * c_in, c_out).astype(self.dtype)
    return channel_matmul(xs, w) + self.bias[...].astype(self.dtype)


def max_pool_time(x: Array, *, stride: int) -> Array:
  """``MaxPool2d((3, 1), stride=(stride, 1), padding=(1, 0))``: padding counts as −inf."""
  prev, cur, nxt = temporal_taps(x, 3, stride=stride, dilation=1, pad_value=-jnp.inf)
  # Ties are common (an absent person repeats the same frame), so the gradient rule matters: like PyTorch,
  # route it to the first maximal frame of the window only (jnp.maximum would split it between tied frames).
  m = jnp.maximum(jnp.maximum(prev, cur), nxt)
  first, second = prev == m, cur == m
  return jnp.where(first, prev, jnp.where(second, cur, nxt))


def dropout(x: Array, rate: float, *, train: bool, rng: Array | None) -> Array:
  if rate == 0.0 or not train:
    return x
  if rng is None:
    raise ValueError(f'dropout {rate} in training needs an rng key; pass rng=jax.random.key(...)')
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


# ------------------------------------------------------------------------------------------------ GCN unit
@jax.custom_vjp
def aggregate_joints(x: Array, a: Array) -> Array:
  """``y[b, t, w, k·C + c] = Σ_v a[k, v, w] · x[b, t, v, c]``: ``x`` (B, T, V, C), ``a`` (K, V, W).

  Equal to ``einsum('btvc,kvw->btwkc', x, a)`` flattened K-major; written as one batched matmul with the
  frames as the batch so that neither it nor its gradient transposes the activations. The gradient is written
  out too: differentiating the product gives, for ``x``, a batched matmul contracting the first axis of the
  broadcast graph matrix, which XLA's CPU backend runs with a generic kernel 2-3× slower than the same
  product against the pre-transposed matrix.
  """
  b, t, v, c = x.shape
  k, _, w = a.shape
  return _frame_matmul(_graph_rows(a), x.reshape(b * t, v, c)).reshape(b, t, w, k * c)


def _graph_rows(a: Array) -> Array:
  k, v, w = a.shape
  return a.transpose(2, 0, 1).reshape(w * k, v)               # row w·K + k, column v: a[k, v, w]


def _frame_matmul(lhs: Array, rhs: Array) -> Array:
  """``lhs`` (R, S) for every frame times ``rhs`` (N, S, C): (N, R, C)."""
  lhs = jnp.broadcast_to(lhs[None], (rhs.shape[0],) + lhs.shape)
  return jax.lax.dot_general(lhs, rhs, (((2,), (1,)), ((0,), (0,))))


def _aggregate_joints_fwd(x: Array, a: Array) -> tuple[Array, tuple[Array, Array]]:
  return aggregate_joints(x, a), (x, a)


def _aggregate_joints_bwd(res: tuple[Array, Array], dy: Array) -> tuple[Array, Array]:
  x, a = res
  b, t, v, c = x.shape
  k, _, w = a.shape
  m = _graph_rows(a)                                           # (W·K, V)
  dy = dy.reshape(b * t, w * k, c)
  dx = _frame_matmul(m.T, dy).reshape(x.shape).astype(x.dtype)  # Σ_{w,k} a[k, v, w] · dy[w·K + k]
  # Σ over frames and channels of dy[n, w·K + k, c] · x[n, v, c]: per-frame products summed (XLA fuses the sum).
  dm = jax.lax.dot_general(dy, x.reshape(b * t, v, c), (((2,), (2,)), ((0,), (0,)))).sum(axis=0)
  return dx, dm.reshape(w, k, v).transpose(1, 2, 0).astype(a.dtype)


aggregate_joints.defvjp(_aggregate_joints_fwd, _aggregate_joints_bwd)


class UnitGCN(nnx.Module):
  """Spatial graph convolution ``unit_gcn``: 1×1 conv to K·C_out, aggregate over joints with ``A``, BN, ReLU.

  ``adaptive``: ``'init'`` (A is a learned parameter initialised from the graph, STGCN++), ``'importance'``
  (a fixed A times a learned PA initialised to 1, ST-GCN), ``'offset'`` (A + PA, PA ~ U(±1e-6)) or ``None``
  (fixed A). ``conv_pos='pre'`` convolves before aggregating (output channel ``k·C_out + c``), ``'post'``
  aggregates first (input channel ``k·C_in + c``). ``with_res`` adds ``down(x)``: a 1×1 conv + BN when the
  widths differ, else the identity.
  """

  def __init__(self, c_in: int, c_out: int, adjacency: np.ndarray, *, adaptive: str | None = 'init',
               conv_pos: str = 'pre', with_res: bool = True, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    if adaptive not in (None, 'init', 'importance', 'offset'):
      raise ValueError(f"gcn adaptive must be None, 'init', 'importance' or 'offset', got {adaptive!r}")
    if conv_pos not in ('pre', 'post'):
      raise ValueError(f"gcn conv_pos must be 'pre' or 'post', got {conv_pos!r}")
    a = jnp.asarray(adjacency, param_dtype)
    k = a.shape[0]
    self.adaptive, self.conv_pos, self.with_res = adaptive, conv_pos, with_res
    self.num_subsets, self.c_out, self.dtype = k, c_out, dtype
    self.A = nnx.Param(a) if adaptive == 'init' else Buffer(a)
    if adaptive == 'importance':
      self.PA = nnx.Param(jnp.ones_like(a))
    elif adaptive == 'offset':
      self.PA = nnx.Param(jax.random.uniform(rngs.params(), a.shape, param_dtype, -1e-6, 1e-6))
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if conv_pos == 'pre':
      self.conv = Conv1x1(c_in, k * c_out, **kw)
    else:
      self.conv = Conv1x1(k * c_in, c_out, **kw)
    self.bn = BatchNorm(c_out, param_dtype=param_dtype)
    if with_res and c_in != c_out:
      self.down_conv = Conv1x1(c_in, c_out, **kw)
      self.down_bn = BatchNorm(c_out, param_dtype=param_dtype)
    else:
      self.down_conv = self.down_bn = None

  def adjacency(self) -> Array:
    a = self.A[...]
    if self.adaptive == 'importance':
      return a * self.PA[...]
    if self.adaptive == 'offset':
      return a + self.PA[...]
    return a

  def __call__(self, x: Array, *, train: bool, groups: int = 1) -> Array:
    b, t, v, c_in = x.shape
    k = self.num_subsets
    a = self.adjacency().astype(self.dtype)                    # (K, V, W)
    # Aggregate first, then convolve, for both conv positions: for 'pre',
    #   Σ_k A_kᵀ (x W_k + b_k) = Σ_k (A_kᵀ x) W_k + Σ_k colsum(A_k) b_kᵀ,
    # the same result with the graph product on C_in channels instead of K·C_out. The aggregation is a
    # batched (W, V) × (V, C) product per frame, which XLA's CPU backend runs (and differentiates) without the
    # transposes an einsum contracting the middle joint axis needs.
    xa = aggregate_joints(x.astype(self.dtype), a)            # (B, T, W, K·C_in), K-major like torch's view
    if self.conv_pos == 'pre':
      kernel = self.conv.kernel[...].astype(self.dtype).reshape(c_in, k, self.c_out)
      kernel = kernel.transpose(1, 0, 2).reshape(k * c_in, self.c_out)              # rows k·C_in + c
      bias = jnp.einsum('kvw,kc->wc', a, self.conv.bias[...].astype(self.dtype).reshape(k, self.c_out))
      y = channel_matmul(xa, kernel) + bias                    # bias (W, C_out): per target joint
    else:
      y = self.conv(xa)
    y = self.bn(y, train=train, groups=groups)
    if self.with_res:
      if self.down_conv is not None:
        y = y + self.down_bn(self.down_conv(x), train=train, groups=groups)
      else:
        y = y + x.astype(y.dtype)
    return jax.nn.relu(y)


# ----------------------------------------------------------------------------------------------- TCN units
class UnitTCN(nnx.Module):
  """``unit_tcn``: a ``(kernel_size, 1)`` temporal conv, BN and dropout (also the 1×1 strided residual)."""

  def __init__(self, c_in: int, c_out: int, kernel_size: int = 9, *, stride: int = 1, dropout: float = 0.0,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    self.conv = TemporalConv(c_in, c_out, kernel_size, stride=stride, dtype=dtype, param_dtype=param_dtype,
                             rngs=rngs)
    self.bn = BatchNorm(c_out, param_dtype=param_dtype)
    self.dropout = dropout

  def __call__(self, x: Array, *, train: bool, groups: int = 1, rng: Array | None = None) -> Array:
    return dropout(self.bn(self.conv(x), train=train, groups=groups), self.dropout, train=train, rng=rng)


class MSTCNBranch(nnx.Module):
  """The parameters of one ``mstcn`` branch: 1×1 conv, BN, ReLU, then a dilated temporal conv (no BN) or a
  3-frame max-pool. :class:`MSTCN` runs the branches together.

  PyTorch keys: ``branches.i.0`` = ``conv``, ``.1`` = ``bn``, ``.3.conv`` = ``tconv`` (absent for max-pool).
  """

  def __init__(self, c_in: int, c_mid: int, *, stride: int, dilation: int | None, dtype: Dtype,
               param_dtype: Dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.conv = Conv1x1(c_in, c_mid, **kw)
    self.bn = BatchNorm(c_mid, param_dtype=param_dtype)
    self.tconv = None if dilation is None else TemporalConv(c_mid, c_mid, 3, stride=stride, dilation=dilation, **kw)
    self.stride = stride


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def split_channels(x: Array, sizes: tuple[int, ...]) -> list[Array]:
  """``x`` split along its last axis into consecutive pieces of ``sizes`` (which sum to its width).

  The gradient is the concatenation of the pieces' cotangents. (Differentiating plain slices gives one
  zero-padded full-width array per piece, summed: several times the memory traffic on XLA's CPU backend.)
  """
  offsets = np.cumsum((0,) + tuple(sizes))
  if offsets[-1] != x.shape[-1]:
    raise ValueError(f'split_channels: sizes {sizes} do not add up to the {x.shape[-1]} channels')
  return [x[..., lo:hi] for lo, hi in zip(offsets[:-1], offsets[1:])]


def _split_channels_fwd(x: Array, sizes: tuple[int, ...]) -> tuple[list[Array], None]:
  return split_channels(x, sizes), None


def _split_channels_bwd(sizes: tuple[int, ...], _, cotangents: list[Array]) -> tuple[Array]:
  return (jnp.concatenate(cotangents, axis=-1),)


split_channels.defvjp(_split_channels_fwd, _split_channels_bwd)


MSTCN_DILATIONS = (1, 2, 3, 4)  # branches 0-3; branch 4 is the max-pool, branch 5 a strided 1×1 conv


class MSTCN(nnx.Module):
  """Multi-scale temporal convolution ``mstcn`` (STGCN++), six branches concatenated, then BN-ReLU-1×1-BN.

  Each branch is ``C_out // 6`` wide except branch 0, which takes the remainder so the concatenation is
  exactly ``C_out`` (64 → 14, 10, 10, 10, 10, 10).
  """

  def __init__(self, c_in: int, c_out: int, *, stride: int = 1, dropout: float = 0.0, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    num_branches = len(MSTCN_DILATIONS) + 2
    mid = c_out // num_branches
    widths = [c_out - mid * (num_branches - 1)] + [mid] * (num_branches - 1)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    branches = [MSTCNBranch(c_in, widths[i], stride=stride, dilation=d, **kw)
                for i, d in enumerate(MSTCN_DILATIONS)]
    branches.append(MSTCNBranch(c_in, widths[4], stride=stride, dilation=None, **kw))
    self.branches = nnx.List(branches)
    self.branch_1x1 = Conv1x1(c_in, widths[5], stride=stride, **kw)
    self.transform_bn = BatchNorm(c_out, param_dtype=param_dtype)
    self.transform_conv = Conv1x1(c_out, c_out, **kw)
    self.bn = BatchNorm(c_out, param_dtype=param_dtype)
    self.dropout = dropout

  def __call__(self, x: Array, *, train: bool, groups: int = 1, rng: Array | None = None) -> Array:
    # The branches' 1x1 convolutions (and the 1x1 branch's, when it is not strided) read the same input: one
    # matmul to all their channels replaces six narrow ones (10 to 46 output channels), and their BatchNorms
    # are one per-channel BatchNorm over the concatenation. Same arithmetic per channel as branch by branch.
    dtype = self.transform_conv.dtype
    convs = [branch.conv for branch in self.branches]
    fuse_1x1 = self.branch_1x1.stride == 1
    if fuse_1x1:
      convs.append(self.branch_1x1)
    kernel = jnp.concatenate([c.kernel[...] for c in convs], axis=1).astype(dtype)
    bias = jnp.concatenate([c.bias[...] for c in convs]).astype(dtype)
    h = channel_matmul(x.astype(dtype), kernel) + bias         # (B, T, V, Σ widths)
    bns = [branch.bn for branch in self.branches]
    widths = [bn.num_features for bn in bns]
    cat = lambda name: jnp.concatenate([getattr(bn, name)[...] for bn in bns])
    n_bn = sum(widths)
    h_bn, *h_1x1 = split_channels(h, (n_bn, h.shape[-1] - n_bn)) if fuse_1x1 else (h,)
    y, stats = batch_norm(h_bn, cat('scale'), cat('bias'), cat('mean'), cat('var'), train=train,
                          groups=groups)
    if stats is not None:
      offsets = np.cumsum([0] + widths)
      for bn, lo, hi in zip(bns, offsets[:-1], offsets[1:]):
        bn.update(stats[0][lo:hi], stats[1][lo:hi])
    pieces = split_channels(jax.nn.relu(y), tuple(widths))
    outs = [max_pool_time(yi, stride=branch.stride) if branch.tconv is None else branch.tconv(yi)
            for branch, yi in zip(self.branches, pieces)]
    outs.append(h_1x1[0] if fuse_1x1 else self.branch_1x1(x))
    y = jnp.concatenate(outs, axis=-1)                         # (B, T_out, V, C_out), branch-major
    y = jax.nn.relu(self.transform_bn(y, train=train, groups=groups))
    y = self.bn(self.transform_conv(y), train=train, groups=groups)
    return dropout(y, self.dropout, train=train, rng=rng)
