"""Annotation loading: values, split order, the memory-mapped cache, and every validation error or skip."""

import logging
import os
import pickle
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from stgcn_jax.data import annotations as A
from stgcn_jax.data import transforms as T
from stgcn_jax.data.annotations import SkeletonDataset, load_annotations
from stgcn_jax.safe_pickle import UnsafePickleError, load_pickle


def _copy_fixture(fixtures_dir, tmp_path, dim):
  # Never build caches inside the shared fixtures folder: work on a copy.
  dst = tmp_path / f'ntu60_{dim}_synth.pkl'
  shutil.copy(fixtures_dir / f'ntu60_{dim}_synth.pkl', dst)
  return dst


def _sample(frame_dir, label=0, m=1, t=4, v=17, dim='2d', seed=0, **extra):
  rng = np.random.default_rng(seed)
  a = {'frame_dir': frame_dir, 'label': label, 'total_frames': t, 'img_shape': (480, 640),
       'original_shape': (480, 640)}
  if dim == '2d':
    a['keypoint'] = (rng.random((m, t, v, 2)) * 400).astype(np.float32)
    a['keypoint_score'] = rng.random((m, t, v)).astype(np.float32)
  else:
    a['keypoint'] = rng.normal(size=(m, t, v, 3)).astype(np.float32)
  a.update(extra)
  return a


def _write(path, annotations, split=None):
  split = {'train': [a['frame_dir'] for a in annotations if isinstance(a, dict) and 'frame_dir' in a]} \
      if split is None else split
  with open(path, 'wb') as f:
    pickle.dump({'split': split, 'annotations': annotations}, f, protocol=4)
  return path


@pytest.mark.parametrize('dim,layout', [('2d', 'coco'), ('3d', 'nturgb+d')])
def test_fixture_samples_round_trip_through_the_cache(fixtures_dir, tmp_path, dim, layout):
  path = _copy_fixture(fixtures_dir, tmp_path, dim)
  raw = load_pickle(path)
  for split in ('xsub_train', 'xsub_val'):
    ds = load_annotations(path, split, layout=layout, num_classes=60)
    want = [a for a in raw['annotations'] if a['frame_dir'] in set(raw['split'][split])]
    assert [str(f) for f in ds.frame_dirs] == [a['frame_dir'] for a in want]       # file order, as mmaction2
    np.testing.assert_array_equal(ds.labels, [a['label'] for a in want])
    assert ds.is_2d == (dim == '2d') and len(ds) == len(want) and ds.skipped == []
    for i, a in enumerate(want):
      s = ds[i]
      np.testing.assert_array_equal(s['keypoint'], a['keypoint'])
      assert s['keypoint'].dtype == np.float32 and s['total_frames'] == a['keypoint'].shape[1]
      assert s['img_shape'] == tuple(a['img_shape']) and s['label'] == a['label'] and s['frame_dir'] == a['frame_dir']
      if dim == '2d':
        np.testing.assert_array_equal(s['keypoint_score'], a['keypoint_score'])
      else:
        assert 'keypoint_score' not in s
  assert sorted(p.name.split('.')[-2] for p in tmp_path.iterdir() if p != path) == ['index', 'kp']


def test_dataset_samples_reproduce_the_goldens(fixtures_dir, tmp_path):
  path = _copy_fixture(fixtures_dir, tmp_path, '2d')
  ds = load_annotations(path, 'xsub_val', layout='coco')
  with np.load(fixtures_dir / 'pipeline_2d_synth.npz') as z:
    for i in range(len(ds)):
      out = T.process_sample(ds[i], layout='coco', feat='b', num_clips=10, test_mode=True)
      assert np.array_equal(out, z[f'test/b/{ds.frame_dirs[i]}'])


