"""The genuine mmaction2 recognizer, when torch and mmaction2 are installed (optional; for checks and benchmarks).

``convert_checkpoint(..., check=True)`` compares a converted model with it, ``scripts/benchmark.py`` times it,
and the parity tests compare every architecture with it. Nothing here is needed to train or evaluate.

Install (kept out of ``requirements.txt``): ``pip install torch==2.13.0 mmengine mmcv-lite==2.1.0 scipy einops
importlib_metadata``, then ``pip install --no-deps mmaction2==1.2.0``.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from stgcn_jax import graph as graph_lib
from stgcn_jax.model import ModelConfig

# The 1.2.0 wheel lacks mmaction.models.localizers.drn, which mmaction.models imports (an upstream packaging bug).
_DRN_MODULES = ('mmaction.models.localizers.drn', 'mmaction.models.localizers.drn.drn')
# Layouts mmaction2's Graph knows by name.
MMACTION_LAYOUTS = ('openpose', 'nturgb+d', 'coco')


def import_mmaction() -> tuple[types.ModuleType | None, str]:
  """``(mmaction, '')`` with every mmaction2 model registered, or ``(None, why)`` when it cannot be used.

  Works around two packaging problems of mmaction2 1.2.0: the missing ``localizers.drn`` package (an empty
  stand-in is registered only when the wheel lacks it; DRN is a video localizer nobody here uses) and the
  multimodal models that ``mmaction.models`` imports whenever ``transformers`` is installed and that fail
  against its newer releases (skipped; skeleton models do not need them).
  """
  if not _installed('torch'):
    return None, 'torch is not installed'
  if not _installed('mmaction'):
    return None, 'mmaction2 is not installed'
  module = sys.modules.get('mmaction')
  init = module.__file__ if module is not None else importlib.util.find_spec('mmaction').origin
  if init and not (Path(init).parent / 'models' / 'localizers' / 'drn').is_dir():
    for name in _DRN_MODULES:
      if name not in sys.modules:
        stand_in = types.ModuleType(name)
        stand_in.DRN = None
        sys.modules[name] = stand_in
  try:
    import mmaction  # noqa: PLC0415
    import mmaction.utils.dependency  # noqa: PLC0415
    mmaction.utils.dependency.WITH_MULTIMODAL = False
    from mmaction.utils import register_all_modules  # noqa: PLC0415
    register_all_modules()
  except Exception as e:  # noqa: BLE001  (any failure means: mmaction2 is not usable here)
    return None, f'mmaction2 does not import: {type(e).__name__}: {e}'
  return mmaction, ''


def _installed(name: str) -> bool:
  if name in sys.modules:           # already imported (or blocked with None)
    return sys.modules[name] is not None
  return importlib.util.find_spec(name) is not None


def mmaction_recognizer(cfg: ModelConfig, state_dict: Mapping[str, Any] | None = None) -> Any:
  """mmaction2's ``RecognizerGCN(STGCN, GCNHead)`` for ``cfg``, holding ``state_dict`` (numpy arrays or tensors,
  loaded strictly) when given; in train mode, as PyTorch builds it. ``ValueError`` for a layout mmaction2 does not
  know by name; ``ImportError`` naming why when mmaction2 cannot be used."""
  layout = graph_lib.get_layout(cfg.layout).name
  if layout not in MMACTION_LAYOUTS:
    raise ValueError(f'mmaction2 knows the layouts {MMACTION_LAYOUTS} by name, not {layout!r}')
  mmaction, why = import_mmaction()
  if mmaction is None:
    raise ImportError(why)
  import torch  # noqa: PLC0415
  from mmaction.registry import MODELS  # noqa: PLC0415

  backbone = dict(type='STGCN', graph_cfg=dict(layout=layout, mode=cfg.graph_mode),
                  in_channels=cfg.in_channels, base_channels=cfg.base_channels, ch_ratio=cfg.ch_ratio,
                  num_stages=cfg.num_stages, inflate_stages=list(cfg.inflate_stages),
                  down_stages=list(cfg.down_stages), data_bn_type=cfg.data_bn_type, num_person=cfg.num_person,
                  gcn_adaptive=cfg.gcn_adaptive, gcn_with_res=cfg.gcn_with_res, gcn_conv_pos=cfg.gcn_conv_pos,
                  tcn_type=cfg.tcn_type, tcn_dropout=cfg.tcn_dropout)
  net = MODELS.build(dict(type='RecognizerGCN', backbone=backbone,
                          cls_head=dict(type='GCNHead', num_classes=cfg.num_classes,
                                        in_channels=cfg.stage_specs()[-1][1], dropout=cfg.head_dropout)))
  if state_dict is not None:
    net.load_state_dict({k: torch.as_tensor(_torch_compatible(v)) for k, v in state_dict.items()}, strict=True)
  return net


def _torch_compatible(value: Any) -> np.ndarray:
  """A numpy copy of ``value``; ml_dtypes' bfloat16, which torch cannot take from numpy, widened (exactly) to
  float32."""
  arr = np.array(value)
  return arr.astype(np.float32) if arr.dtype.name == 'bfloat16' else arr


__all__ = ['MMACTION_LAYOUTS', 'import_mmaction', 'mmaction_recognizer']
