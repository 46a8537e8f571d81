"""PyTorch state dicts (mmaction2 / pyskl STGCN++ and ST-GCN) <-> stgcn_jax parameters.

Two pieces: :func:`infer_config` reads the architecture from the tensors alone, and :func:`load_state_dict`
copies the tensors into a :class:`stgcn_jax.model.Recognizer`, checking every key and shape. The name mapping
is the table :data:`RENAMES` (module paths) plus :data:`LEAF_NAMES` (parameter names); kernels are transposed
to channels-last.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from stgcn_jax import graph as graph_lib
from stgcn_jax.layers import Conv1x1, TemporalConv
from stgcn_jax.model import ModelConfig, Recognizer

# Our module path (dot-joined) -> PyTorch module path. PyTorch Sequential indices become names here.
RENAMES = (
    (r'\.tcn\.branches\.(\d+)\.conv$', r'.tcn.branches.\1.0'),
    (r'\.tcn\.branches\.(\d+)\.bn$', r'.tcn.branches.\1.1'),
    (r'\.tcn\.branches\.(\d+)\.tconv$', r'.tcn.branches.\1.3.conv'),
    (r'\.tcn\.branch_1x1$', r'.tcn.branches.5'),
    (r'\.tcn\.transform_bn$', r'.tcn.transform.0'),
    (r'\.tcn\.transform_conv$', r'.tcn.transform.2'),
    (r'\.gcn\.down_conv$', r'.gcn.down.0'),
    (r'\.gcn\.down_bn$', r'.gcn.down.1'),
)
# Our parameter name, per module type -> PyTorch name.
LEAF_NAMES = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
              'var': 'running_var', 'num_batches_tracked': 'num_batches_tracked', 'A': 'A', 'PA': 'PA'}
# PyTorch's BN step counter does not affect any output: a state dict without it still loads.
OPTIONAL_LEAVES = ('num_batches_tracked',)


class StateDictError(ValueError):
  """A state dict that does not fit the model: missing / unexpected keys or wrong shapes."""


def normalize_keys(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Strips DDP's ``module.`` prefix and renames pyskl's head ``cls_head.fc_cls`` to mmaction2's ``cls_head.fc``."""
  out = {}
  for key, value in state_dict.items():
    if key.startswith('module.'):
      key = key[len('module.'):]
    key = re.sub(r'^cls_head\.fc_cls\.', 'cls_head.fc.', key)
    out[key] = np.asarray(value)
  return out


def _module_at(model: nnx.Module, path: tuple) -> Any:
  obj = model
  for part in path:
    obj = obj[part] if isinstance(part, int) else getattr(obj, part)
  return obj


def torch_key(path: tuple) -> str:
  """The PyTorch state-dict key of one of our variables, given its path in the model."""
  module = '.'.join(str(p) for p in path[:-1])
  for pattern, repl in RENAMES:
    module = re.sub(pattern, repl, module)
  return f'{module}.{LEAF_NAMES[path[-1]]}'


def to_ours(owner: Any, leaf: str, w: np.ndarray) -> np.ndarray:
  """A PyTorch tensor in our layout: conv ``(O, I, K_t, 1)`` -> ``(I, O)`` or ``(K_t, I, O)``; Linear transposed."""
  if leaf != 'kernel':
    return w
  if isinstance(owner, Conv1x1):
    return w.reshape(w.shape[0], w.shape[1]).T
  if isinstance(owner, TemporalConv):
    return w[..., 0].transpose(2, 1, 0)
  if isinstance(owner, nnx.Linear):
    return w.T
  raise TypeError(f'no kernel layout rule for {type(owner).__name__}')


def to_torch(owner: Any, leaf: str, w: np.ndarray) -> np.ndarray:
  """The inverse of :func:`to_ours`."""
  if leaf != 'kernel':
    return w
  if isinstance(owner, Conv1x1):
    return w.T[:, :, None, None]
  if isinstance(owner, TemporalConv):
    return w.transpose(2, 1, 0)[..., None]
  if isinstance(owner, nnx.Linear):
    return w.T
  raise TypeError(f'no kernel layout rule for {type(owner).__name__}')


def _variables(model: Recognizer):
  """Yields ``(path, owner module, variable)`` for every variable of the model."""
  for path, var in nnx.to_flat_state(nnx.state(model)):
    yield tuple(path), _module_at(model, tuple(path)[:-1]), var