def test_second_load_reads_the_memmap_without_unpickling(fixtures_dir, tmp_path, monkeypatch):
  path = _copy_fixture(fixtures_dir, tmp_path, '3d')
  first = load_annotations(path, 'xsub_train', layout='nturgb+d')

  def no_unpickling(*args):
    raise AssertionError('the annotation pickle was read again')
  monkeypatch.setattr(A, 'load_pickle', no_unpickling)
  ds = load_annotations(path, 'xsub_train', layout='nturgb+d')
  assert isinstance(ds.keypoints, np.memmap)
  for i in range(len(ds)):
    np.testing.assert_array_equal(ds[i]['keypoint'], first[i]['keypoint'])
  # Workers receive the index only and reopen the memmap.
  blob = pickle.dumps(ds)
  assert len(blob) < 20_000
  clone = pickle.loads(blob)
  assert clone._keypoints is None
  np.testing.assert_array_equal(clone[3]['keypoint'], ds[3]['keypoint'])


def test_stale_cache_is_rebuilt(tmp_path):
  path = _write(tmp_path / 'a.pkl', [_sample('s0', label=1), _sample('s1', label=2)])
  assert load_annotations(path, 'train').labels.tolist() == [1, 2]
  old = sorted(p.name for p in tmp_path.glob('a.pkl.*'))
  time.sleep(0.01)
  _write(path, [_sample('s0', label=5), _sample('s1', label=2, t=9)])
  os.utime(path, ns=(time.time_ns(), time.time_ns()))
  ds = load_annotations(path, 'train')
  assert ds.labels.tolist() == [5, 2] and ds.total_frames.tolist() == [4, 9]
  new = sorted(p.name for p in tmp_path.glob('a.pkl.*'))
  assert len(new) == 2 and not set(old) & set(new)              # the stale cache files were removed


def test_cache_dir_argument_and_in_memory_fallback(tmp_path, monkeypatch, caplog):
  src = tmp_path / 'src'
  src.mkdir()
  path = _write(src / 'a.pkl', [_sample('s0'), _sample('s1', label=3)])
  ds = load_annotations(path, 'train', cache_dir=tmp_path / 'cache')
  assert ds.keypoints_path.startswith(str(tmp_path / 'cache')) and list(src.iterdir()) == [path]
  monkeypatch.setattr(A, '_cache_dirs', lambda source, cache_dir: [Path('/proc/no_cache_here')])
  with caplog.at_level(logging.WARNING):
    ds = load_annotations(tmp_path / 'src' / 'a.pkl', 'train')
  assert ds.keypoints_path is None and ds.labels.tolist() == [0, 3]
  assert 'no writable directory' in caplog.text


def test_split_none_selects_every_sample_and_float16_is_widened_exactly(tmp_path):
  a16 = _sample('h', m=2, t=3)
  a16['keypoint'] = a16['keypoint'].astype(np.float16)
  a16['keypoint_score'] = a16['keypoint_score'].astype(np.float16)
  del a16['img_shape'], a16['total_frames']                      # both optional
  path = _write(tmp_path / 'a.pkl', [_sample('f'), a16])
  ds = load_annotations(path, None, use_cache=False)
  assert len(ds) == 2 and ds[1]['img_shape'] is None and ds[1]['total_frames'] == 3
  np.testing.assert_array_equal(ds[1]['keypoint'], a16['keypoint'].astype(np.float32))
  np.testing.assert_array_equal(ds[1]['keypoint_score'], a16['keypoint_score'].astype(np.float32))


# ---------------------------------------------------------------------------------------------------------
# Validation: one test per bad input, each checking its specific message.


def _error(path, **kwargs):
  with pytest.raises(ValueError) as info:
    load_annotations(path, **{'split': 'train', **kwargs})
  message = str(info.value)
  assert str(path) in message, message
  return message


def test_unknown_split_lists_the_available_ones(tmp_path):
  path = _write(tmp_path / 'a.pkl', [_sample('s0')], split={'xsub_train': ['s0'], 'xsub_val': []})
  message = _error(path, split='xsub_tarin')
  assert "unknown split 'xsub_tarin'" in message and "['xsub_train', 'xsub_val']" in message


def test_split_naming_unknown_samples(tmp_path):
  path = _write(tmp_path / 'a.pkl', [_sample('s0')], split={'train': ['s0', 'ghost1', 'ghost2']})
  message = _error(path)
  assert "2 sample(s) that are not in" in message and "'ghost1', 'ghost2'" in message


