"""Result dumps (ours and mmaction2's) and score fusion: hand-computed sums, refused mismatches, the CLI."""

from __future__ import annotations

import os
import pickle
import sys

import numpy as np
import pytest

from stgcn_jax import fusion
from stgcn_jax import results as results_lib
from stgcn_jax.safe_pickle import UnsafePickleError

FRAME_DIRS = ['S001C001P001R001A001', 'S001C001P001R001A002', 'S001C001P001R001A003']
LABELS = np.array([0, 1, 2])
# Two streams over 3 samples and 3 classes, chosen so that neither alone is perfect but 2*j + 1*b is.
JOINT = np.array([[0.6, 0.3, 0.1],
                  [0.5, 0.4, 0.1],
                  [0.2, 0.3, 0.5]], np.float32)
BONE = np.array([[0.2, 0.7, 0.1],
                 [0.1, 0.8, 0.1],
                 [0.1, 0.1, 0.8]], np.float32)
# 2 * JOINT + 1 * BONE, by hand
FUSED_2_1 = np.array([[1.4, 1.3, 0.3],
                      [1.1, 1.6, 0.3],
                      [0.5, 0.7, 1.8]], np.float32)


def _write(tmp_path, name, scores, labels=LABELS, frame_dirs=FRAME_DIRS, **kw):
  return results_lib.write_results(tmp_path / name, scores, labels, frame_dirs, **kw)


# ----------------------------------------------------------------------------------------------- results
def test_write_read_roundtrip(tmp_path):
  path = _write(tmp_path, 'sub/j.pkl', JOINT, class_names=['a', 'b', 'c'],
                meta={'num_clips': np.int64(10), 'config': 'configs/ntu60_2d_joint.py', 'x': [1, {'y': None}]})
  res = results_lib.read_results(path)
  assert res.scores.dtype == np.float32 and res.labels.dtype == np.int64
  np.testing.assert_array_equal(res.scores, JOINT)
  np.testing.assert_array_equal(res.labels, LABELS)
  assert res.frame_dirs == FRAME_DIRS and res.class_names == ['a', 'b', 'c']
  assert res.meta == {'num_clips': 10, 'config': 'configs/ntu60_2d_joint.py', 'x': [1, {'y': None}]}
  assert res.source_format == 'stgcn_jax'
  assert os.listdir(tmp_path / 'sub') == ['j.pkl']  # the temporary file was renamed, nothing left behind
  with open(path, 'rb') as f:  # the documented plain-dict layout
    raw = pickle.load(f)
  assert sorted(raw) == ['class_names', 'format', 'frame_dirs', 'labels', 'meta', 'scores']
  assert raw['format'] == 'stgcn_jax.results/1'


@pytest.mark.parametrize('kwargs, match', [
    ({'labels': [0, 1]}, r'labels have shape \(2,\), expected \(3,\)'),
    ({'frame_dirs': FRAME_DIRS[:2]}, 'frame_dirs must be 3 strings'),
    ({'frame_dirs': [FRAME_DIRS[0]] * 3}, 'appears more than once'),
    ({'class_names': ['a']}, 'class_names must be 3 strings'),
    ({'labels': [0, 3, 2]}, r'label 3 of sample 1 is outside \[0, 3\) for 3 class scores'),
    ({'scores': np.where(np.eye(3, dtype=bool)[[2, 1, 0]], np.nan, JOINT)}, 'scores of sample 0 contain NaN'),
    ({'meta': {'path': object()}}, r"meta\['path'\] is a object"),
])
def test_write_refuses_inconsistent_input(tmp_path, kwargs, match):
  with pytest.raises(ValueError, match=match):
    _write(tmp_path, 'bad.pkl', kwargs.pop('scores', JOINT), **kwargs)
  assert not os.path.exists(tmp_path / 'bad.pkl')


def test_read_refuses_malicious_and_unknown_files(tmp_path):
  class Evil:
    def __reduce__(self):
      return (os.system, ('echo pwned',))
  path = tmp_path / 'evil.pkl'
  path.write_bytes(pickle.dumps([{'pred_score': Evil()}]))
  with pytest.raises(UnsafePickleError, match='evil.pkl.*refused to load the global'):
    results_lib.read_results(path)
  (tmp_path / 'other.pkl').write_bytes(pickle.dumps({'scores': 1}))
  with pytest.raises(ValueError, match="other.pkl: holds a dict"):
    results_lib.read_results(tmp_path / 'other.pkl')
  with pytest.raises(FileNotFoundError, match='missing.pkl'):
    results_lib.read_results(tmp_path / 'missing.pkl')


