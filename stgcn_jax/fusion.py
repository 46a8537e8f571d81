"""Late fusion of per-sample class scores from several streams (joint, bone, joint motion, bone motion).

The multi-stream numbers of STGCN++ (SPEC §2) are weighted sums of the single-stream test scores:
two-stream j:b = 1:1, four-stream j:jm:b:bm = 2:1:2:1. This mirrors mmaction2's
``tools/analysis_tools/report_accuracy.py``: optionally a softmax over classes per file, then
``sum_i coefficient_i * scores_i`` as its ``get_weighted_score`` computes it (``numpy.dot`` of the stacked
scores with the float64 coefficients: float64 sums, so argmax ties come out the same). Before fusing, every
file must describe the same samples in the same order: by ``frame_dir`` among the files that have them, and by
sample count and labels; a mismatch is refused with the two files and the first differing sample named.

Command line (results files from ``stgcn_jax.test --dump`` or mmaction2's ``tools/test.py --dump``)::

    python -m stgcn_jax.fusion --preds j.pkl jm.pkl b.pkl bm.pkl --coefficients 2 1 2 1 [--apply-softmax] \\
        [--out fused.pkl]

prints top-1, top-5 and mean-class accuracy in percent.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import numpy as np

from stgcn_jax import metrics
from stgcn_jax import results as results_lib
from stgcn_jax.results import Results

__all__ = ['FusionMismatchError', 'check_aligned', 'softmax', 'fuse', 'fuse_files', 'format_accuracies', 'main']


class FusionMismatchError(ValueError):
  """The results files do not describe the same samples in the same order, or disagree on the class count."""


def softmax(scores: np.ndarray) -> np.ndarray:
  """Softmax over the class axis of (N, K) scores, in the input's float precision (float32 stays float32)."""
  scores = np.asarray(scores)
  if not np.issubdtype(scores.dtype, np.floating):
    scores = scores.astype(np.float32)
  shifted = np.exp(scores - scores.max(axis=-1, keepdims=True))  # shift by the max: exp never overflows
  return shifted / shifted.sum(axis=-1, keepdims=True)


def _first_difference(a: Sequence, b: Sequence) -> int:
  return next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)


def check_aligned(results: Sequence[Results]) -> None:
  """Raises :class:`FusionMismatchError` unless every file matches the first one sample for sample.

  Compared against the first file: the class count, the sample count and the labels; ``frame_dirs`` against
  the first file that has them. The message names both files and the first differing sample.
  """
  ref = results[0]
  named = next((r for r in results if r.frame_dirs is not None), None)
  for other in results[1:]:
    pair = f'{ref.path} and {other.path}'
    if other.num_classes != ref.num_classes:
      raise FusionMismatchError(f'{pair} have {ref.num_classes} and {other.num_classes} classes; fuse results of '
                                'models trained on the same label set (e.g. NTU60 with NTU60)')
    if other.num_samples != ref.num_samples:
      raise FusionMismatchError(f'{pair} have {ref.num_samples} and {other.num_samples} samples; they must come '
                                'from the same split (same annotation file, split and skip policy)')
    if named is not None and other.frame_dirs is not None and named.frame_dirs != other.frame_dirs:
      i = _first_difference(named.frame_dirs, other.frame_dirs)
      how = ('the same samples in a different order' if sorted(named.frame_dirs) == sorted(other.frame_dirs)
             else 'different samples')
      raise FusionMismatchError(f'{named.path} and {other.path} hold {how}: sample {i} is '
                                f'{named.frame_dirs[i]!r} in the first and {other.frame_dirs[i]!r} in the second; '
                                'dump both from the same split in split order')
    if not np.array_equal(ref.labels, other.labels):
      i = int(np.flatnonzero(ref.labels != other.labels)[0])
      name = f' ({ref.frame_dirs[i]!r})' if ref.frame_dirs is not None else ''
      raise FusionMismatchError(f'{pair} disagree on the label of sample {i}{name}: {ref.labels[i]} vs '
                                f'{other.labels[i]}; they are not the same samples in the same order (or use '
                                'different label maps)')