def load_state_dict(model: Recognizer, state_dict: Mapping[str, Any], *, source: str = 'state dict',
                    strict: bool = True, skip_prefixes: tuple[str, ...] = ()) -> None:
  """Copies a PyTorch state dict into ``model`` in place.

  ``strict`` refuses missing and unexpected keys (listed in the error); shapes must always match. Keys under
  ``skip_prefixes`` (e.g. ``'cls_head.'`` when fine-tuning to a new number of classes) are left as initialised.
  """
  sd = normalize_keys(state_dict)
  missing, mismatched, used = [], [], set()
  updates = {}
  for path, owner, var in _variables(model):
    key = torch_key(path)
    if key.startswith(skip_prefixes):
      used.add(key)
      continue
    if key not in sd:
      if path[-1] not in OPTIONAL_LEAVES:
        missing.append(key)
      continue
    used.add(key)
    value = to_ours(owner, path[-1], sd[key])
    if value.shape != var[...].shape:
      expected = to_torch(owner, path[-1], np.zeros(var[...].shape)).shape
      mismatched.append(f'{key}: found {tuple(sd[key].shape)}, expected {tuple(expected)}')
      continue
    updates[path] = value.astype(var[...].dtype)
  unexpected = sorted(k for k in sd if k not in used and not k.startswith(skip_prefixes))
  problems = []
  if mismatched:
    problems.append('shape mismatches:\n  ' + '\n  '.join(mismatched))
  if strict and missing:
    problems.append(f'missing keys ({len(missing)}):\n  ' + '\n  '.join(missing))
  if strict and unexpected:
    problems.append(f'unexpected keys ({len(unexpected)}):\n  ' + '\n  '.join(unexpected))
  if problems:
    raise StateDictError(f'{source} does not fit the model ({model.config.to_dict()}):\n' + '\n'.join(problems)
                         + '\nIf the checkpoint has another architecture, build the model from '
                         'stgcn_jax.convert.infer_config(state_dict).')
  for path, owner, var in _variables(model):
    if path in updates:
      var[...] = updates[path]


def export_state_dict(model: Recognizer) -> dict[str, np.ndarray]:
  """The model's variables as an mmaction2-style PyTorch state dict of numpy arrays."""
  return {torch_key(path): np.asarray(to_torch(owner, path[-1], np.asarray(var[...])))
          for path, owner, var in _variables(model)}


# ------------------------------------------------------------------------------------ architecture inference
_LAYOUT_BY_V = {layout.num_node: name for name, layout in graph_lib.LAYOUTS.items()}


def _block_indices(sd: Mapping[str, np.ndarray]) -> list[int]:
  idx = sorted({int(m.group(1)) for k in sd if (m := re.match(r'backbone\.gcn\.(\d+)\.', k))})
  if not idx or idx != list(range(len(idx))):
    raise StateDictError(f'no ST-GCN blocks backbone.gcn.0.. found (block indices {idx}); this is not an '
                         'mmaction2/pyskl STGCN or STGCN++ checkpoint')
  return idx