def _mmaction2_dump(path, scores, labels, frame_dirs=None, as_tensor=True):
  """A file laid out as mmaction2 1.x DumpResults writes it: ActionDataSample.to_dict() per sample."""
  import torch
  samples = []
  for i, (s, y) in enumerate(zip(scores, labels)):
    wrap = (lambda a: torch.from_numpy(np.asarray(a))) if as_tensor else np.asarray
    d = {'num_classes': len(s), 'pred_score': wrap(np.asarray(s, np.float32)),
         'gt_label': wrap(np.array([y], np.int64)), 'pred_label': wrap(np.array([np.argmax(s)], np.int64))}
    if frame_dirs is not None:
      d['frame_dir'] = frame_dirs[i]
    samples.append(d)
  with open(path, 'wb') as f:
    pickle.dump(samples, f, protocol=2)  # mmengine.dump's pickle protocol
  return path


def test_read_mmaction2_dump_with_torch_tensors(tmp_path):
  pytest.importorskip('torch')
  res = results_lib.read_results(_mmaction2_dump(tmp_path / 'mm.pkl', BONE, LABELS))
  assert res.source_format == 'mmaction2' and res.frame_dirs is None and res.class_names is None
  np.testing.assert_array_equal(res.scores, BONE)
  np.testing.assert_array_equal(res.labels, LABELS)
  res = results_lib.read_results(_mmaction2_dump(tmp_path / 'mm2.pkl', BONE, LABELS, FRAME_DIRS, as_tensor=False))
  assert res.frame_dirs == FRAME_DIRS
  np.testing.assert_array_equal(res.scores, BONE)


def test_read_mmaction2_dump_with_bfloat16_scores(tmp_path):
  torch = pytest.importorskip('torch')
  path = _mmaction2_dump(tmp_path / 'mm.pkl', BONE, LABELS)
  with open(path, 'rb') as f:
    samples = pickle.load(f)
  for sample in samples:
    sample['pred_score'] = sample['pred_score'].to(torch.bfloat16)
  with open(path, 'wb') as f:
    pickle.dump(samples, f, protocol=2)
  res = results_lib.read_results(path)
  np.testing.assert_array_equal(res.scores, torch.from_numpy(BONE).to(torch.bfloat16).float().numpy())


def test_damaged_scores_name_their_file(tmp_path, capsys):
  a = _write(tmp_path, 'a.pkl', JOINT)
  bad = tmp_path / 'b.pkl'
  with open(a, 'rb') as f:
    raw = pickle.load(f)
  raw['scores'][1, 2] = np.nan                            # written by hand: write_results refuses it
  bad.write_bytes(pickle.dumps(raw))
  assert fusion.main(['--preds', str(a), str(bad)]) == 2
  err = capsys.readouterr().err
  assert 'b.pkl: the scores of sample 1 contain NaN' in err


def test_read_mmaction2_dump_without_torch(tmp_path, monkeypatch):
  pytest.importorskip('torch')
  path = _mmaction2_dump(tmp_path / 'mm.pkl', BONE, LABELS)
  monkeypatch.setitem(sys.modules, 'torch', None)  # `import torch` now fails: the torch-free reader is used
  if sys.modules.get('stgcn_jax.torch_pickle') is not None or _importable('stgcn_jax.torch_pickle'):
    res = results_lib.read_results(path)
    np.testing.assert_array_equal(res.scores, BONE)
    np.testing.assert_array_equal(res.labels, LABELS)
  monkeypatch.setitem(sys.modules, 'stgcn_jax.torch_pickle', None)
  with pytest.raises(ValueError, match='mm.pkl: holds torch tensors.*needs torch'):
    results_lib.read_results(path)


def _importable(name):
  import importlib.util
  return importlib.util.find_spec(name) is not None