def test_missing_keys(tmp_path):
  bad = _sample('s1')
  del bad['label']
  message = _error(_write(tmp_path / 'a.pkl', [_sample('s0'), bad]))
  assert "annotation 1 ('s1')" in message and "missing key(s) ['label']" in message


def test_keypoint_rank(tmp_path):
  bad = _sample('s1')
  bad['keypoint'] = bad['keypoint'][0]
  message = _error(_write(tmp_path / 'a.pkl', [_sample('s0'), bad]))
  assert "annotation 1 ('s1')" in message and 'rank 3' in message and 'expected rank 4' in message


def test_joints_not_matching_the_layout(tmp_path):
  path = _write(tmp_path / 'a.pkl', [_sample('s0', v=25, dim='3d')])
  message = _error(path, layout='coco')
  assert "V=25 joints but layout 'coco' has 17" in message and "'nturgb+d'" in message


@pytest.mark.parametrize('case', ['score_with_3_channels', 'no_score_with_2_channels'])
def test_channels_not_matching_the_modality(tmp_path, case):
  bad = _sample('s0')
  if case == 'score_with_3_channels':
    bad['keypoint'] = np.zeros((1, 4, 17, 3), np.float32)
    expected = 'C=3 channels and there is a keypoint_score'
  else:
    del bad['keypoint_score']
    expected = 'C=2 channels and no keypoint_score'
  message = _error(_write(tmp_path / 'a.pkl', [bad]))
  assert "annotation 0 ('s0')" in message and expected in message


def test_mixed_modalities_in_one_file(tmp_path):
  message = _error(_write(tmp_path / 'a.pkl', [_sample('s0'), _sample('s1', v=17, dim='3d')]))
  assert "annotation 1 ('s1')" in message and 'is 3D with V=17' in message and 'is 2D with V=17' in message


def test_total_frames_inconsistent(tmp_path):
  message = _error(_write(tmp_path / 'a.pkl', [_sample('s0', total_frames=7)]))
  assert "annotation 0 ('s0')" in message and 'total_frames is 7 but keypoint has T=4' in message


def test_total_frames_as_numpy_scalars_and_arrays(tmp_path):
  ok = [_sample('s0', total_frames=np.int64(4)), _sample('s1', total_frames=np.array([4])),
        _sample('s2', total_frames=4.0)]
  assert load_annotations(_write(tmp_path / 'a.pkl', ok), 'train').total_frames.tolist() == [4, 4, 4]
  message = _error(_write(tmp_path / 'b.pkl', [_sample('s0'), _sample('s1', total_frames=np.array([4, 4]))]))
  assert "annotation 1 ('s1'): total_frames is array([4, 4]) but keypoint has T=4" in message


def test_keypoint_score_shape(tmp_path):
  bad = _sample('s0')
  bad['keypoint_score'] = bad['keypoint_score'][:, :3]
  message = _error(_write(tmp_path / 'a.pkl', [bad]))
  assert 'keypoint_score has shape (1, 3, 17)' in message and 'expected a float array of shape (1, 4, 17)' in message


@pytest.mark.parametrize('label', [60, -1])
def test_label_out_of_range(tmp_path, label):
  message = _error(_write(tmp_path / 'a.pkl', [_sample('s0'), _sample('s1', label=label)]), num_classes=60)
  assert f"annotation 1 ('s1'): label {label} is outside [0, 60)" in message and 'num_classes' in message


def test_label_not_an_integer(tmp_path):
  message = _error(_write(tmp_path / 'a.pkl', [_sample('s0', label=3.0)]))
  assert 'label 3.0 is not an integer' in message


@pytest.mark.parametrize('where', ['keypoint', 'keypoint_score'])
def test_nan_or_inf(tmp_path, where):
  bad = _sample('s0', m=2)
  bad[where][1, 2, 3, ...] = np.nan if where == 'keypoint' else np.inf    # both x and y for keypoint
  message = _error(_write(tmp_path / 'a.pkl', [bad]))
  count = 2 if where == 'keypoint' else 1
  assert f"annotation 0 ('s0'): {where} has {count} NaN/Inf" in message
  if where == 'keypoint':
    assert '(1, 2, 3, 0)' in message