def infer_config(state_dict: Mapping[str, Any], *, layout: str | Mapping | None = None,
                 meta_cfg: str | None = None) -> ModelConfig:
  """Reads the architecture of an mmaction2/pyskl ST-GCN or STGCN++ state dict from its tensors alone.

  ``layout`` names the skeleton when V does not identify a built-in one (17 coco, 25 nturgb+d, 18 openpose,
  21 handmp). ``meta_cfg``, the config text stored in mmaction2 checkpoints, is read (never executed) only to
  settle what tensors cannot show: ``down_stages`` where a stage both inflates and downsamples. Without it a
  widening stage is assumed to downsample, as in every published model.
  """
  sd = normalize_keys(state_dict)
  blocks = _block_indices(sd)
  get = lambda key: sd[key] if key in sd else None  # noqa: E731

  a = get('backbone.gcn.0.gcn.A')
  if a is None or a.ndim != 3 or a.shape[1] != a.shape[2]:
    raise StateDictError('backbone.gcn.0.gcn.A (K, V, V) is missing or malformed; cannot read the skeleton size')
  k, v = a.shape[0], a.shape[1]
  if layout is None:
    if v not in _LAYOUT_BY_V:
      raise StateDictError(f'the checkpoint has V={v} joints, which matches no built-in layout '
                           f'({ {n: l.num_node for n, l in graph_lib.LAYOUTS.items()} }); name it with layout=')
    layout = _LAYOUT_BY_V[v]
  layout_obj = graph_lib.get_layout(layout)
  if layout_obj.num_node != v:
    raise StateDictError(f'layout {layout_obj.name!r} has {layout_obj.num_node} joints but the checkpoint has {v}')
  if k != 3:
    raise StateDictError(f'the adjacency has K={k} subsets; only the 3-subset spatial partitions are supported')

  specs = []  # (c_in, c_out, has_residual_conv)
  for i in blocks:
    p = f'backbone.gcn.{i}.'
    bn = get(p + 'gcn.bn.weight')
    conv = get(p + 'gcn.conv.weight')
    if bn is None or conv is None:
      raise StateDictError(f'block {i} has no gcn.conv.weight / gcn.bn.weight; unsupported architecture')
    c_out = bn.shape[0]
    conv_pos = 'pre' if conv.shape[0] == k * c_out else 'post'
    c_in = conv.shape[1] if conv_pos == 'pre' else conv.shape[1] // k
    specs.append((c_in, c_out, (p + 'residual.conv.weight') in sd, conv_pos))

  in_channels, base = specs[0][0], specs[0][1]
  first_is_stage1 = in_channels != base
  num_stages = len(blocks) + (0 if first_is_stage1 else 1)
  first_stage = 1 if first_is_stage1 else 2
  inflate, down = [], []
  meta_down = _meta_list(meta_cfg, 'down_stages')
  for j, (c_in, c_out, res_conv, _) in enumerate(specs):
    stage = first_stage + j
    if stage == 1:
      continue
    if c_out != c_in:
      inflate.append(stage)
      if meta_down is None and res_conv:
        down.append(stage)
    elif res_conv and meta_down is None:
      down.append(stage)   # same width and still a residual conv: only a stride explains it
  if meta_down is not None:
    down = meta_down
  ratio = specs[inflate[0] - first_stage][1] / base if inflate else 2.0

  has_pa = 'backbone.gcn.0.gcn.PA' in sd
  if has_pa:
    # importance multiplies A by PA (initialised to 1), offset adds PA (initialised to ~0).
    adaptive = 'importance' if float(np.mean(np.abs(sd['backbone.gcn.0.gcn.PA']))) > 0.5 else 'offset'
  else:
    adaptive = 'init'    # a fixed A (adaptive=None) stores the same tensors; forward is identical
  if 'backbone.gcn.0.tcn.branches.0.0.weight' in sd:
    tcn_type = 'mstcn'
  elif 'backbone.gcn.0.tcn.conv.weight' in sd:
    tcn_type = 'unit_tcn'
    kt = sd['backbone.gcn.0.tcn.conv.weight'].shape[2]
    if kt != 9:
      raise StateDictError(f'unit_tcn with temporal kernel {kt} is not supported (expected 9)')
  else:
    raise StateDictError('block 0 has neither tcn.branches (mstcn) nor tcn.conv (unit_tcn); unsupported architecture')
  with_res = any(f'backbone.gcn.{i}.gcn.down.0.weight' in sd for i in blocks) or all(
      c_in == c_out for c_in, c_out, *_ in specs)

  data_bn = get('backbone.data_bn.weight')
  if data_bn is None:
    data_bn_type, num_person = 'none', 2
  elif data_bn.shape[0] == v * in_channels:
    data_bn_type, num_person = 'VC', 2
  elif data_bn.shape[0] % (v * in_channels) == 0:
    data_bn_type, num_person = 'MVC', data_bn.shape[0] // (v * in_channels)
  else:
    raise StateDictError(f'backbone.data_bn has {data_bn.shape[0]} channels, not a multiple of V·C = {v}·{in_channels}')
  head = get('cls_head.fc.weight')
  if head is None:
    raise StateDictError('no classification head (cls_head.fc.weight or pyskl cls_head.fc_cls.weight) found')

  graph_mode = _closest_graph_mode(layout_obj, a)
  cfg = ModelConfig(num_classes=int(head.shape[0]), layout=layout, graph_mode=graph_mode,
                    in_channels=int(in_channels), base_channels=int(base), ch_ratio=float(ratio),
                    num_stages=num_stages, inflate_stages=tuple(inflate), down_stages=tuple(down),
                    num_person=num_person, data_bn_type=data_bn_type, gcn_adaptive=adaptive,
                    gcn_with_res=with_res, gcn_conv_pos=specs[0][3], tcn_type=tcn_type)
  derived = [(c_in, c_out) for c_in, c_out, _, _ in cfg.stage_specs()]
  found = [(c_in, c_out) for c_in, c_out, _, _ in specs]
  if derived != found:
    raise StateDictError(f'unsupported architecture: block widths {found} cannot be produced by base_channels='
                         f'{base}, ch_ratio={ratio}, inflate_stages={inflate} ({derived})')
  return cfg


def _meta_list(meta_cfg: str | None, name: str) -> tuple[int, ...] | None:
  if not meta_cfg:
    return None
  m = re.search(name + r'\s*=\s*[\[(]([\d\s,]*)[\])]', meta_cfg)
  return None if m is None else tuple(int(x) for x in m.group(1).replace(',', ' ').split())


def _closest_graph_mode(layout: graph_lib.Layout, a: np.ndarray) -> str:
  dist = {mode: float(np.abs(graph_lib.adjacency(layout, mode) - a).sum()) for mode in graph_lib.MODES}
  return min(dist, key=dist.get)


def model_from_state_dict(state_dict: Mapping[str, Any], *, layout: str | Mapping | None = None,
                          meta_cfg: str | None = None, source: str = 'state dict',
                          dtype: str = 'float32', param_dtype: str = 'float32') -> Recognizer:
  """Builds the recognizer a state dict describes and loads it."""
  cfg = infer_config(state_dict, layout=layout, meta_cfg=meta_cfg)
  model = Recognizer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
  load_state_dict(model, state_dict, source=source)
  return model


__all__ = ['StateDictError', 'normalize_keys', 'torch_key', 'load_state_dict', 'export_state_dict',
           'infer_config', 'model_from_state_dict']