# ------------------------------------------------------------------------------------------------ fusion
def test_fuse_reproduces_hand_computed_weighted_sum(tmp_path):
  j, b = _write(tmp_path, 'j.pkl', JOINT), _write(tmp_path, 'b.pkl', BONE)
  loaded = [results_lib.read_results(j), results_lib.read_results(b)]
  fused = fusion.fuse(loaded, [2, 1])
  assert fused.dtype == np.float64
  np.testing.assert_allclose(fused, FUSED_2_1, rtol=1e-6)
  out, acc = fusion.fuse_files([j, b], [2, 1])
  np.testing.assert_allclose(out.scores, FUSED_2_1, rtol=1e-6)
  # joint alone: 2/3 top-1 (sample 1 wrong); bone alone: 2/3 (sample 0 wrong); fused 2:1 argmax 0, 1, 2: all right
  assert acc == pytest.approx({'top1': 100.0, 'mean_class': 100.0})
  _, acc_j = fusion.fuse_files([j], [1])
  assert acc_j['top1'] == pytest.approx(200 / 3)


def test_fusion_arithmetic_is_mmaction2s():
  # mmaction2's get_weighted_score: numpy.dot of the stacked float32 scores with float64 coefficients. Summed in
  # float32 these two classes would tie (and argmax would pick class 0 only by position).
  j = np.array([[0.66753626, 0.6675362]], np.float32)
  b = np.array([[0.16501214, 0.16501218]], np.float32)
  float32_sum = j * np.float32(2) + b
  assert float32_sum[0, 0] == float32_sum[0, 1]
  fused = fusion.fuse([j, b], [2, 1])
  np.testing.assert_array_equal(fused, np.dot(np.stack([j, b]).T, np.array([2.0, 1.0])).T)
  assert fused.dtype == np.float64 and fused[0, 0] > fused[0, 1]
  if _importable('mmaction'):
    from stgcn_jax import torch_reference
    if torch_reference.import_mmaction()[0] is not None:
      from mmaction.evaluation.functional import get_weighted_score
      np.testing.assert_array_equal(fused, np.stack(get_weighted_score([list(j), list(b)], [2.0, 1.0])))


def test_fuse_with_softmax_hand_computed():
  logits = np.array([[0.0, np.log(3.0)]], np.float32)  # softmax -> [1/4, 3/4]
  fused = fusion.fuse([logits, logits], [1, 3], apply_softmax=True)
  np.testing.assert_allclose(fused, [[1.0, 3.0]], rtol=1e-6)


def test_four_stream_mixed_formats(tmp_path):
  pytest.importorskip('torch')
  rng = np.random.default_rng(0)
  streams = [rng.dirichlet(np.ones(6), size=3).astype(np.float32) for _ in range(4)]
  labels = np.array([5, 0, 3])
  paths = [results_lib.write_results(tmp_path / 'j.pkl', streams[0], labels, FRAME_DIRS),
           _mmaction2_dump(tmp_path / 'jm.pkl', streams[1], labels),       # mmaction2, no frame_dir
           _mmaction2_dump(tmp_path / 'b.pkl', streams[2], labels, FRAME_DIRS),
           results_lib.write_results(tmp_path / 'bm.pkl', streams[3], labels, FRAME_DIRS)]
  out, acc = fusion.fuse_files(paths, [2, 1, 2, 1])
  expected = 2 * streams[0] + streams[1] + 2 * streams[2] + streams[3]
  np.testing.assert_allclose(out.scores, expected, rtol=1e-6)
  assert out.frame_dirs == FRAME_DIRS
  pred = expected.argmax(1)
  assert acc['top1'] == pytest.approx(100 * np.mean(pred == labels))


@pytest.mark.parametrize('other, match', [
    (dict(frame_dirs=FRAME_DIRS[::-1], labels=LABELS[::-1]),
     r'same samples in a different order: sample 0 is .*A001.* in the first and .*A003.* in the second'),
    (dict(frame_dirs=FRAME_DIRS[:2] + ['S002C001P001R001A003']),
     r'different samples: sample 2 is .*S001C001P001R001A003.*S002C001P001R001A003'),
    (dict(labels=np.array([0, 2, 2])), r'disagree on the label of sample 1 .*A002.*: 1 vs 2'),
])
def test_mismatched_files_are_refused(tmp_path, other, match):
  a = _write(tmp_path, 'a.pkl', JOINT)
  b = results_lib.write_results(tmp_path / 'b.pkl', BONE, other.get('labels', LABELS),
                                other.get('frame_dirs', FRAME_DIRS))
  with pytest.raises(fusion.FusionMismatchError, match=match) as info:
    fusion.fuse_files([a, b], [1, 1])
  assert 'a.pkl and ' in str(info.value) and 'b.pkl' in str(info.value)


