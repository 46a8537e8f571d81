"""Action recognition with a trained or converted checkpoint: skeletons in, top-k classes and scores out.

    python -m stgcn_jax.predict --checkpoint checkpoints/ntu60_2d_joint --input skeletons.npz --top-k 5

Inputs (shape letters N samples, S clips, M persons, T frames, V joints, C channels):

* ``.npy`` / ``.npz`` model inputs (already features, e.g. the output of the test pipeline):
  ``(N, S, M, T, V, C)``, ``(N, M, T, V, C)`` (one clip each) or ``(M, T, V, C)`` (one sample, one clip).
  An ``.npz`` is read at key ``input`` (else ``keypoint``, else its only array).
* an mmaction2/pyskl annotation pickle: each sample goes through the test pipeline first (prenormalise,
  modality ``--feat``, 10 clips of 100 frames, mmaction2's deterministic test sampling). Labels are not
  needed: recorded skeletons without them, or with another label set, are predicted as well.

Scores follow mmaction2's test protocol: a softmax per clip, averaged over the clips.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stgcn_jax import cli
from stgcn_jax import graph as graph_lib
from stgcn_jax import labels as labels_lib
from stgcn_jax.model import Recognizer

__all__ = ['PredictResult', 'load_inputs', 'check_input', 'predict_arrays', 'top_k', 'predict', 'main']

_MODALITY = {'j': 'joint', 'b': 'bone', 'jm': 'joint motion', 'bm': 'bone motion'}


@dataclasses.dataclass
class PredictResult:
  """Per-clip ``logits`` ``(N, S, K)``, clip-averaged ``probs`` ``(N, K)``, sample names, class names and the
  top-k ``(class index, name, probability)`` per sample."""

  logits: np.ndarray
  probs: np.ndarray
  sample_names: list[str]
  class_names: list[str]
  top: list[list[tuple[int, str, float]]]

  def format(self) -> str:
    lines = []
    for name, top in zip(self.sample_names, self.top):
      lines.append(f'{name}: ' + ', '.join(f'{label} {cls!r} {p:.4f}' for label, cls, p in top))
    return '\n'.join(lines)


def _as_clips(x: np.ndarray, source: str) -> np.ndarray:
  if x.ndim == 4:
    return x[None, None]          # (M, T, V, C) -> (1, 1, M, T, V, C)
  if x.ndim == 5:
    return x[:, None]             # (N, M, T, V, C) -> (N, 1, M, T, V, C)
  if x.ndim == 6:
    return x
  raise ValueError(f'{source}: array of shape {x.shape}; expected (N, num_clips, M, T, V, C), (N, M, T, V, C) '
                   'or (M, T, V, C)')


def load_inputs(path: str | os.PathLike, *, layout: Any, feat: str | None, split: str | None = None,
                num_clips: int = 10, clip_len: int = 100, num_person: int = 2) -> tuple[np.ndarray, list[str]]:
  """``(x, sample_names)``: model inputs ``(N, S, M, T, V, C)`` float32 from an array file or an annotation
  pickle (run through the test pipeline with ``feat`` into clips of ``num_person`` persons; ``split`` selects
  samples, None = all; its labels are not needed and not read)."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'input {str(path)!r} does not exist')
  suffix = path.suffix.lower()
  if suffix in ('.npy', '.npz'):
    x = _read_array_file(path, suffix)
  elif suffix in ('.pkl', '.pickle'):
    from stgcn_jax.data import annotations, transforms
    if feat is None:
      raise ValueError(f'{path}: an annotation file is run through the test pipeline, which needs the modality; '
                       f'the checkpoint does not record one, so pass --feat ({"/".join(_MODALITY)})')
    ds = annotations.load_annotations(path, split=split, layout=layout, num_classes=None)
    if len(ds) == 0:
      raise ValueError(f'{path}: split {split!r} holds no samples')
    x = np.stack([transforms.process_sample(ds[i], layout=layout, feat=feat, clip_len=clip_len,
                                            num_clips=num_clips, test_mode=True, num_person=num_person)
                  for i in range(len(ds))])
    return x, [str(d) for d in ds.frame_dirs]
  else:
    raise ValueError(f'{path}: unknown input type {suffix!r}; give a .npy / .npz array or an annotation .pkl')
  if x.dtype.kind not in 'fiu':
    raise ValueError(f'{path}: holds {x.dtype} values; expected numbers (float32 skeleton features)')
  x = np.asarray(x, np.float32)
  if 0 in x.shape:
    raise ValueError(f'{path}: an empty input of shape {x.shape} (N, S, M, T, V, C); give at least one sample '
                     'with frames')
  if not np.isfinite(x).all():
    bad = tuple(int(b) for b in np.argwhere(~np.isfinite(x))[0])
    raise ValueError(f'{path}: {np.count_nonzero(~np.isfinite(x))} NaN/Inf value(s), the first at (sample, clip, '
                     f'person, frame, joint, channel) = {bad}; store missing joints as 0')
  return x, [f'sample {i}' for i in range(x.shape[0])]