@pytest.mark.parametrize('where', ['keypoint', 'keypoint_score'])
def test_float64_values_beyond_float32_are_refused(tmp_path, where):
  bad = _sample('s1')
  bad[where] = bad[where].astype(np.float64)
  bad[where][0, 1, 2, ...] = -1e39                        # finite in float64, infinite once stored as float32
  good = _sample('s0')
  good[where] = good[where].astype(np.float64)
  message = _error(_write(tmp_path / 'a.pkl', [good, bad]))
  assert f"annotation 1 ('s1'): {where} has values up to 1e+39 in magnitude, beyond float32" in message


def test_a_directory_is_not_an_annotation_file(tmp_path):
  with pytest.raises(IsADirectoryError, match=f"{tmp_path}' is a directory; give the path of the .pkl"):
    load_annotations(tmp_path, 'train')


def test_repeated_frame_dirs_load_but_are_refused_for_results(tmp_path):
  path = _write(tmp_path / 'a.pkl', [_sample('a'), _sample('v', seed=1), _sample('b'), _sample('v', seed=2)],
                split={'train': ['a', 'v'], 'val': ['b', 'a']})
  train = load_annotations(path, 'train')
  assert train.frame_dirs.tolist() == ['a', 'v', 'v']   # every annotation the split names, as mmaction2
  with pytest.raises(ValueError, match=r"split 'train' has 1 repeated frame_dir\(s\): 'v' names annotations "
                     r"\[1, 3\]\. Results files identify samples by frame_dir"):
    train.check_unique_frame_dirs()
  load_annotations(path, 'val').check_unique_frame_dirs()   # a split without the repeated name


def test_bad_img_shape(tmp_path):
  message = _error(_write(tmp_path / 'a.pkl', [_sample('s0', img_shape=(480,))]))
  assert 'img_shape is (480,)' in message and '(height, width)' in message


def test_not_an_annotation_file(tmp_path):
  path = tmp_path / 'a.pkl'
  path.write_bytes(pickle.dumps([1, 2, 3]))
  assert 'expected the mmaction2/pyskl format' in _error(path)
  path.write_bytes(pickle.dumps({'annotations': [_sample('s0')]}))
  assert 'has no "split" dict' in _error(path)
  path.write_bytes(b'\x80\x04not really a pickle')
  assert 'not a readable pickle' in _error(path)


def test_zero_length_samples_are_skipped_counted_and_logged(tmp_path, caplog):
  annos = [_sample('s0'), _sample('empty_t', t=0), _sample('s2', label=7), _sample('empty_m', m=0)]
  path = _write(tmp_path / 'a.pkl', annos)
  with caplog.at_level(logging.WARNING, logger='stgcn_jax.data.annotations'):
    ds = load_annotations(path, 'train')
  assert len(ds) == 2 and ds.frame_dirs.tolist() == ['s0', 's2'] and ds.labels.tolist() == [0, 7]
  assert ds.skipped == ['empty_t', 'empty_m']
  assert "skipped 2 sample(s) of split 'train'" in caplog.text and "'empty_t', 'empty_m'" in caplog.text


def test_failed_build_leaves_no_cache_files(tmp_path):
  path = _write(tmp_path / 'a.pkl', [_sample('s0'), _sample('s1', total_frames=1)])
  _error(path)
  assert list(tmp_path.iterdir()) == [path]


def test_malicious_annotation_file_is_refused_and_runs_nothing(tmp_path):
  marker = tmp_path / 'pwned'

  class Payload:
    def __reduce__(self):
      return (os.system, (f'touch {marker}',))
  path = tmp_path / 'evil.pkl'
  path.write_bytes(pickle.dumps({'split': {'train': ['s0']}, 'annotations': [Payload()]}))
  with pytest.raises(UnsafePickleError, match='may be malicious'):
    load_annotations(path, 'train')
  assert not marker.exists()


def test_dataset_index_errors(tmp_path):
  ds = load_annotations(_write(tmp_path / 'a.pkl', [_sample('s0')]), 'train', use_cache=False)
  assert isinstance(ds, SkeletonDataset) and ds[-1]['frame_dir'] == 's0'
  with pytest.raises(IndexError, match='out of range for 1 samples'):
    ds[1]
