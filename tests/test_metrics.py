"""Metrics against hand-computed cases: ties, classes absent from the split, k bounds, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from stgcn_jax import metrics

# 4 samples, 3 classes. Top-1 predictions (argmax): 1, 0, 2, 1.
SCORES = np.array([[0.1, 0.6, 0.3],
                   [0.5, 0.2, 0.3],
                   [0.2, 0.2, 0.6],
                   [0.3, 0.4, 0.3]], np.float32)
LABELS = np.array([1, 2, 2, 0])


def test_top_k_hand_computed():
  assert metrics.top_k_accuracy(SCORES, LABELS, 1) == 0.5  # samples 0 and 2
  # top-2 sets: {1,2}, {0,2}, {2,1} (0/1 tie -> higher index), {1,2} (0/2 tie -> higher index 2)
  assert metrics.top_k_accuracy(SCORES, LABELS, 2) == 0.75
  assert metrics.top_k_accuracy(SCORES, LABELS, 3) == 1.0


def test_top_k_tie_goes_to_higher_index():
  tied = np.array([[0.5, 0.5, 0.0]])
  assert metrics.top_k_accuracy(tied, [1], 1) == 1.0
  assert metrics.top_k_accuracy(tied, [0], 1) == 0.0
  assert metrics.top_k_accuracy(tied, [0], 2) == 1.0
  # All-equal row: the top-2 are the two highest indices.
  flat = np.zeros((3, 6))
  assert metrics.top_k_accuracy(flat, [5, 4, 3], 2) == pytest.approx(2 / 3)
  # argmax-based prediction gives the tie to the lowest index (as mmaction2's mean-class accuracy does).
  assert metrics.predictions(tied).tolist() == [0]


def test_top_k_matches_brute_force_definition():
  rng = np.random.default_rng(0)
  scores = rng.integers(0, 4, size=(200, 60)).astype(np.float32)  # many ties on purpose
  labels = rng.integers(0, 60, size=200)
  for k in (1, 5):
    # rank of the label = classes scoring higher, plus tied classes with a higher index
    s = scores[np.arange(200), labels][:, None]
    idx = np.arange(60)[None, :]
    rank = ((scores > s) | ((scores == s) & (idx > labels[:, None]))).sum(axis=1)
    assert metrics.top_k_accuracy(scores, labels, k) == pytest.approx(np.mean(rank < k))


def test_top5_with_60_classes_hand_computed():
  scores = np.tile(np.arange(60, dtype=np.float32), (3, 1))  # class 59 best, 55 is 5th
  assert metrics.top_k_accuracy(scores, [55, 54, 59], 5) == pytest.approx(2 / 3)
  assert metrics.top_k_accuracy(scores, [55, 54, 59], 1) == pytest.approx(1 / 3)


def test_top5_with_fewer_than_5_classes_is_a_clear_error():
  with pytest.raises(ValueError, match='top-5 needs at least 5 classes, scores have 3'):
    metrics.top_k_accuracy(SCORES, LABELS, 5)
  with pytest.raises(ValueError, match='positive integer'):
    metrics.top_k_accuracy(SCORES, LABELS, 0)


def test_confusion_matrix_hand_computed():
  cm = metrics.confusion_matrix([1, 0, 2, 1], LABELS, 3)
  assert cm.dtype == np.int64
  np.testing.assert_array_equal(cm, [[0, 1, 0],   # true 0 -> predicted 1
                                     [0, 1, 0],   # true 1 -> 1
                                     [1, 0, 1]])  # true 2 -> 0 and 2
  with pytest.raises(ValueError, match=r'pred\[0\] = 3 is outside \[0, 3\)'):
    metrics.confusion_matrix([3, 0, 0, 0], LABELS, 3)


def test_per_class_and_mean_class_accuracy():
  acc = metrics.per_class_accuracy(SCORES, LABELS)
  np.testing.assert_array_equal(acc, [0.0, 1.0, 0.5])
  assert metrics.mean_class_accuracy(SCORES, LABELS) == pytest.approx(0.5)


def test_mean_class_excludes_classes_absent_from_split():
  # 5 classes; labels use only 0 and 3. Class 4 is predicted once but never a label.
  scores = np.eye(5)[[0, 0, 3, 4, 3]]
  labels = [0, 0, 3, 3, 0]  # class 0: 2/3 right, class 3: 1/2 right
  acc = metrics.per_class_accuracy(scores, labels)
  np.testing.assert_allclose(acc[[0, 3]], [2 / 3, 1 / 2])
  assert np.isnan(acc[[1, 2, 4]]).all()
  assert metrics.mean_class_accuracy(scores, labels) == pytest.approx((2 / 3 + 1 / 2) / 2)
  # mmaction2 also averages a 0 for class 4 (predicted, never a label), but not for classes 1 and 2.
  assert metrics.mean_class_accuracy(scores, labels, mmaction2_compat=True) == pytest.approx((2 / 3 + 1 / 2) / 3)


def test_accuracy_summary_percent():
  out = metrics.accuracy_summary(SCORES, LABELS)
  assert out == pytest.approx({'top1': 50.0, 'mean_class': 50.0})  # no top5 with 3 classes
  scores = np.tile(np.arange(6, dtype=np.float32), (2, 1))
  assert metrics.accuracy_summary(scores, [5, 0]) == pytest.approx({'top1': 50.0, 'top5': 50.0, 'mean_class': 50.0})


@pytest.mark.parametrize('scores, labels, match', [
    (np.zeros((0, 3)), np.zeros(0, int), 'empty'),
    (np.zeros((2, 3)), [0, 1, 2], '3 entries but scores have 2 rows'),
    (np.zeros(3), [0], '2-D'),
    (np.zeros((2, 3)), [[0], [1]], '1-D'),
    (np.zeros((2, 3)), [0, 3], r'labels\[1\] = 3 is outside \[0, 3\)'),
    (np.zeros((2, 3)), [0, -1], r'labels\[1\] = -1'),
    (np.zeros((2, 3)), [0.5, 1], 'integer class indices'),
    (np.array([[0.1, np.nan, 0.2], [0.1, 0.2, 0.3]]), [0, 1], 'sample 0 contain NaN'),
])
def test_bad_input_is_refused(scores, labels, match):
  with pytest.raises(ValueError, match=match):
    metrics.top_k_accuracy(scores, labels, 1)
  with pytest.raises(ValueError, match=match):
    metrics.mean_class_accuracy(scores, labels)