def test_mismatched_class_or_sample_count_is_refused(tmp_path):
  a = _write(tmp_path, 'a.pkl', JOINT)
  b = _write(tmp_path, 'b.pkl', np.ones((3, 4), np.float32))
  with pytest.raises(fusion.FusionMismatchError, match=r'a.pkl and .*b.pkl have 3 and 4 classes'):
    fusion.fuse_files([a, b])
  c = _write(tmp_path, 'c.pkl', JOINT[:2], labels=LABELS[:2], frame_dirs=FRAME_DIRS[:2])
  with pytest.raises(fusion.FusionMismatchError, match='have 3 and 2 samples'):
    fusion.fuse_files([a, c])


def test_without_frame_dirs_labels_decide(tmp_path):
  pytest.importorskip('torch')
  a = _write(tmp_path, 'a.pkl', JOINT)
  m = _mmaction2_dump(tmp_path / 'm.pkl', BONE, LABELS[::-1])
  with pytest.raises(fusion.FusionMismatchError, match=r'disagree on the label of sample 0 .*: 0 vs 2'):
    fusion.fuse_files([a, m])


def test_coefficient_count_must_match(tmp_path):
  with pytest.raises(ValueError, match='2 results but 3 coefficients'):
    fusion.fuse([JOINT, BONE], [1, 2, 3])
  with pytest.raises(ValueError, match=r'coefficients \[0.0, 0.0\] are all 0'):
    fusion.fuse([JOINT, BONE], [0, 0])


def test_frame_dirs_compared_whichever_file_has_them(tmp_path):
  # The first file (an mmaction2 dump) has no frame_dir: the second and third are compared with each other.
  pytest.importorskip('torch')
  m = _mmaction2_dump(tmp_path / 'm.pkl', BONE, LABELS)
  a = _write(tmp_path, 'a.pkl', JOINT)
  swapped = [FRAME_DIRS[2], FRAME_DIRS[1], FRAME_DIRS[0]]
  b = _write(tmp_path, 'b.pkl', BONE, labels=LABELS, frame_dirs=swapped)
  with pytest.raises(fusion.FusionMismatchError, match=r'a.pkl and .*b.pkl hold the same samples in a different '
                                                       r'order: sample 0'):
    fusion.fuse_files([m, a, b])


def test_unwritable_out_is_an_error_not_a_traceback(tmp_path, capsys):
  a = _write(tmp_path, 'a.pkl', JOINT)
  assert fusion.main(['--preds', str(a), '--out', str(tmp_path)]) == 2
  assert capsys.readouterr().err.startswith(f'error: --out {tmp_path}:')


def test_cli_prints_accuracies_and_writes_out(tmp_path, capsys):
  j, b = _write(tmp_path, 'j.pkl', JOINT), _write(tmp_path, 'b.pkl', BONE)
  out = tmp_path / 'fused.pkl'
  assert fusion.main(['--preds', str(j), str(b), '--coefficients', '2', '1', '--out', str(out)]) == 0
  text = capsys.readouterr().out
  assert 'top-1 accuracy: 100.00' in text and 'mean class accuracy: 100.00' in text
  assert 'top-5 accuracy: n/a' in text
  fused = results_lib.read_results(out)
  np.testing.assert_allclose(fused.scores, FUSED_2_1, rtol=1e-6)
  assert fused.frame_dirs == FRAME_DIRS and fused.meta['coefficients'] == [2.0, 1.0]
  assert fusion.main(['--preds', str(j), '--coefficients', '1']) == 0
  assert 'top-1 accuracy: 66.67' in capsys.readouterr().out


def test_cli_mismatch_exits_with_message(tmp_path, capsys):
  a = _write(tmp_path, 'a.pkl', JOINT)
  b = _write(tmp_path, 'b.pkl', BONE, labels=LABELS[::-1], frame_dirs=FRAME_DIRS[::-1])
  assert fusion.main(['--preds', str(a), str(b)]) == 2
  assert 'different order' in capsys.readouterr().err
