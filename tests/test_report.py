"""Per-class report: files written, valid PNGs, CSV numbers equal the metrics, NTU names by default."""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest

from stgcn_jax import labels as labels_lib
from stgcn_jax import metrics, report

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'

# 4 classes; class 3 never occurs in the split. Predictions (argmax): 0, 1, 1, 2, 0, 2.
SCORES = np.array([[0.7, 0.1, 0.1, 0.1],
                   [0.1, 0.6, 0.2, 0.1],
                   [0.2, 0.5, 0.2, 0.1],
                   [0.1, 0.1, 0.7, 0.1],
                   [0.6, 0.2, 0.1, 0.1],
                   [0.1, 0.2, 0.6, 0.1]], np.float32)
LABELS = np.array([0, 1, 2, 2, 1, 2])
NAMES = ['wave', 'clap', 'jump | hop', 'sit']


def _read_csv(path):
  with open(path, newline='', encoding='utf-8') as f:
    return list(csv.DictReader(f))


def _assert_png(path):
  assert os.path.getsize(path) > 1000
  with open(path, 'rb') as f:
    assert f.read(8) == PNG_SIGNATURE


def test_report_files_and_numbers(tmp_path):
  paths = report.write_report(SCORES, LABELS, NAMES, tmp_path / 'run' / 'result')
  assert paths == {'csv': str(tmp_path / 'run' / 'result_per_class.csv'),
                   'markdown': str(tmp_path / 'run' / 'result_per_class.md'),
                   'confusion_png': str(tmp_path / 'run' / 'result_confusion.png'),
                   'accuracy_png': str(tmp_path / 'run' / 'result_per_class.png')}
  _assert_png(paths['confusion_png'])
  _assert_png(paths['accuracy_png'])

  rows = _read_csv(paths['csv'])
  assert [r['name'] for r in rows] == NAMES
  expected = metrics.per_class_accuracy(SCORES, LABELS)  # [1, 1/2, 2/3, nan]
  np.testing.assert_allclose(expected[:3], [1, 1 / 2, 2 / 3])
  got = [float(r['accuracy']) if r['accuracy'] else np.nan for r in rows]
  np.testing.assert_array_equal(got, expected)  # exact: written with repr
  assert [int(r['samples']) for r in rows] == [1, 2, 3, 0]
  assert [int(r['correct']) for r in rows] == [1, 1, 2, 0]
  # class 1 ('clap') once predicted as 0, class 2 once as 1
  assert [(r['most_confused_with'], int(r['confused_count'])) for r in rows] == [
      ('', 0), ('wave', 1), ('clap', 1), ('', 0)]

  md = open(paths['markdown'], encoding='utf-8').read()
  assert 'mean class 72.22%' in md and 'top-1 66.67%' in md and 'top-5 n/a' in md
  body = [line for line in md.splitlines() if line.startswith('| ') and line[2].isdigit()]
  # worst first: clap 50%, jump|hop 66.67%, wave 100%, absent 'sit' last
  assert [line.split(' | ')[2] for line in body] == ['clap', 'jump \\| hop', 'wave', 'sit']
  assert '| 50.00% |' in body[0] and '| — |' in body[3]


def test_report_into_directory(tmp_path):
  out = tmp_path / 'report'
  out.mkdir()
  paths = report.write_report(SCORES, LABELS, None, out)
  assert sorted(os.listdir(out)) == ['confusion.png', 'per_class.csv', 'per_class.md', 'per_class.png']
  assert [r['name'] for r in _read_csv(paths['csv'])] == ['class 0', 'class 1', 'class 2', 'class 3']
  assert report.report_prefix('work/result.pkl') == 'work/result'


@pytest.mark.parametrize('num_classes, names', [(60, labels_lib.NTU60_CLASSES), (120, labels_lib.NTU120_CLASSES)])
def test_report_ntu_sized(tmp_path, num_classes, names):
  rng = np.random.default_rng(num_classes)
  labels = np.arange(2 * num_classes) % num_classes
  scores = rng.random((2 * num_classes, num_classes)).astype(np.float32)
  scores[np.arange(0, 2 * num_classes, 2), labels[::2]] += 1  # every other sample right
  paths = report.write_report(scores, labels, None, tmp_path / 'ntu', dpi=40)  # low dpi: fast test
  _assert_png(paths['confusion_png'])
  _assert_png(paths['accuracy_png'])
  rows = _read_csv(paths['csv'])
  assert [r['name'] for r in rows] == list(names)
  got = np.array([float(r['accuracy']) for r in rows])
  np.testing.assert_array_equal(got, metrics.per_class_accuracy(scores, labels))


def test_report_validates_names(tmp_path):
  with pytest.raises(ValueError, match='3 class names given but the scores have 4 classes'):
    report.write_report(SCORES, LABELS, NAMES[:3], tmp_path / 'x')
