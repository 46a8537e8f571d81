"""Classification metrics for the test protocol: top-k, mean-class and per-class accuracy, confusion matrix.

Numpy only. The definitions follow mmaction2's ``mmaction.evaluation.functional`` so that numbers reported
here and there agree:

* **top-k accuracy**: a sample counts when its label is among its ``k`` highest scores.
  *Tie rule*: candidates are ranked by ``np.argsort(scores, kind='stable')[:, -k:]``, so among equal scores
  the class with the **higher index** ranks higher. mmaction2 calls ``np.argsort(scores)[:, -k:]`` with the
  default (introsort) kind, which gives the same order whenever numpy's default sort keeps equal elements in
  place (it does for small rows); we pin the stable kind so the result never depends on the numpy build or
  the CPU's SIMD sort. Exact ties between float probabilities are rare outside hand-made cases. Note that
  the argmax-based metrics below (and mmaction2's) give a tie to the *lowest* index instead, so on an exact
  tie top-1 accuracy and the confusion-matrix diagonal can disagree, exactly as in mmaction2.
* **mean-class accuracy**: top-1 accuracy of each class, averaged over the classes present in ``labels``;
  classes absent from the split are excluded (they have no accuracy). mmaction2 additionally averages in a
  0.0 for every class that is *predicted* but absent from the labels (its confusion matrix spans the union of
  predicted and true classes); pass ``mmaction2_compat=True`` to reproduce that. On a full NTU split every
  class is present and both agree.
* **confusion matrix**: ``cm[true, pred]`` counts, rows are ground truth, columns predictions.

Shapes: N samples, K classes. ``scores`` is (N, K) (probabilities or logits, any real dtype), ``labels`` is
(N,) integers in ``[0, K)``. Inputs are validated: empty input, mismatched shapes, out-of-range labels, NaN
scores and ``k`` larger than K raise ``ValueError`` saying what was received.
"""

from __future__ import annotations

import numpy as np

__all__ = ['top_k_accuracy', 'mean_class_accuracy', 'confusion_matrix', 'per_class_accuracy', 'predictions',
           'accuracy_summary']


def _check_labels(labels, num_classes: int, n: int | None = None, name: str = 'labels') -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f'{name} must be 1-D (N,), got shape {labels.shape}')
  if n is not None and labels.shape[0] != n:
    raise ValueError(f'{name} has {labels.shape[0]} entries but scores have {n} rows; they must describe the '
                     'same samples')
  if labels.shape[0] == 0:
    raise ValueError(f'{name} is empty: accuracy of zero samples is undefined')
  if not np.issubdtype(labels.dtype, np.integer):
    if np.issubdtype(labels.dtype, np.floating) and np.all(np.isfinite(labels)) and np.all(labels == np.round(labels)):
      labels = labels.astype(np.int64)  # integral floats (e.g. a label column read from CSV) are unambiguous
    else:
      raise ValueError(f'{name} must be integer class indices, got dtype {labels.dtype}')
  labels = labels.astype(np.int64, copy=False)
  bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
  if bad.size:
    i = int(bad[0])
    raise ValueError(f'{name}[{i}] = {labels[i]} is outside [0, {num_classes}) ({bad.size} out-of-range '
                     f'entries); the scores have {num_classes} classes')
  return labels


def _check_scores(scores) -> np.ndarray:
  scores = np.asarray(scores)
  if scores.ndim != 2:
    raise ValueError(f'scores must be 2-D (N samples, K classes), got shape {scores.shape}')
  if scores.shape[0] == 0:
    raise ValueError('scores is empty (0 samples): accuracy of zero samples is undefined')
  if scores.shape[1] == 0:
    raise ValueError(f'scores has shape {scores.shape}: zero classes')
  if not (np.issubdtype(scores.dtype, np.floating) or np.issubdtype(scores.dtype, np.integer)):
    raise ValueError(f'scores must be real numbers, got dtype {scores.dtype}')
  nan_rows = np.flatnonzero(np.isnan(scores).any(axis=1)) if np.issubdtype(scores.dtype, np.floating) else []
  if len(nan_rows):
    raise ValueError(f'scores of sample {int(nan_rows[0])} contain NaN ({len(nan_rows)} samples affected); the '
                     'model or the score file is broken, accuracies would be meaningless')
  return scores


def _check_scores_labels(scores, labels) -> tuple[np.ndarray, np.ndarray]:
  scores = _check_scores(scores)
  return scores, _check_labels(labels, scores.shape[1], scores.shape[0])


def predictions(scores) -> np.ndarray:
  """Top-1 class of each sample, int64 (N,). Ties go to the lowest class index (``np.argmax``, as mmaction2)."""
  return np.argmax(_check_scores(scores), axis=1).astype(np.int64)


def top_k_accuracy(scores, labels, k: int) -> float:
  """Fraction in [0, 1] of samples whose label is among their ``k`` highest scores (tie rule: module doc)."""
  scores, labels = _check_scores_labels(scores, labels)
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f'k must be a positive integer, got {k!r}')
  num_classes = scores.shape[1]
  if k > num_classes:
    raise ValueError(f'top-{k} needs at least {k} classes, scores have {num_classes}')
  top = np.argsort(scores, axis=1, kind='stable')[:, -k:]  # (N, k): the k highest, ascending
  hit = (top == labels[:, None]).any(axis=1)
  return float(hit.mean())


def confusion_matrix(pred, labels, num_classes: int) -> np.ndarray:
  """int64 (K, K) counts, ``cm[t, p]`` = number of samples with true class t predicted as p."""
  if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
    raise ValueError(f'num_classes must be a positive integer, got {num_classes!r}')
  labels = _check_labels(labels, num_classes)
  pred = _check_labels(pred, num_classes, labels.shape[0], name='pred')
  flat = np.bincount(labels * num_classes + pred, minlength=num_classes * num_classes)
  return flat.reshape(num_classes, num_classes).astype(np.int64)


def per_class_accuracy(scores, labels) -> np.ndarray:
  """Top-1 accuracy of each class, float64 (K,); NaN for classes with no sample in ``labels``."""
  scores, labels = _check_scores_labels(scores, labels)
  cm = confusion_matrix(np.argmax(scores, axis=1), labels, scores.shape[1])
  count = cm.sum(axis=1)
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where(count > 0, np.diag(cm) / count, np.nan)


def mean_class_accuracy(scores, labels, *, mmaction2_compat: bool = False) -> float:
  """Mean over the classes present in ``labels`` of their top-1 accuracy, in [0, 1].

  With ``mmaction2_compat=True``, classes that are predicted but absent from ``labels`` also enter the mean
  with accuracy 0, exactly as mmaction2's ``mean_class_accuracy`` does.
  """
  scores, labels = _check_scores_labels(scores, labels)
  acc = per_class_accuracy(scores, labels)
  present = np.zeros(scores.shape[1], bool)
  present[labels] = True
  if mmaction2_compat:
    predicted = np.zeros_like(present)
    predicted[np.argmax(scores, axis=1)] = True
    return float(np.where(present, acc, 0.0)[present | predicted].mean())
  return float(acc[present].mean())


def accuracy_summary(scores, labels) -> dict[str, float]:
  """``{'top1', 'top5', 'mean_class'}`` in percent; ``top5`` is left out when there are fewer than 5 classes."""
  scores, labels = _check_scores_labels(scores, labels)
  out = {'top1': 100 * top_k_accuracy(scores, labels, 1)}
  if scores.shape[1] >= 5:
    out['top5'] = 100 * top_k_accuracy(scores, labels, 5)
  out['mean_class'] = 100 * mean_class_accuracy(scores, labels)
  return out
