"""Skeleton transforms against the genuine mmaction2 pipeline goldens and hand-computed cases."""

import json

import numpy as np
import pytest

from stgcn_jax.data import transforms as T
from stgcn_jax.graph import get_layout
from stgcn_jax.safe_pickle import load_pickle

MODES = {'test': 10, 'val': 1, 'train_seeded': 1}
DIMS = {'2d': 'coco', '3d': 'nturgb+d'}


@pytest.fixture(scope='module', params=sorted(DIMS))
def golden(request, fixtures_dir):
  dim = request.param
  anno = load_pickle(fixtures_dir / f'ntu60_{dim}_synth.pkl')
  with np.load(fixtures_dir / f'pipeline_{dim}_synth.npz') as z:
    npz = dict(z)
  info = json.loads((fixtures_dir / f'pipeline_{dim}_synth.json').read_text())
  return dim, DIMS[dim], anno['annotations'], npz, info


def _rng_for(mode, npz, frame_dir):
  if mode != 'train_seeded':
    return None
  # mmaction2 ran np.random.seed(s) before the sample; a local RandomState(s) makes the same draws.
  return np.random.RandomState(int(npz[f'train_seeded/np_random_seed/{frame_dir}']))


@pytest.mark.parametrize('feat', T.FEATS)
@pytest.mark.parametrize('mode', sorted(MODES))
def test_process_sample_matches_mmaction2(golden, feat, mode):
  dim, layout, annos, npz, _ = golden
  for a in annos:
    fd = a['frame_dir']
    out = T.process_sample(a, layout=layout, feat=feat, clip_len=100, num_clips=MODES[mode],
                           test_mode=mode != 'train_seeded', rng=_rng_for(mode, npz, fd))
    ref = npz[f'{mode}/{feat}/{fd}']
    assert out.dtype == np.float32 and out.shape == ref.shape, (fd, out.shape, ref.shape)
    assert np.array_equal(out, ref), f'{dim} {mode} {feat} {fd}: max |diff| {np.abs(out - ref).max()}'


@pytest.mark.parametrize('mode', sorted(MODES))
def test_frame_indices_match_mmaction2(golden, mode):
  _, _, annos, npz, info = golden
  for a in annos:
    fd = a['frame_dir']
    num_frames = info['samples'][fd]['total_frames_after_prenormalize']
    if mode == 'train_seeded':
      inds = T.uniform_sample_indices(num_frames, 100, 1, rng=_rng_for(mode, npz, fd))
    else:
      inds = T.test_sample_indices(num_frames, 100, MODES[mode])
    assert np.array_equal(inds, npz[f'{mode}/frame_inds/{fd}']), (mode, fd)


def test_pre_normalize_3d_matches_mmaction2_in_float64(fixtures_dir):
  annos = load_pickle(fixtures_dir / 'ntu60_3d_synth.pkl')['annotations']
  with np.load(fixtures_dir / 'pipeline_3d_synth.npz') as z:
    for a in annos:
      fd = a['frame_dir']
      kp, center = T.pre_normalize_3d(a['keypoint'])
      ref = z[f'prenorm/keypoint/{fd}']
      assert kp.dtype == ref.dtype and np.array_equal(kp, ref), fd
      if 'allzero' in fd:
        assert center is None
      else:
        assert np.array_equal(center, z[f'prenorm/body_center/{fd}']), fd


def _compose(kp, score, img_shape, layout, feat, num_clips, test_mode, rng):
  """The pipeline written as the plain sequence of steps (prenormalise, features on all frames, sample)."""
  parents = T.bone_parents(layout)
  if score is not None:
    x = T.pre_normalize_2d(kp, score, img_shape)
  else:
    x = T.pre_normalize_3d(kp)[0]
  x = T.skeleton_features(x, feat, parents, has_score=score is not None)
  if test_mode:
    inds = T.test_sample_indices(x.shape[1], 100, num_clips)
  else:
    inds = T.uniform_sample_indices(x.shape[1], 100, num_clips, rng=rng)
  return T.format_gcn_input(x[:, inds].astype(np.float32), num_clips)