def _read_array_file(path: Path, suffix: str) -> np.ndarray:
  """The ``(N, S, M, T, V, C)`` inputs of a ``.npy`` / ``.npz`` file; a file numpy cannot read names itself."""
  import zipfile  # noqa: PLC0415
  try:
    if suffix == '.npy':
      return _as_clips(np.load(path, allow_pickle=False), str(path))
    with np.load(path, allow_pickle=False) as z:
      keys = list(z.keys())
      key = 'input' if 'input' in keys else 'keypoint' if 'keypoint' in keys else keys[0] if len(keys) == 1 else None
      if key is None:
        raise ValueError(f'{path}: holds {keys[:8]}; put the inputs under the key "input" (or save one array)')
      return _as_clips(z[key], f'{path}[{key}]')
  except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
    if str(path) in str(e):
      raise
    raise ValueError(f'{path}: not a readable {suffix} array of numbers ({type(e).__name__}: {e}); save the '
                     'inputs with numpy.save / numpy.savez') from None


def check_input(x: np.ndarray, model: Recognizer, meta: dict[str, Any] | None = None, source: str = 'input'):
  """Refuses inputs whose V or C (or M, for a per-person data BatchNorm) does not fit the checkpoint, saying
  which layout and modality it expects."""
  cfg = model.config
  layout = graph_lib.get_layout(cfg.layout).name
  m, v, c = x.shape[-4], x.shape[-2], x.shape[-1]
  if (v, c) == (cfg.num_node, cfg.in_channels) and (cfg.data_bn_type != 'MVC' or m == cfg.num_person):
    return
  feat = (meta or {}).get('feat')
  modality = f'{_MODALITY.get(feat, feat)} features' if feat else 'features'
  channels = {2: 'x, y', 3: 'x, y, score (2D) or x, y, z (3D)'}.get(cfg.in_channels, f'{cfg.in_channels} values')
  problems = []
  if cfg.data_bn_type == 'MVC' and m != cfg.num_person:
    problems.append(f'M={m} persons but the checkpoint normalises its input per person and expects '
                    f'M={cfg.num_person}')
  if v != cfg.num_node:
    problems.append(f'V={v} joints but the checkpoint expects V={cfg.num_node} (layout {layout!r})')
  if c != cfg.in_channels:
    problems.append(f'C={c} channels but the checkpoint expects C={cfg.in_channels} ({modality}: {channels})')
  raise ValueError(f'{source}: {"; ".join(problems)}. Give skeletons in the checkpoint\'s layout and modality, or '
                   'use a checkpoint trained for this data.')


def predict_arrays(model: Recognizer, x: np.ndarray, *, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
  """``(logits (N, S, K), probs (N, K))`` on ``x`` ``(N, S, M, T, V, C)``: eval mode, softmax per clip, mean
  over clips (mmaction2 ``average_clips='prob'``). Clips run in jitted batches of ``batch_size``."""
  x = np.asarray(x, np.float32)
  if x.ndim != 6:
    raise ValueError(f'expected (N, num_clips, M, T, V, C), got {x.shape}')
  check_input(x, model)
  n, s = x.shape[:2]
  clips = x.reshape((n * s,) + x.shape[2:])
  batch = min(batch_size, clips.shape[0])
  pad = -clips.shape[0] % batch       # a fixed batch shape: one compilation
  clips = np.concatenate([clips, np.zeros((pad,) + clips.shape[1:], clips.dtype)]) if pad else clips
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, xb: nnx.merge(graphdef, state)(xb, micro_batch='auto'))
  logits = np.concatenate([np.asarray(forward(state, clips[i:i + batch])) for i in range(0, len(clips), batch)])
  logits = logits[:n * s].reshape(n, s, -1)
  probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1).mean(axis=1))
  return logits, probs