def fuse(results: Sequence[Results | np.ndarray], coefficients: Sequence[float],
         apply_softmax: bool = False) -> np.ndarray:
  """Weighted sum of the score matrices, float64 (N, K), as mmaction2's ``get_weighted_score``.

  ``results`` are :class:`Results` (checked with :func:`check_aligned`) or bare (N, K) arrays (only shapes are
  checked). With ``apply_softmax`` each file's scores go through a softmax over classes first (use it for
  logits; our dumps and mmaction2's already hold probabilities).
  """
  if len(results) == 0:
    raise ValueError('nothing to fuse: give at least one results file')
  coefficients = [float(c) for c in coefficients]
  if len(coefficients) != len(results):
    raise ValueError(f'{len(results)} results but {len(coefficients)} coefficients; give one coefficient per '
                     'file (e.g. --coefficients 2 1 2 1 for j jm b bm)')
  if not all(np.isfinite(coefficients)):
    raise ValueError(f'coefficients must be finite numbers, got {coefficients}')
  if not any(coefficients):
    raise ValueError(f'coefficients {coefficients} are all 0: the fused scores would all be 0; give each stream '
                     'a weight (e.g. 1 1)')
  if all(isinstance(r, Results) for r in results):
    check_aligned(results)
  arrays = [np.asarray(r.scores if isinstance(r, Results) else r) for r in results]
  arrays = [a if np.issubdtype(a.dtype, np.floating) else a.astype(np.float32) for a in arrays]
  for i, a in enumerate(arrays):
    if a.ndim != 2 or a.shape != arrays[0].shape:
      raise FusionMismatchError(f'scores {i} have shape {a.shape}, scores 0 have {arrays[0].shape}; all must be '
                                'the same (N, K)')
  stacked = np.stack([softmax(a) if apply_softmax else a for a in arrays])        # (S, N, K)
  return np.dot(stacked.T, np.asarray(coefficients, np.float64)).T


def fuse_files(paths: Sequence[str | os.PathLike], coefficients: Sequence[float] | None = None,
               apply_softmax: bool = False) -> tuple[Results, dict[str, float]]:
  """Reads, checks and fuses results files; returns the fused :class:`Results` and its accuracies (percent).

  ``coefficients`` default to 1 for every file. The fused result keeps the first file's ``frame_dirs``
  (or the first file that has them) and class names.
  """
  loaded = [results_lib.read_results(p) for p in paths]
  coefficients = [1.0] * len(loaded) if coefficients is None else list(coefficients)
  fused = fuse(loaded, coefficients, apply_softmax)
  ref = loaded[0]
  frame_dirs = next((r.frame_dirs for r in loaded if r.frame_dirs is not None), None)
  class_names = next((r.class_names for r in loaded if r.class_names is not None), None)
  meta = {'fused_from': [os.fspath(p) for p in paths], 'coefficients': [float(c) for c in coefficients],
          'apply_softmax': bool(apply_softmax)}
  out = Results(fused, ref.labels, frame_dirs, class_names, meta, '<fused>', 'stgcn_jax')
  return out, metrics.accuracy_summary(fused, ref.labels)


def format_accuracies(acc: dict[str, float]) -> str:
  """Three lines, percent with 2 decimals; top-5 reads n/a when there are fewer than 5 classes."""
  top5 = f'{acc["top5"]:.2f}' if 'top5' in acc else 'n/a (fewer than 5 classes)'
  return f'top-1 accuracy: {acc["top1"]:.2f}\ntop-5 accuracy: {top5}\nmean class accuracy: {acc["mean_class"]:.2f}'


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog='python -m stgcn_jax.fusion', description=__doc__.split('\n\n')[0])
  parser.add_argument('--preds', nargs='+', required=True, help='results files (stgcn_jax or mmaction2 dumps)')
  parser.add_argument('--coefficients', nargs='+', type=float, default=None,
                      help='one weight per file (default: all 1), e.g. 2 1 2 1 for j jm b bm')
  parser.add_argument('--apply-softmax', action='store_true', help='softmax each file\'s scores before fusing')
  parser.add_argument('--out', default=None, help='also write the fused scores as a stgcn_jax results dump')
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = _parse_args(argv)
  try:
    fused, acc = fuse_files(args.preds, args.coefficients, args.apply_softmax)
  except (ValueError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  weights = ' '.join(f'{c:g}' for c in fused.meta['coefficients'])
  print(f'fused {len(args.preds)} files, {fused.num_samples} samples, {fused.num_classes} classes, '
        f'coefficients {weights}{" after softmax" if args.apply_softmax else ""}')
  print(format_accuracies(acc))
  if args.out:
    try:
      results_lib.write_results(args.out, fused.scores, fused.labels, fused.frame_dirs, fused.class_names,
                                fused.meta)
    except OSError as e:
      print(f'error: --out {args.out}: {e}', file=sys.stderr)
      return 2
    print(f'fused scores written to {args.out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
