"""STGCN++ (and ST-GCN) recognizer in Flax NNX.

Mirrors mmaction2's ``RecognizerGCN(backbone=STGCN, cls_head=GCNHead)`` (pyskl's ``RecognizerGCN`` is the same
network; only its head is named ``fc_cls``). PYSKL, Duan et al., arXiv 2205.09443.

Shape letters: N samples, S clips per sample, M persons, T frames, V joints, C channels, K adjacency subsets.
Inputs are ``(N, M, T, V, C)`` for one clip, ``(N, S, M, T, V, C)`` for the test protocol; persons (and clips)
fold into the batch inside the backbone: ``B = N·M``. The backbone's blocks train on channels-first
``(C, B, T, V)`` activations and evaluate on channels-last ``(B, T, V, C)`` ones, whichever is faster
(``stgcn_jax.layers``); the arithmetic is the same.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from stgcn_jax import graph as graph_lib
from stgcn_jax import layers
from stgcn_jax.layers import MSTCN, BatchNorm, Dtype, UnitGCN, UnitTCN, dropout

Array = jax.Array

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16, 'float64': jnp.float64}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of the recognizer; the defaults are STGCN++ as in the mmaction2/pyskl model zoo.

  ``inflate_stages`` / ``down_stages`` are 1-based stage numbers, as in the references. ``layout`` is a
  built-in layout name or a mapping ``{num_node, inward, center}`` (see :mod:`stgcn_jax.graph`).
  ``num_person`` is M, the persons per clip the data pipeline formats (2 in every published config); a
  per-person data BatchNorm (``data_bn_type='MVC'``) accepts only inputs with that M.
  """

  num_classes: int = 60
  layout: str | graph_lib.Layout = 'coco'
  graph_mode: str = 'spatial'
  in_channels: int = 3
  base_channels: int = 64
  ch_ratio: float = 2.0
  num_stages: int = 10
  inflate_stages: tuple[int, ...] = (5, 8)
  down_stages: tuple[int, ...] = (5, 8)
  num_person: int = 2
  data_bn_type: str = 'VC'                  # 'VC', 'MVC' or 'none'
  gcn_adaptive: str | None = 'init'         # 'init', 'importance', 'offset' or None
  gcn_with_res: bool = True
  gcn_conv_pos: str = 'pre'                 # 'pre' or 'post'
  tcn_type: str = 'mstcn'                   # 'mstcn' or 'unit_tcn'
  tcn_dropout: float = 0.0
  head_dropout: float = 0.0

  def __post_init__(self):
    for name in ('num_classes', 'in_channels', 'base_channels', 'num_stages', 'num_person'):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f'ModelConfig.{name} must be a positive integer, got {value!r}')
    if self.data_bn_type not in ('VC', 'MVC', 'none'):
      raise ValueError(f"ModelConfig.data_bn_type must be 'VC', 'MVC' or 'none', got {self.data_bn_type!r}")
    if self.tcn_type not in ('mstcn', 'unit_tcn'):
      raise ValueError(f"ModelConfig.tcn_type must be 'mstcn' or 'unit_tcn', got {self.tcn_type!r}")
    if self.graph_mode not in graph_lib.MODES:
      raise ValueError(f'ModelConfig.graph_mode must be one of {graph_lib.MODES}, got {self.graph_mode!r}')
    for name in ('inflate_stages', 'down_stages'):
      stages = tuple(getattr(self, name))
      object.__setattr__(self, name, stages)
      bad = [s for s in stages if not 2 <= s <= self.num_stages]
      if bad:
        raise ValueError(f'ModelConfig.{name} {stages}: stages {bad} are outside 2..{self.num_stages} '
                         '(1-based; stage 1 is the input block)')
    if not isinstance(self.layout, str):  # a user-defined layout: keep it as a hashable, validated Layout
      object.__setattr__(self, 'layout', graph_lib.get_layout(self.layout))
    graph_lib.get_layout(self.layout)  # validates a layout name early

  @property
  def num_node(self) -> int:
    return graph_lib.get_layout(self.layout).num_node

  def stage_specs(self) -> list[tuple[int, int, int, bool]]:
    """``(c_in, c_out, stride, residual)`` per block, exactly as the references derive them."""
    specs = []
    c = self.base_channels
    if self.in_channels != self.base_channels:
      specs.append((self.in_channels, c, 1, False))
    inflate = 0
    for stage in range(2, self.num_stages + 1):
      inflate += stage in self.inflate_stages
      c_out = int(self.base_channels * self.ch_ratio ** inflate + 1e-4)
      specs.append((c, c_out, 1 + (stage in self.down_stages), True))
      c = c_out
    return specs

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d['inflate_stages'], d['down_stages'] = list(self.inflate_stages), list(self.down_stages)
    return d

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=1, sort_keys=True)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'ModelConfig':
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
      raise ValueError(f'unknown model config fields {unknown}; known fields are {sorted(fields)}')
    return cls(**d)


