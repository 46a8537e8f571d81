"""PyTorch state dicts (mmaction2 / pyskl STGCN++ and ST-GCN) <-> stgcn_jax parameters.

Two pieces: :func:`infer_config` reads the architecture from the tensors alone, and :func:`load_state_dict`
copies the tensors into a :class:`stgcn_jax.model.Recognizer`, checking every key and shape. The name mapping
is the table :data:`RENAMES` (module paths) plus :data:`LEAF_NAMES` (parameter names); kernels are transposed
to channels-last.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
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
    current = var.get_value()   # an array, or a ShapeDtypeStruct for a model built under nnx.eval_shape
    if value.shape != current.shape:
      expected = to_torch(owner, path[-1], np.zeros(current.shape)).shape
      mismatched.append(f'{key}: found {tuple(sd[key].shape)}, expected {tuple(expected)}')
      continue
    updates[path] = value.astype(current.dtype)
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
      var.set_value(jnp.asarray(updates[path]))


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
  settle what tensors cannot show: ``down_stages`` where a stage both inflates and downsamples (without it a
  widening stage is assumed to downsample, as in every published model), ``gcn_with_res`` when no block widens
  (an identity residual has no tensors; default True), and ``gcn_adaptive`` when it names importance or offset.
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

  # Stage 1 (the input block) exists when in_channels != base_channels, and is the one block without a residual;
  # when the widths agree the blocks start at stage 2, whose first block may widen with a residual conv.
  first_is_stage1 = specs[0][0] != specs[0][1] and not specs[0][2]
  in_channels = specs[0][0]
  base = specs[0][1] if first_is_stage1 else in_channels
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

  if 'backbone.gcn.0.gcn.PA' in sd:
    adaptive = _importance_or_offset(sd, blocks, meta_cfg)
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
  named_res = _text_value(meta_cfg, r'gcn_with_res\s*=\s*(True|False)')
  if any(f'backbone.gcn.{i}.gcn.down.0.weight' in sd for i in blocks):
    with_res = True
  elif all(c_in == c_out for c_in, c_out, *_ in specs):   # an identity residual leaves no tensor: ask the text
    with_res = named_res != 'False'
  else:
    with_res = False

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


def _importance_or_offset(sd: Mapping[str, np.ndarray], blocks: list[int], meta_cfg: str | None) -> str:
  """Whether a learned ``PA`` multiplies the fixed ``A`` (``'importance'``, ST-GCN's default) or is added to it
  (``'offset'``): the config text when it says, else the tensors.

  Where ``A`` is 0, an importance ``PA`` gets no gradient from the loss (``∂(A·PA)/∂PA = A``): those entries
  start at 1 and move only by weight decay, identically, so they all hold one value however long the model was
  trained (weight decay takes it far below 1). An offset ``PA`` starts at distinct random values of about
  ±1e-6 and is trained everywhere. Otherwise PA's scale decides: about 1 for importance, about 0 for offset.
  """
  named = _text_value(meta_cfg, r"gcn_adaptive\s*=\s*['\"](importance|offset)['\"]")
  if named is not None:
    return named
  off_graph = [np.asarray(sd[f'backbone.gcn.{i}.gcn.PA'])[np.asarray(sd[f'backbone.gcn.{i}.gcn.A']) == 0]
               for i in blocks if f'backbone.gcn.{i}.gcn.PA' in sd and f'backbone.gcn.{i}.gcn.A' in sd]
  if off_graph and all(x.size > 1 and np.unique(x).size == 1 for x in off_graph):
    return 'importance'
  return 'importance' if float(np.mean(np.abs(sd['backbone.gcn.0.gcn.PA']))) > 0.5 else 'offset'


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
  return build_loaded(cfg, state_dict, source=source, dtype=dtype, param_dtype=param_dtype)


def build_loaded(cfg: ModelConfig, state_dict: Mapping[str, Any], *, source: str = 'state dict',
                 dtype: str = 'float32', param_dtype: str = 'float32') -> Recognizer:
  """The recognizer of ``cfg`` holding ``state_dict`` (strict), built without running the random initialisers
  (the model is traced abstractly and every variable is then set from the tensors, which is many times faster).
  Absent optional buffers (BN ``num_batches_tracked``) are zero."""
  model = nnx.eval_shape(lambda: Recognizer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
  load_state_dict(model, state_dict, source=source)
  for path, _, var in _variables(model):
    value = var.get_value()
    if isinstance(value, jax.ShapeDtypeStruct):
      if path[-1] not in OPTIONAL_LEAVES:   # unreachable after a strict load; kept as a guard
        raise StateDictError(f'{source}: {torch_key(path)} was not loaded')
      var.set_value(jnp.zeros(value.shape, value.dtype))
  return model



# ------------------------------------------------------------------------------------ .pth -> checkpoint
FEATS = ('j', 'b', 'jm', 'bm')


class ConvertError(ValueError):
  """A conversion that cannot be done (bad arguments, output exists, check failed); names the file."""


@dataclasses.dataclass
class ConvertResult:
  """What :func:`convert_checkpoint` wrote: the directory, the inferred architecture and the metadata.

  ``check`` (with ``check=True``) holds ``reference`` (what the converted model was compared with),
  ``max_abs_diff`` of the logits on a seeded input, and ``param_max_abs_diff`` of the exported weights.
  """

  out_dir: Path
  config: ModelConfig
  meta: dict[str, Any]
  check: dict[str, Any] | None = None

  def summary(self) -> str:
    c = self.config
    lines = [f'wrote {self.out_dir}',
             f'  architecture: {c.num_stages} stages, in_channels={c.in_channels}, base_channels={c.base_channels}, '
             f'inflate_stages={list(c.inflate_stages)}, down_stages={list(c.down_stages)}, tcn={c.tcn_type}, '
             f'gcn_adaptive={c.gcn_adaptive}, num_classes={c.num_classes}',
             f'  layout: {self.meta["layout"]} ({self.meta["layout_source"]}), '
             f'feat: {self.meta["feat"]} ({self.meta["feat_source"]}), '
             'class names: ' + (f'{self.meta["class_names"][0]!r}, ... ({len(self.meta["class_names"])})'
                                if self.meta['class_names'] else 'none')]
    if self.check is not None:
      lines.append(f'  check against {self.check["reference"]}: max abs logit difference '
                   f'{self.check["max_abs_diff"]:.3g}, max abs parameter difference '
                   f'{self.check["param_max_abs_diff"]:.3g}')
    return '\n'.join(lines)


def _config_text(meta: Mapping[str, Any] | None) -> str | None:
  if not meta:
    return None
  for key in ('cfg', 'config'):   # mmengine stores 'cfg', mmcv 1.x (pyskl) 'config'; both are config text
    if isinstance(meta.get(key), str):
      return meta[key]
  return None


def _text_value(text: str | None, pattern: str) -> str | None:
  m = re.search(pattern, text or '')
  return None if m is None else m.group(1)


def _feat_from_text(text: str | None) -> str | None:
  # mmaction2/pyskl: GenSkeFeat(..., feats=['b']); stgcn_jax configs: feat='b'.
  return _text_value(text, r"feats?\s*=\s*\[?\s*['\"](jm|bm|j|b)['\"]")


def _feat_from_name(path: Path) -> str | None:
  """The modality a file name states as words (``...-bone-motion-u100...``, ``bone_motion.pth``) or as the
  whole stem (pyskl's ``jm.pth``); whole words only, so ``backbone`` is not a bone."""
  stem = path.stem.lower()
  if stem in FEATS:
    return stem
  words = re.split(r'[^a-z0-9]+', stem)
  for i, word in enumerate(words):
    if word in ('joint', 'bone'):
      motion = i + 1 < len(words) and words[i + 1] == 'motion'
      return word[0] + ('m' if motion else '')
  return None


def _json_meta(meta: Mapping[str, Any] | None) -> dict[str, Any]:
  """The JSON-representable scalars of the checkpoint's own meta (versions, config text, seed...)."""
  out = {}
  for key, value in (meta or {}).items():
    if isinstance(value, (str, int, float, bool)) or value is None:
      out[str(key)] = value
  return out


def convert_checkpoint(pth: str | os.PathLike, out_dir: str | os.PathLike, *, layout: str | None = None,
                       config_path: str | os.PathLike | None = None, feat: str | None = None,
                       check: bool = False, check_seed: int = 0) -> ConvertResult:
  """Converts an mmaction2 / pyskl STGCN++ or ST-GCN ``.pth`` into a stgcn_jax checkpoint directory.

  The file is read by :mod:`stgcn_jax.torch_pickle` (no code from it runs; torch is not needed), its keys are
  normalised (DDP ``module.``, pyskl ``fc_cls``), the architecture is inferred from the tensors alone
  (:func:`infer_config`), every tensor is loaded strictly, and the model is written with
  :func:`stgcn_jax.checkpoint.write_model` plus metadata: ``layout`` (given, read from the config text, or
  guessed from V), ``feat`` (given, from the config text, or from the file name; else None), ``class_names``
  (the checkpoint's ``dataset_meta['classes']``, else NTU60/NTU120 for 60/120 classes), ``source`` and the
  checkpoint's own scalar metadata.

  Args:
    layout: the skeleton layout name (needed only when V does not identify a built-in one).
    config_path: a config file (mmaction2/pyskl ``.py`` or a stgcn_jax config), read as text, never executed,
      for ``layout``, ``feats`` and ``down_stages``.
    feat: the modality the model was trained on (``j``, ``b``, ``jm`` or ``bm``).
    check: run the converted model on a seeded input and compare it with the PyTorch model (when torch and
      mmaction2 are importable) or else with the checkpoint re-loaded from disk; the result is in ``.check``.

  ``out_dir`` must not exist; it appears only once everything (including the check) succeeded, and nothing is
  left there on any failure.

  Raises:
    FileNotFoundError; ConvertError; torch_pickle.CheckpointFormatError / UnsafeCheckpointError (unreadable or
    unsafe file); StateDictError (unsupported architecture, missing / unexpected keys, shape mismatches).
  """
  from stgcn_jax import checkpoint as ckpt_lib
  from stgcn_jax import labels as labels_lib
  from stgcn_jax import torch_pickle

  pth, out_dir = Path(pth), Path(out_dir).absolute()
  if out_dir.exists():
    raise ConvertError(f'{out_dir} already exists; choose a new --out directory or remove it first')
  if feat is not None and feat not in FEATS:
    raise ConvertError(f'feat {feat!r} is not one of {FEATS} (joint, bone, joint motion, bone motion)')
  config_text = None
  if config_path is not None:
    if not Path(config_path).is_file():
      raise FileNotFoundError(f'config file {str(config_path)!r} does not exist')
    config_text = Path(config_path).read_text(encoding='utf-8', errors='replace')

  sd, torch_meta = torch_pickle.load_checkpoint(pth)
  sd = normalize_keys(sd)
  text = config_text or _config_text(torch_meta)
  layout_source = 'argument'
  if layout is None:
    named = _text_value(text, r"layout\s*=\s*['\"]([\w+\-]+)['\"]")
    if named in graph_lib.LAYOUTS:
      layout, layout_source = named, 'config file' if config_text else 'checkpoint config'
    else:
      layout_source = 'guessed from V'
  try:
    cfg = infer_config(sd, layout=layout, meta_cfg=text)
  except StateDictError as e:
    raise StateDictError(f'{pth}: unsupported architecture: {e}') from None
  except ValueError as e:   # an unknown layout name
    raise ConvertError(f'{pth}: {e}') from None
  model = build_loaded(cfg, sd, source=str(pth))

  feat_source = 'argument'
  if feat is None:
    feat, feat_source = _feat_from_text(text), 'config file' if config_text else 'checkpoint config'
    if feat is None:
      feat, feat_source = _feat_from_name(pth), 'file name'
    if feat is None:
      feat_source = 'unknown'
  dataset_meta = (torch_meta or {}).get('dataset_meta') or {}
  classes = dataset_meta.get('classes') if isinstance(dataset_meta, Mapping) else None
  if isinstance(classes, (list, tuple)) and len(classes) == cfg.num_classes:
    names = [str(c) for c in classes]            # the checkpoint's own label names
  else:
    names = labels_lib.class_names(cfg.num_classes)
  meta = {'source': str(pth.absolute()), 'source_format': 'pytorch', 'layout': graph_lib.get_layout(cfg.layout).name,
          'layout_source': layout_source, 'feat': feat, 'feat_source': feat_source, 'class_names': names,
          'torch_meta': _json_meta(torch_meta)}

  out_dir.parent.mkdir(parents=True, exist_ok=True)
  staging = Path(tempfile.mkdtemp(prefix=f'.{out_dir.name}.', suffix='.converting', dir=out_dir.parent))
  try:
    written = ckpt_lib.write_model(staging / 'checkpoint', model, meta)
    report = _check(model, written, sd, cfg, seed=check_seed) if check else None
    if out_dir.exists():
      raise ConvertError(f'{out_dir} appeared while converting; nothing was written there')
    os.rename(written, out_dir)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return ConvertResult(out_dir=out_dir, config=cfg, meta={'model_config': cfg.to_dict(), **meta}, check=report)


def _seeded_input(cfg: ModelConfig, seed: int, frames: int = 48) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return rng.normal(0.0, 0.5, (2, cfg.num_person, frames, cfg.num_node, cfg.in_channels)).astype(np.float32)


def _check(model: Recognizer, written: Path, sd: Mapping[str, np.ndarray], cfg: ModelConfig, *,
           seed: int) -> dict[str, Any]:
  """Logits of the converted model vs the PyTorch model (mmaction2) or vs the checkpoint re-loaded from disk."""
  from stgcn_jax import checkpoint as ckpt_lib

  x = _seeded_input(cfg, seed)
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))   # one compilation for both models
  ours = np.asarray(forward(state, x))
  exported = export_state_dict(model)
  # Against the checkpoint's values in the model's dtype: a float64 or bfloat16 file is stored as float32.
  param_diff = max(float(np.abs(exported[k].astype(np.float64) - sd[k].astype(exported[k].dtype)).max(initial=0.0))
                   for k in exported if k in sd)
  reference, why = _torch_reference_logits(cfg, sd, x)
  if reference is not None:
    name, ref = 'the PyTorch model (mmaction2)', reference
    tol = 1e-3
  else:
    reloaded, _ = ckpt_lib.load_model(written)
    name, ref = f'the re-loaded checkpoint only (no PyTorch comparison: {why})', \
        np.asarray(forward(nnx.state(reloaded), x))
    tol = 0.0
  diff = float(np.abs(ours - ref).max())
  if not diff <= tol or param_diff != 0.0:
    raise ConvertError(f'check failed: converted model differs from {name} by {diff:.3g} in the logits '
                       f'(tolerance {tol:g}) and by {param_diff:.3g} in the parameters; nothing was written')
  return {'reference': name, 'max_abs_diff': diff, 'param_max_abs_diff': param_diff, 'seed': seed,
          'input_shape': list(x.shape)}


def _torch_reference_logits(cfg: ModelConfig, sd: Mapping[str, np.ndarray], x: np.ndarray
                            ) -> tuple[np.ndarray | None, str]:
  """``(logits, '')`` of mmaction2's own RecognizerGCN with these weights, or ``(None, why)`` when torch or
  mmaction2 is not importable or the layout is not one mmaction2 knows by name."""
  from stgcn_jax import torch_reference

  try:
    net = torch_reference.mmaction_recognizer(cfg, sd)
  except (ValueError, ImportError) as e:   # a layout mmaction2 does not know; mmaction2 not usable here
    return None, str(e)
  import torch

  net.eval()
  with torch.no_grad():
    return net.cls_head(net.backbone(torch.from_numpy(x))).numpy(), ''


__all__ = ['StateDictError', 'ConvertError', 'ConvertResult', 'normalize_keys', 'torch_key', 'load_state_dict',
           'export_state_dict', 'infer_config', 'model_from_state_dict', 'build_loaded', 'convert_checkpoint']
