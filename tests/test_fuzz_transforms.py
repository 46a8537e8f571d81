"""Property-based tests of the per-sample pipeline over random shapes, lengths, persons and values.

Whatever a valid annotation holds (any finite values, 1 to many frames and persons, 2D or 3D, sequences that
are all zero or have empty persons), ``process_sample`` / ``process_keypoints`` must return float32
``(num_clips, 2, clip_len, V, C)`` with only finite values, in train and test mode, for every feature.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stgcn_jax.data import transforms as T
from stgcn_jax.graph import get_layout

LAYOUTS = {True: 'coco', False: 'nturgb+d'}     # 2D COCO-17, 3D NTU-25 (the 3D alignment joints need V=25)
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# 3D alignment of |x| >~ 1e19 overflows float32 dot products as mmaction2's does (the clips stay finite).
pytestmark = pytest.mark.filterwarnings('ignore:overflow encountered:RuntimeWarning')


@st.composite
def samples(draw):
  is_2d = draw(st.booleans())
  v = get_layout(LAYOUTS[is_2d]).num_node
  m = draw(st.integers(1, 4))
  t = draw(st.sampled_from([1, 2, 3, draw(st.integers(4, 40)), draw(st.integers(41, 400))]))
  scale = draw(st.sampled_from([0.0, 1e-30, 1e-6, 1.0, 1e3, 1e6, 1e15, 1e30]))
  seed = draw(st.integers(0, 2**32 - 1))
  rng = np.random.default_rng(seed)
  kp = (rng.standard_normal((m, t, v, 2 if is_2d else 3)) * scale).astype(np.float32)
  # Empty persons and frames (all zero) as in real files: the second person absent in some frames, or in all.
  pattern = draw(st.sampled_from(['dense', 'person_absent', 'frames_absent', 'joints_zero', 'constant']))
  if pattern == 'person_absent' and m > 1:
    kp[1:] = 0
  elif pattern == 'frames_absent':
    kp[:, rng.random(t) < 0.5] = 0
  elif pattern == 'joints_zero':
    kp[..., rng.random(v) < 0.3, :] = 0
  elif pattern == 'constant':
    kp[:] = np.float32(scale)
  sample = {'keypoint': kp, 'total_frames': t}
  if is_2d:
    sample['keypoint_score'] = rng.uniform(0, 1, (m, t, v)).astype(np.float32)
    sample['img_shape'] = draw(st.sampled_from([(1080, 1920), (480, 640), (1, 1), (2**15, 2**15)]))
  return sample


def _check(out: np.ndarray, num_clips: int, clip_len: int, v: int, channels: int = 3) -> None:
  assert out.dtype == np.float32
  assert out.shape == (num_clips, 2, clip_len, v, channels)
  assert np.isfinite(out).all()


@FUZZ
@given(sample=samples(), feat=st.sampled_from(T.FEATS), clip_len=st.sampled_from([1, 5, 16, 100]),
       test_mode=st.booleans(), num_clips=st.sampled_from([1, 2, 10]), seed=st.integers(0, 2**31))
def test_process_sample_never_fails_and_gives_finite_float32_clips(sample, feat, clip_len, test_mode, num_clips,
                                                                   seed):
  is_2d = 'keypoint_score' in sample
  layout = LAYOUTS[is_2d]
  rng = None if test_mode else np.random.default_rng(seed)
  out = T.process_sample(sample, layout=layout, feat=feat, clip_len=clip_len, num_clips=num_clips,
                         test_mode=test_mode, rng=rng)
  v = get_layout(layout).num_node
  _check(out, num_clips, clip_len, v)
  m = sample['keypoint'].shape[0]
  if m == 1:
    assert not out[:, 1].any()                 # the missing second person is zero padding
  if not sample['keypoint'].any() and feat in ('j', 'b') and not is_2d:
    assert not out.any()                       # an all-zero 3D sequence stays zero (no alignment possible)
  # The same draw twice gives the same clips: sampling depends on the generator only.
  again = T.process_sample(sample, layout=layout, feat=feat, clip_len=clip_len, num_clips=num_clips,
                           test_mode=test_mode, rng=None if test_mode else np.random.default_rng(seed))
  np.testing.assert_array_equal(out, again)


@FUZZ
@given(sample=samples(), feats=st.lists(st.sampled_from(T.FEATS), min_size=1, max_size=4, unique=True),
       test_mode=st.booleans(), seed=st.integers(0, 2**31))
def test_process_keypoints_on_packed_arrays_matches_process_sample(sample, feats, test_mode, seed):
  is_2d = 'keypoint_score' in sample
  layout = LAYOUTS[is_2d]
  kp = sample['keypoint']
  packed = T.pack_2d(kp, sample['keypoint_score']) if is_2d else kp
  kwargs = dict(layout=layout, feat=feats, clip_len=8, num_clips=1, test_mode=test_mode)
  out = T.process_keypoints(packed, is_2d=is_2d, img_shape=sample.get('img_shape'),
                            rng=None if test_mode else np.random.default_rng(seed), **kwargs)
  _check(out, 1, 8, get_layout(layout).num_node, 3 * len(feats))
  ref = T.process_sample(sample, rng=None if test_mode else np.random.default_rng(seed), **kwargs)
  np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize('is_2d', [True, False])
def test_zero_persons(is_2d):
  """The loader skips samples with zero persons; the transforms, given one anyway, return zero clips."""
  v = get_layout(LAYOUTS[is_2d]).num_node
  sample = {'keypoint': np.zeros((0, 12, v, 2 if is_2d else 3), np.float32)}
  if is_2d:
    sample['keypoint_score'] = np.zeros((0, 12, v), np.float32)
  for feat in T.FEATS:
    for test_mode in (True, False):
      out = T.process_sample(sample, layout=LAYOUTS[is_2d], feat=feat, clip_len=16, num_clips=2,
                             test_mode=test_mode, rng=np.random.default_rng(0))
      _check(out, 2, 16, v)
      assert not out.any()