class STGCNBlock(nnx.Module):
  """``relu(tcn(gcn(x)) + residual(x))``; the residual is absent, the identity, or a strided 1×1 conv + BN."""

  def __init__(self, c_in: int, c_out: int, adjacency, *, stride: int, residual: bool, cfg: ModelConfig,
               dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gcn = UnitGCN(c_in, c_out, adjacency, adaptive=cfg.gcn_adaptive, conv_pos=cfg.gcn_conv_pos,
                       with_res=cfg.gcn_with_res, **kw)
    # The references drop tcn_dropout in the first block only.
    tcn_dropout = cfg.tcn_dropout if residual else 0.0
    if cfg.tcn_type == 'mstcn':
      self.tcn = MSTCN(c_out, c_out, stride=stride, dropout=tcn_dropout, **kw)
    else:
      self.tcn = UnitTCN(c_out, c_out, 9, stride=stride, dropout=tcn_dropout, **kw)
    if residual and (c_in != c_out or stride != 1):
      self.residual = UnitTCN(c_in, c_out, 1, stride=stride, **kw)
    else:
      self.residual = None
    self.residual_mode = 'none' if not residual else ('conv' if self.residual is not None else 'identity')

  def __call__(self, x: Array, *, train: bool, groups: int, rng: Array | None, channel_axis: int = -1) -> Array:
    kw = dict(train=train, groups=groups, channel_axis=channel_axis)
    y = self.tcn(self.gcn(x, **kw), rng=rng, **kw)
    if self.residual_mode == 'conv':
      y = y + self.residual(x, **kw)
    elif self.residual_mode == 'identity':
      y = y + x.astype(y.dtype)
    return jax.nn.relu(y)


class STGCN(nnx.Module):
  """The ST-GCN / STGCN++ backbone: data BN, then the blocks. ``(N, M, T, V, C) -> (N, M, T', V, C')``."""

  def __init__(self, cfg: ModelConfig, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               rngs: nnx.Rngs):
    adjacency = graph_lib.adjacency(cfg.layout, cfg.graph_mode)
    v = adjacency.shape[-1]
    self.data_bn_type = cfg.data_bn_type
    if cfg.data_bn_type == 'VC':
      self.data_bn = BatchNorm(v * cfg.in_channels, param_dtype=param_dtype)
    elif cfg.data_bn_type == 'MVC':
      self.data_bn = BatchNorm(cfg.num_person * v * cfg.in_channels, param_dtype=param_dtype)
    else:
      self.data_bn = None
    self.gcn = nnx.List([
        STGCNBlock(c_in, c_out, adjacency, stride=stride, residual=residual, cfg=cfg, dtype=dtype,
                   param_dtype=param_dtype, rngs=rngs)
        for c_in, c_out, stride, residual in cfg.stage_specs()])
    self.dtype = dtype

  def __call__(self, x: Array, *, train: bool = False, groups: int = 1, rng: Array | None = None) -> Array:
    n, m, t, v, c = x.shape
    if self.data_bn_type == 'MVC':
      y = x.transpose(0, 2, 1, 3, 4).reshape(n, t, m * v * c)  # channel index m·V·C + v·C + c
      y = self.data_bn(y, train=train, groups=groups)
      x = y.reshape(n, t, m, v, c).transpose(0, 2, 1, 3, 4)
    elif self.data_bn_type == 'VC':
      y = self.data_bn(x.reshape(n * m, t, v * c), train=train, groups=groups)   # channel index v·C + c
      x = y.reshape(n, m, t, v, c)
    x = x.reshape(n * m, t, v, c).astype(self.dtype)          # (B, T, V, C)
    channel_axis = 0 if train else -1                          # train channels first: faster weight gradients
    if channel_axis == 0:
      x = x.transpose(3, 0, 1, 2)                              # (C, B, T, V)
    keys = [None] * len(self.gcn) if rng is None else list(jax.random.split(rng, len(self.gcn)))
    for block, key in zip(self.gcn, keys):
      x = block(x, train=train, groups=groups, rng=key, channel_axis=channel_axis)
    if channel_axis == 0:
      x = x.transpose(1, 2, 3, 0)
    return x.reshape((n, m) + x.shape[1:])


class GCNHead(nnx.Module):
  """Global average over (T, V), mean over persons, dropout, ``Linear(C, num_classes)`` (init N(0, 0.01))."""

  def __init__(self, in_channels: int, num_classes: int, *, dropout: float = 0.0, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    self.fc = nnx.Linear(in_channels, num_classes, kernel_init=nnx.initializers.normal(0.01),
                         bias_init=nnx.initializers.zeros, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dropout = dropout

  def __call__(self, feat: Array, *, train: bool = False, rng: Array | None = None) -> Array:
    pooled = feat.astype(jnp.promote_types(feat.dtype, jnp.float32)).mean(axis=(2, 3)).mean(axis=1)  # (N, C)
    pooled = dropout(pooled, self.dropout, train=train, rng=rng)
    return self.fc(pooled.astype(self.fc.dtype)).astype(pooled.dtype)


class Recognizer(nnx.Module):
  """Backbone + head. ``__call__`` maps one clip per sample ``(N, M, T, V, C)`` to logits ``(N, num_classes)``.

  ``train=True`` uses batch statistics in every BatchNorm and updates the running ones; ``bn_groups`` splits
  the batch into that many equal groups of samples for those statistics (un-synchronised BN per device).
  """

  def __init__(self, cfg: ModelConfig, *, dtype: Dtype | str = jnp.float32, param_dtype: Dtype | str = jnp.float32,
               rngs: nnx.Rngs):
    dtype, param_dtype = _DTYPES.get(dtype, dtype), _DTYPES.get(param_dtype, param_dtype)
    self.config = cfg
    self.backbone = STGCN(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    c_out = cfg.stage_specs()[-1][1]
    self.cls_head = GCNHead(c_out, cfg.num_classes, dropout=cfg.head_dropout, dtype=dtype,
                            param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: Array, *, train: bool = False, bn_groups: int = 1, rng: Array | None = None,
               micro_batch: int | str | None = None) -> Array:
    """Logits ``(N, num_classes)``.

    ``micro_batch`` (eval only): run the samples through the network that many at a time, one micro-batch
    after another within the same computation, with the same result. ``'auto'`` picks
    :func:`auto_micro_batch`. On the CPU, micro-batches whose activations fit in the cache run about 20%
    faster than the whole batch at once; on accelerators the whole batch is faster. The first micro-batch runs
    before the loop and derives the layers' re-ordered kernels once for all (:func:`layers.derived_weights`).
    """
    if x.ndim != 5:
      raise ValueError(f'expected keypoints (N, M, T, V, C), got shape {x.shape}')
    self._check_input(x.shape)
    if x.shape[0] % bn_groups:
      raise ValueError(f'batch {x.shape[0]} is not divisible into {bn_groups} BatchNorm groups')
    if micro_batch is not None:
      if train:
        raise ValueError('micro_batch applies to eval mode only: training BatchNorm uses the whole batch')
      n = x.shape[0]
      if micro_batch == 'auto':
        micro_batch = auto_micro_batch(x.shape)
      chunk = n if micro_batch is None else _divisor_at_most(n, micro_batch)
      if chunk < n:
        # The first micro-batch, outside the loop, derives every layer's weights; the loop's body reuses them.
        with layers.derived_weights() as derived:
          first = self(x[:chunk])
          derived.freeze()
          rest = jax.lax.map(self, x[chunk:].reshape((n // chunk - 1, chunk) + x.shape[1:]))
        return jnp.concatenate([first, rest.reshape(n - chunk, -1)])
    keys = (None, None) if rng is None else tuple(jax.random.split(rng))
    feat = self.backbone(x, train=train, groups=bn_groups, rng=keys[0])
    return self.cls_head(feat, train=train, rng=keys[1])

  def extract_feat(self, x: Array) -> Array:
    """Backbone features in eval mode, ``(N, M, T', V, C')``."""
    return self.backbone(x, train=False)

  def predict_clips(self, x: Array, *, micro_batch: int | str | None = None) -> tuple[Array, Array]:
    """The test protocol on ``(N, S, M, T, V, C)``: per-clip logits ``(N, S, K)`` and probabilities averaged
    over clips after a softmax per clip (mmaction2 ``average_clips='prob'``), ``(N, K)``. ``micro_batch``
    counts clips (see :meth:`__call__`)."""
    if x.ndim != 6:
      raise ValueError(f'expected keypoints (N, num_clips, M, T, V, C), got shape {x.shape}')
    n, s = x.shape[:2]
    logits = self(x.reshape((n * s,) + x.shape[2:]), micro_batch=micro_batch).reshape(n, s, -1)
    return logits, jax.nn.softmax(logits, axis=-1).mean(axis=1)

  def _check_input(self, shape: tuple[int, ...]):
    m, _, v, c = shape[-4:]
    if self.config.data_bn_type == 'MVC' and m != self.config.num_person:
      raise ValueError(f'this model normalises its input per person (data_bn_type MVC) and expects '
                       f'M={self.config.num_person} persons, got M={m} (input shape {tuple(shape)}); give clips of '
                       f'{self.config.num_person} persons, padded with zeros')
    if (v, c) != (self.config.num_node, self.config.in_channels):
      raise ValueError(f'this model expects V={self.config.num_node} joints (layout {_layout_name(self.config)}) '
                       f'and C={self.config.in_channels} channels, got V={v}, C={c}; check the skeleton layout '
                       'and the modality of the data')


# Rows (person × frame × joint) of the activations per micro-batch that keep a CPU's working set in its cache:
# 8192 is 2 clips of 2 persons × 100 frames × 17 joints (measured best for 17 and 25 joints on a 32 MiB L3).
MICRO_BATCH_ROWS = 8192


def auto_micro_batch(shape: tuple[int, ...], platform: str | None = None) -> int | None:
  """Samples per eval micro-batch for inputs of ``shape`` ``(N, M, T, V, C)`` on ``platform`` (default: JAX's
  default backend): ``None`` (the whole batch) on accelerators; on the CPU, about :data:`MICRO_BATCH_ROWS`
  rows of ``M·T·V`` per sample, at least one sample."""
  if (platform or jax.default_backend()) != 'cpu':
    return None
  m, t, v = shape[-4:-1]
  return max(1, MICRO_BATCH_ROWS // (m * t * v))


def _divisor_at_most(n: int, limit: int) -> int:
  """The largest divisor of ``n`` that is at most ``limit`` (a positive integer, else ``ValueError``)."""
  if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
    raise ValueError(f"micro_batch must be a positive integer, 'auto' or None, got {limit!r}")
  return next((d for d in range(min(limit, n), 0, -1) if n % d == 0), n)


def _layout_name(cfg: ModelConfig) -> str:
  return graph_lib.get_layout(cfg.layout).name


def build_model(cfg: ModelConfig, *, seed: int = 0, dtype: Dtype | str = 'float32',
                param_dtype: Dtype | str = 'float32') -> Recognizer:
  """A freshly initialised recognizer (mmaction2's init scheme)."""
  return Recognizer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed))


def backbone_macs(cfg: ModelConfig, num_frames: int = 100, num_person: int | None = None) -> int:
  """Multiply-accumulates of the backbone's convolutions and graph aggregations for one clip (fvcore's
  convention for the published FLOPs: BatchNorm, ReLU, pooling and additions are not counted)."""
  m = cfg.num_person if num_person is None else num_person
  v, k, t = cfg.num_node, 3, num_frames
  total = 0
  for c_in, c_out, stride, residual in cfg.stage_specs():
    t_out = (t - 1) // stride + 1
    if cfg.gcn_conv_pos == 'pre':
      total += t * v * c_in * k * c_out + t * k * v * v * c_out
    else:
      total += t * k * v * v * c_in + t * v * k * c_in * c_out
    if cfg.gcn_with_res and c_in != c_out:
      total += t * v * c_in * c_out
    if cfg.tcn_type == 'mstcn':
      mid = c_out // 6
      widths = [c_out - 5 * mid] + [mid] * 5
      total += t * v * c_out * sum(widths[:5]) + t_out * v * c_out * widths[5]   # 1x1 convs of the branches
      total += sum(t_out * v * 3 * w * w for w in widths[:4])                   # dilated temporal convs
      total += t_out * v * c_out * c_out                                         # transform 1x1 conv
    else:
      total += t_out * v * 9 * c_out * c_out
    if residual and (c_in != c_out or stride != 1):
      total += t_out * v * c_in * c_out
    t = t_out
  return m * total


def count_params(model: nnx.Module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