def _random_sample(rng, dim, m, t):
  if dim == '2d':
    kp = (rng.random((m, t, 17, 2)) * [640, 480]).astype(np.float32)
    score = rng.random((m, t, 17)).astype(np.float32)
    kp[rng.random((m, t)) < 0.2] = 0          # undetected persons
    return {'keypoint': kp, 'keypoint_score': score, 'img_shape': (480, 640)}
  kp = rng.normal(size=(m, t, 25, 3)).astype(np.float32)
  kp[:, :3] = 0                               # leading empty frames, dropped by PreNormalize3D
  if m > 1:
    kp[1, t // 2:] = 0
  return {'keypoint': kp}


@pytest.mark.parametrize('dim', sorted(DIMS))
def test_fast_path_equals_plain_composition(dim):
  """process_sample computes features only at sampled frames when that is cheaper; it must not change a bit."""
  rng = np.random.default_rng(0)
  for t in (5, 60, 103, 150, 199, 200, 257, 420):
    for m in (1, 2, 3):
      sample = _random_sample(rng, dim, m, t)
      for feat in (*T.FEATS, ('j', 'bm')):
        for num_clips, test_mode in ((1, False), (2, False), (10, True), (1, True)):
          seed = int(rng.integers(1 << 30))
          got = T.process_sample(sample, layout=DIMS[dim], feat=feat, num_clips=num_clips, test_mode=test_mode,
                                 rng=np.random.default_rng(seed))
          want = _compose(sample['keypoint'], sample.get('keypoint_score'), sample.get('img_shape'), DIMS[dim],
                          feat, num_clips, test_mode, np.random.default_rng(seed))
          assert np.array_equal(got, want), (dim, t, m, feat, num_clips, test_mode)


@pytest.mark.parametrize('dim', sorted(DIMS))
def test_out_buffer_receives_the_result_in_place(dim):
  """``out=`` (a batch row in the pipelines) gets exactly the returned result, padding persons zeroed."""
  rng = np.random.default_rng(1)
  for m, t in ((1, 50), (2, 300), (3, 120)):
    sample = _random_sample(rng, dim, m, t)
    kp = sample['keypoint'] if dim == '3d' else T.pack_2d(sample['keypoint'], sample['keypoint_score'])
    for feat, num_clips, test_mode in (('j', 10, True), ('bm', 1, False), ('b', 2, False)):
      kw = dict(is_2d=dim == '2d', layout=DIMS[dim], feat=feat, clip_len=40, num_clips=num_clips,
                test_mode=test_mode, img_shape=sample.get('img_shape'))
      want = T.process_keypoints(kp, rng=np.random.default_rng(5), **kw)
      out = np.full(want.shape, np.nan, np.float32)
      got = T.process_keypoints(kp, rng=np.random.default_rng(5), out=out, **kw)
      assert got is out and np.array_equal(out, want), (dim, m, t, feat)
  for bad in (np.empty((10, 2, 40, 17, 3), np.float64), np.empty((10, 2, 40, 17, 4), np.float32)[..., :3],
              np.empty((10, 2, 41, 17, 3), np.float32)):
    with pytest.raises(ValueError, match='out must be a writeable C-contiguous float32 array'):
      T.process_keypoints(np.zeros((2, 60, 17, 3), np.float32), is_2d=True, layout='coco', feat='j', clip_len=40,
                          num_clips=10, test_mode=True, out=bad)


def test_pre_normalize_2d_by_hand():
  kp = np.array([[[[0, 0], [1920, 1080], [960, 540], [480, 810]]]], dtype=np.float32)   # (1, 1, 4, 2)
  score = np.array([[[0.0, 0.5, 1.0, 0.25]]], dtype=np.float32)
  out = T.pre_normalize_2d(kp, score)                                   # default 1080x1920
  np.testing.assert_array_equal(out[0, 0], [[-1, -1, 0], [1, 1, 0.5], [0, 0, 1], [-0.5, 0.5, 0.25]])
  out = T.pre_normalize_2d(kp, score, img_shape=(1080, 3840))
  np.testing.assert_array_equal(out[0, 0, :, 0], [-1, 0, -0.5, -0.75])
  assert out.dtype == np.float32 and not np.shares_memory(out, kp)


def test_bone_and_motion_by_hand():
  layout = get_layout('coco')
  parents = T.bone_parents(layout)
  assert parents[0] == 0 and parents[1] == 0 and parents[3] == 1 and parents[16] == 14
  x = np.zeros((1, 3, 17, 3), dtype=np.float32)
  x[0, :, :, 0] = np.arange(17)                       # x coordinate = joint index
  x[0, :, :, 1] = np.arange(3)[:, None] * 10          # y = 10 * frame
  x[0, :, :, 2] = [[0.2], [0.4], [1.0]]               # score per frame
  x[0, 1, 5, 2] = 0.6
  bone = T.joint_to_bone(x, parents, has_score=True)
  f32 = np.float32
  np.testing.assert_array_equal(bone[0, 0, 3], np.array([3 - 1, 0, 0.2], f32))  # joint 3 - joint 1, mean score
  np.testing.assert_array_equal(bone[0, 0, 0], np.array([0, 0, 0.2], f32))      # centre bone (0, 0)
  np.testing.assert_array_equal(bone[0, 1, 7], [7 - 5, 0, (f32(0.4) + f32(0.6)) / 2])  # mean of the 2 scores
  motion = T.to_motion(x, has_score=True)
  np.testing.assert_array_equal(motion[0, 0, 4], [0, 10, (f32(0.2) + f32(0.4)) / 2])
  np.testing.assert_array_equal(motion[0, 2], 0)                                # last frame: all channels zero
  motion_3d = T.to_motion(x, has_score=False)
  np.testing.assert_array_equal(motion_3d[0, 0, 4], [0, 10, f32(0.4) - f32(0.2)])  # no score: plain difference
  ntu = T.bone_parents('nturgb+d')
  assert ntu[20] == 20 and ntu[21] == 22 and ntu[23] == 24 and ntu[0] == 1


def test_pre_normalize_3d_by_hand():
  """A skeleton whose hip->spine points along +y and shoulders along -z ends up spine +z, shoulders +x."""
  kp = np.zeros((1, 2, 25, 3), dtype=np.float32)
  kp[0, :, 0] = [0, 0, 2]          # hip
  kp[0, :, 1] = [0, 1, 2]          # spine: the centre
  kp[0, :, 4] = [0, 1, 2.5]        # left shoulder
  kp[0, :, 8] = [0, 1, 1.5]        # right shoulder: right - left = -z
  kp[0, 1, 10] = [1, 1, 2]         # a joint present only in frame 1
  out, center = T.pre_normalize_3d(kp)
  np.testing.assert_array_equal(center, [0, 1, 2])
  np.testing.assert_allclose(out[0, 0, 1], 0, atol=1e-12)
  np.testing.assert_allclose(out[0, 0, 1] - out[0, 0, 0], [0, 0, 1], atol=1e-12)
  np.testing.assert_allclose(out[0, 0, 8] - out[0, 0, 4], [1, 0, 0], atol=1e-12)
  assert np.array_equal(out[0, 0, 10], [0, 0, 0])             # a missing joint stays exactly zero
  assert out.dtype == np.float64


def test_pre_normalize_3d_drops_frames_and_swaps_persons():
  rng = np.random.default_rng(1)
  kp = rng.normal(size=(2, 10, 25, 3)).astype(np.float32)
  kp[0, :4] = 0                     # person 0 present in 6 frames, person 1 in 9
  kp[1, 9] = 0
  out, center = T.pre_normalize_3d(kp)
  assert out.shape == (2, 9, 25, 3)
  np.testing.assert_array_equal(center, kp[1, 0, 1])         # main person is person 1 now
  assert np.all(out[1, :3] == 0)                             # person 0 (now second) absent in kept frames 0-3
  zero = np.zeros((2, 7, 25, 3), np.float32)
  same, center = T.pre_normalize_3d(zero)
  assert center is None and same.dtype == np.float32 and same.shape == zero.shape


def test_sampling_regime_short_sequences_loop():
  rng = np.random.default_rng(0)
  starts = []
  for _ in range(400):
    inds = T.uniform_sample_indices(37, 100, 1, rng=rng)
    assert inds.shape == (100,) and inds.min() >= 0 and inds.max() < 37
    np.testing.assert_array_equal(inds, (inds[0] + np.arange(100)) % 37)   # consecutive frames, looping
    starts.append(inds[0])
  counts = np.bincount(starts, minlength=37)
  assert counts.min() > 0 and counts.max() < 30                 # uniform start over 0..36 (mean 10.8)


def test_sampling_regime_medium_sequences_skip_frames():
  rng = np.random.default_rng(0)
  kept = np.zeros(150)
  for _ in range(400):
    inds = T.uniform_sample_indices(150, 100, 1, rng=rng)
    assert inds.shape == (100,) and np.all(np.diff(inds) >= 1) and inds.min() >= 0 and inds.max() < 150
    assert np.all(np.diff(inds) <= 51)            # ordered, 50 frames left out in total
    kept[inds] += 1
  # Frame k is kept unless enough of the 101 gaps before it are chosen; the middle frames are kept ~2/3.
  assert 0.55 < kept[70:80].mean() / 400 < 0.78
  assert kept.min() > 0


def test_sampling_regime_long_sequences_one_frame_per_bin():
  rng = np.random.default_rng(0)
  hits = np.zeros(300)
  for _ in range(300):
    inds = T.uniform_sample_indices(300, 100, 1, rng=rng)
    bins = np.arange(101) * 300 // 100
    assert np.all(inds >= bins[:-1]) and np.all(inds < bins[1:])
    hits[inds] += 1
  assert hits.min() > 60 and hits.max() < 140          # each of the 3 frames of a bin ~ 1/3 of the time


def test_sampling_is_reproducible_and_never_touches_global_rng(golden):
  _, layout, annos, _, _ = golden
  np.random.seed(1234)
  state = np.random.get_state()
  for a in annos:
    a1 = T.process_sample(a, layout=layout, feat='jm', test_mode=False, rng=np.random.default_rng(7))
    a2 = T.process_sample(a, layout=layout, feat='jm', test_mode=False, rng=np.random.default_rng(7))
    np.testing.assert_array_equal(a1, a2)
    T.process_sample(a, layout=layout, feat='j', num_clips=10, test_mode=True)
  after = np.random.get_state()
  assert all(np.array_equal(x, y) for x, y in zip(state, after))


def test_test_indices_short_sequences():
  # T < num_clips: clip i starts at frame i; otherwise at i*T // num_clips. No randomness.
  inds = T.test_sample_indices(5, 100, 10).reshape(10, 100)
  np.testing.assert_array_equal(inds[:, 0], np.arange(10) % 5)
  inds = T.test_sample_indices(37, 100, 10).reshape(10, 100)
  np.testing.assert_array_equal(inds[:, 0], np.arange(10) * 37 // 10)
  np.testing.assert_array_equal(inds[3], (11 + np.arange(100)) % 37)
  assert not T.test_sample_indices(300, 100, 10).flags.writeable       # the cached array is read-only


def test_format_gcn_input_pads_and_truncates():
  x = np.arange(3 * 20 * 2 * 1, dtype=np.float32).reshape(3, 20, 2, 1)    # M=3, 2 clips of 10 frames
  out = T.format_gcn_input(x, num_clips=2)
  assert out.shape == (2, 2, 10, 2, 1)
  np.testing.assert_array_equal(out[1, 0], x[0, 10:])
  np.testing.assert_array_equal(out[0, 1], x[1, :10])
  out = T.format_gcn_input(x[:1], num_clips=1)
  np.testing.assert_array_equal(out[0, 0], x[0])
  np.testing.assert_array_equal(out[0, 1], 0)


def test_multiple_features_concatenate_along_channels(golden):
  _, layout, annos, _, _ = golden
  a = annos[1]
  both = T.process_sample(a, layout=layout, feat=('b', 'jm'), num_clips=10, test_mode=True)
  sep = [T.process_sample(a, layout=layout, feat=f, num_clips=10, test_mode=True) for f in ('b', 'jm')]
  np.testing.assert_array_equal(both, np.concatenate(sep, axis=-1))


def test_errors_are_explicit():
  sample = {'keypoint': np.zeros((1, 10, 17, 2), np.float32), 'keypoint_score': np.zeros((1, 10, 17), np.float32)}
  with pytest.raises(ValueError, match='unknown skeleton feature'):
    T.process_sample(sample, layout='coco', feat='x', test_mode=True)
  with pytest.raises(ValueError, match='needs rng'):
    T.process_sample(sample, layout='coco', feat='j', test_mode=False)
  with pytest.raises(ValueError, match=r'expected \(M, T, 25, 3\)'):
    T.process_sample(sample, layout='nturgb+d', feat='j', test_mode=True)
  with pytest.raises(TypeError, match='np.random.Generator'):
    T.uniform_sample_indices(10, 100, rng=np.random)
  with pytest.raises(ValueError, match='zero-length'):
    T.test_sample_indices(0, 100, 1)