def top_k(probs: np.ndarray, k: int, class_names: list[str]) -> list[list[tuple[int, str, float]]]:
  """The ``k`` most probable classes per row (all of them when there are fewer), best first (ties: lower
  index first)."""
  if isinstance(k, bool) or not isinstance(k, int) or k < 1:
    raise ValueError(f'top-k must be a positive integer, got {k!r}')
  k = min(k, probs.shape[-1])
  order = np.argsort(-probs, axis=-1, kind='stable')[:, :k]
  return [[(int(j), class_names[j], float(row[j])) for j in idx] for row, idx in zip(probs, order)]


def predict(checkpoint: str | os.PathLike, input_path: str | os.PathLike, *, k: int = 5,
            labels: str | os.PathLike | None = None, output: str | os.PathLike | None = None,
            feat: str | None = None, split: str | None = None, num_clips: int = 10) -> PredictResult:
  """Loads ``checkpoint``, reads ``input_path`` (see the module docstring), and returns the scores; with
  ``output`` also writes them (``.npy``: probs ``(N, K)``; ``.npz``: ``logits``, ``probs``, ``names``)."""
  from stgcn_jax import checkpoint as ckpt_lib
  if output is not None and Path(output).is_dir():
    raise ValueError(f'--output {str(output)!r} is a directory; name a .npy or .npz file')
  if output is not None and Path(output).suffix.lower() not in ('.npy', '.npz'):
    raise ValueError(f'--output {str(output)!r}: name a .npy file (probabilities) or a .npz file (logits, '
                     'probabilities, names)')
  model, meta = ckpt_lib.load_model(checkpoint)
  cfg = model.config
  if feat is not None and meta.get('feat') and feat != meta['feat']:
    raise ValueError(f'{checkpoint} was trained on {meta["feat"]!r} ({_MODALITY.get(meta["feat"])}) but --feat '
                     f'is {feat!r}; drop --feat or use a checkpoint of that modality')
  if labels is not None:
    class_names = labels_lib.read_labels_file(labels, cfg.num_classes)
  else:
    class_names = (meta.get('class_names') or labels_lib.class_names(cfg.num_classes)
                   or [f'class {i}' for i in range(cfg.num_classes)])
  x, names = load_inputs(input_path, layout=cfg.layout, feat=feat or meta.get('feat'), split=split,
                         num_clips=num_clips, num_person=cfg.num_person)
  check_input(x, model, meta, str(input_path))
  logits, probs = predict_arrays(model, x)
  result = PredictResult(logits, probs, names, list(class_names), top_k(probs, k, list(class_names)))
  if output is not None:
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, 'wb') as f:   # a file object: numpy would append its own suffix to '.NPZ' / '.NPY'
      if output.suffix.lower() == '.npz':
        np.savez(f, logits=logits, probs=probs, names=np.asarray(names))
      else:
        np.save(f, probs)
  return result


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--checkpoint', required=True, help='a stgcn_jax checkpoint directory (trained or converted)')
  parser.add_argument('--input', required=True, help='.npy / .npz model inputs or an annotation .pkl')
  parser.add_argument('--top-k', type=int, default=5)
  parser.add_argument('--labels', help='class names, one per line (default: stored in the checkpoint / NTU)')
  parser.add_argument('--output', help='write the scores: .npy (probs) or .npz (logits, probs, names)')
  parser.add_argument('--feat', choices=sorted(_MODALITY), help='modality for annotation-file inputs')
  parser.add_argument('--split', help='split of the annotation file (default: every sample)')
  args = parser.parse_args(argv)
  try:
    result = predict(args.checkpoint, args.input, k=args.top_k, labels=args.labels, output=args.output,
                     feat=args.feat, split=args.split)
  except (ValueError, OSError) as e:
    return cli.fail(e)
  print(result.format())
  if args.output:
    print(f'scores written to {args.output}')
  return 0


if __name__ == '__main__':
  cli.relaunch_with_tcmalloc()
  sys.exit(main())
