"""Per-sample skeleton transforms: pre-normalisation, j/b/jm/bm features, uniform frame sampling, GCN format.

Mirrors the mmaction2 1.2.0 skeleton pipeline of the STGCN++ configs (``mmaction/datasets/transforms/
pose_transforms.py`` and ``formatting.py``; pyskl has the same semantics), in this order:

  ``PreNormalize2D`` / ``PreNormalize3D`` -> ``GenSkeFeat(feats=[F])`` (``JointToBone``, ``ToMotion``) ->
  ``UniformSampleFrames(clip_len)`` -> ``PoseDecode`` -> ``FormatGCNInput(num_person=2)``

Every function is pure numpy: it never writes its inputs, never loops over frames in Python and never touches
numpy's global RNG. Training randomness comes in as a ``np.random.Generator`` (the pipeline's ``record_rng``, one
per stream position); a legacy ``np.random.RandomState`` is accepted too and then consumes exactly the draws mmaction2
makes on the global RNG (``randint`` / ``choice``, one clip after the other), which reproduces mmaction2's
seeded training samples. Test/val sampling seeds a *local* ``RandomState(255)`` at every call, as mmaction2
does with ``np.random.seed(255)``, so the indices are identical to mmaction2's.

Exactness (checked against the mmaction2 goldens in ``tests/test_transforms.py``):

* 2D runs in float32 exactly like the reference: ``x' = (x - w/2) / (w/2)``, two float32 roundings. The
  reference works in the keypoint's own dtype; a float16 annotation is widened to float32 first here (more
  precise than mmaction2, not bit-identical for float16 sources).
* 3D normalisation runs in float64 with the same operations as the reference (``np.cross``, the
  Euler-Rodrigues rotation, ``np.einsum``), so ``j``/``jm`` come out of float64 and ``b``/``bm`` out of
  float32 bones of float64 differences, bit-identical to mmaction2. The reference's 3-element ``np.dot`` /
  ``np.linalg.norm`` go through BLAS, whose result depends on the CPU (FMA kernels); here they are plain
  left-to-right sums, which match the goldens and are the same on every machine.

:func:`process_sample` (and :func:`process_keypoints`, its array form used by the data pipeline) composes
the steps above, but when the sampled frames are fewer than T (training clips) it normalises and computes
features only at the sampled frames (and their successors, for motion). Every step after the 3D frame
selection is per frame or per frame pair, so the result is identical; ``tests/test_transforms.py`` checks it
against the plain composition and the goldens.

Shape letters: M persons, T frames, V joints, C channels (2D: x, y, score; 3D: x, y, z).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from stgcn_jax.graph import Layout, get_layout

FEATS = ('j', 'b', 'jm', 'bm')
DEFAULT_IMG_SHAPE = (1080, 1920)  # (h, w), mmaction2's PreNormalize2D default
TEST_SEED = 255                   # mmaction2's UniformSampleFrames test-mode seed
_ABSENT_ATOL = 1e-8               # np.isclose(x, 0) default tolerance: a frame is empty when all |x| <= 1e-8

Rng = np.random.Generator | np.random.RandomState


# ----------------------------------------------------------------------------------------------------------
# 1. Pre-normalisation


def pre_normalize_2d(keypoint: np.ndarray, keypoint_score: np.ndarray | None = None,
                     img_shape: Sequence[int] | None = None) -> np.ndarray:
  """``PreNormalize2D``: pixel coordinates -> [-1, 1] by the image size, score appended as channel 2.

  Args:
    keypoint: ``(M, T, V, 2)`` pixel coordinates (or ``(M, T, V, 3)`` with the score already in channel 2).
    keypoint_score: ``(M, T, V)`` detection scores; required when ``keypoint`` has 2 channels.
    img_shape: ``(h, w)``; ``None`` means mmaction2's default 1080x1920.

  Returns:
    float32 ``(M, T, V, 3)``: ``x' = (x - w/2)/(w/2)``, ``y' = (y - h/2)/(h/2)``, score unchanged. An
    undetected joint stored as (0, 0) becomes (-1, -1), as in the reference.
  """
  kp = np.asarray(keypoint)
  if kp.ndim != 4 or kp.shape[-1] not in (2, 3):
    raise ValueError(f'pre_normalize_2d: keypoint has shape {kp.shape}, expected (M, T, V, 2) plus '
                     'keypoint_score, or (M, T, V, 3) with the score in channel 2')
  if kp.shape[-1] == 2:
    if keypoint_score is None:
      raise ValueError('pre_normalize_2d: keypoint has 2 channels but no keypoint_score was given; pass the '
                       '(M, T, V) scores (2D annotations always carry keypoint_score)')
    score = np.asarray(keypoint_score)
    if score.shape != kp.shape[:-1]:
      raise ValueError(f'pre_normalize_2d: keypoint_score has shape {score.shape}, expected {kp.shape[:-1]} '
                       '(the keypoint shape without its last axis)')
    kp = pack_2d(kp, score)
  return _pre_normalize_2d_packed(kp, img_shape)


def pack_2d(keypoint: np.ndarray, keypoint_score: np.ndarray) -> np.ndarray:
  """float32 ``(M, T, V, 3)`` = ``(x, y, score)`` from ``(M, T, V, 2)`` keypoints and ``(M, T, V)`` scores."""
  packed = np.empty(keypoint.shape[:-1] + (3,), dtype=np.float32)
  packed[..., :2] = keypoint
  packed[..., 2] = keypoint_score
  return packed


def _pre_normalize_2d_packed(x: np.ndarray, img_shape: Sequence[int] | None) -> np.ndarray:
  m, t, v, c = x.shape
  h, w = DEFAULT_IMG_SHAPE if img_shape is None else img_shape
  # float32 arithmetic with a Python-float w/2, as the reference (exact for any image size < 2**24). The score
  # channel goes through (s - 0) / 1, which leaves it bit-identical.
  sub, div = _pre_normalize_2d_constants(int(w), int(h), v)
  y = np.subtract(x.reshape(m, t, v * c), sub, dtype=np.float32)         # (M, T, V*C): long inner loops
  y /= div
  return y.reshape(m, t, v, c)


@functools.lru_cache(maxsize=64)
def _pre_normalize_2d_constants(w: int, h: int, v: int) -> tuple[np.ndarray, np.ndarray]:
  """The per-(joint, channel) float32 offset and divisor of :func:`pre_normalize_2d`, read-only."""
  sub = np.tile(np.array([w / 2, h / 2, 0], dtype=np.float32), v)
  div = np.tile(np.array([w / 2, h / 2, 1], dtype=np.float32), v)
  sub.flags.writeable = div.flags.writeable = False
  return sub, div


def _dot3(x: Any, y: Any) -> Any:
  """``x . y`` for 3-vectors, summed left to right without FMA.

  ``np.dot`` / ``np.linalg.norm`` call BLAS, whose 3-element kernels differ between CPUs (FMA or not); the
  mmaction2 goldens match plain left-to-right arithmetic, which is also the same on every machine.
  """
  dtype = np.result_type(np.asarray(x).dtype, np.asarray(y).dtype, np.float32)
  x, y = np.asarray(x, dtype=dtype), np.asarray(y, dtype=dtype)
  return x[0] * y[0] + x[1] * y[1] + x[2] * y[2]


def _angle_between(v1: np.ndarray, v2: np.ndarray) -> float:
  """Angle (radians) between ``v1`` and ``v2``; 0 if either is (nearly) zero."""
  if np.abs(v1).sum() < 1e-6 or np.abs(v2).sum() < 1e-6:
    return 0
  u1 = v1 / np.sqrt(_dot3(v1, v1))
  u2 = v2 / np.sqrt(_dot3(v2, v2))
  return np.arccos(np.clip(_dot3(u1, u2), -1.0, 1.0))


def _rotation_matrix(axis: np.ndarray, theta: float) -> np.ndarray:
  """Counter-clockwise rotation by ``theta`` about ``axis`` (Euler-Rodrigues parameters), float64 ``(3, 3)``.

  The arithmetic is kept in the reference's order so that the matrix is bit-identical to mmaction2's.
  """
  if np.abs(axis).sum() < 1e-6 or np.abs(theta) < 1e-6:
    return np.eye(3)
  axis = axis / np.sqrt(_dot3(axis, axis))
  a = np.cos(theta / 2.0)
  b, c, d = -axis * np.sin(theta / 2.0)
  aa, bb, cc, dd = a * a, b * b, c * c, d * d
  bc, ad, ac, ab, bd, cd = b * c, a * d, a * c, a * b, b * d, c * d
  return np.array([[aa + bb - cc - dd, 2 * (bc + ad), 2 * (bd - ac)],
                   [2 * (bc - ad), aa + cc - bb - dd, 2 * (cd + ab)],
                   [2 * (bd + ac), 2 * (cd - ab), aa + dd - bb - cc]])


def _center_and_mask(sk: np.ndarray, center: np.ndarray) -> np.ndarray:
  """``(x - center) * (joint != 0)`` in float32, as the reference (exactly-zero joints stay zero)."""
  m, t, v, c = sk.shape
  nz = sk != 0
  present = nz[..., 0] | nz[..., 1] | nz[..., 2]                          # (M, T, V) a joint is non-zero
  # Flattening (V, C) keeps the same per-element arithmetic and avoids numpy's slow length-3 inner loops.
  y = sk.reshape(m, t, v * c) - np.tile(center, v)                          # (M, T, V*C)
  y *= np.repeat(present, c, axis=-1).astype(np.float32)
  return y.reshape(m, t, v, c)


def _rotate(skeleton: np.ndarray, matrix: np.ndarray) -> np.ndarray:
  """``x @ R^T`` per point in float64, with the reference's ``einsum`` (its own summation order)."""
  return np.einsum('abcd,kd->abck', skeleton.astype(np.float64, copy=False), matrix)   # (M, T, V, 3)


def _alignment(frame0: np.ndarray, joints: Sequence[int], target: Sequence[int]) -> np.ndarray:
  """The rotation taking ``x[joints[1]] - x[joints[0]]`` of ``frame0`` (main person, ``(V, 3)``) to ``target``."""
  target = np.asarray(target)
  v = frame0[joints[1]] - frame0[joints[0]]
  return _rotation_matrix(np.cross(v, target), _angle_between(v, target))


class _Prenorm3DPlan(NamedTuple):
  """What PreNormalize3D does to one sequence, decided from the whole sequence and its first kept frame."""
  frames: np.ndarray        # int (T',): original frame index of each kept frame
  swap: bool                # persons 0 and 1 swapped (person 1 is the main person)
  body_center: np.ndarray   # float32 (3,)
  rot_z: np.ndarray | None  # float64 (3, 3), applied first; None: no spine alignment (zaxis=())
  rot_x: np.ndarray | None  # float64 (3, 3); None: no shoulder alignment (xaxis=())


def _plan_pre_normalize_3d(sk: np.ndarray, zaxis: Sequence[int], xaxis: Sequence[int]) -> _Prenorm3DPlan | None:
  """The frames, person order, centre and rotations of PreNormalize3D; ``None`` leaves the sequence as is."""
  if sk.sum() == 0:
    return None
  present = ~np.all(np.abs(sk) <= _ABSENT_ATOL, axis=(2, 3))              # (M, T) person present in frame
  counts = present.sum(axis=1)
  swap = bool(sk.shape[0] == 2 and counts[0] < counts[1])
  frames = np.flatnonzero(present[1] if swap else present[0])
  if frames.size == 0:     # only tiny non-zero values: mmaction2 fails here, we leave the sequence as is
    return None
  first = sk[::-1, frames[:1]] if swap else sk[:, frames[:1]]              # (M, 1, V, 3)
  num_joints = sk.shape[2]
  body_center = first[0, 0, 1 if num_joints == 25 else num_joints - 1].copy()
  first = _center_and_mask(first, body_center)
  rot_z = _alignment(first[0, 0], zaxis, (0, 0, 1)) if zaxis else None
  if rot_z is not None:
    first = _rotate(first[:1], rot_z)
  rot_x = _alignment(first[0, 0], (xaxis[1], xaxis[0]), (1, 0, 0)) if xaxis else None
  return _Prenorm3DPlan(frames, swap, body_center, rot_z, rot_x)


def _apply_pre_normalize_3d(sk: np.ndarray, plan: _Prenorm3DPlan, kept: np.ndarray | slice) -> np.ndarray:
  """float64 ``(M, len(kept), V, 3)``: the normalised frames ``kept`` (indices into ``plan.frames``).

  Every step after the frame selection is per point, so normalising a subset of frames gives exactly the
  values of normalising all of them and then indexing.
  """
  frames = plan.frames[kept]
  x = sk[::-1, frames] if plan.swap else sk[:, frames]                     # (M, T', V, 3)
  x = _center_and_mask(x, plan.body_center)
  for rot in (plan.rot_z, plan.rot_x):
    if rot is not None:
      x = _rotate(x, rot)
  return x


def _check_3d(sk: np.ndarray, zaxis: Sequence[int], xaxis: Sequence[int]) -> None:
  if sk.ndim != 4 or sk.shape[-1] != 3:
    raise ValueError(f'pre_normalize_3d: keypoint has shape {sk.shape}, expected (M, T, V, 3)')
  needed = max((*zaxis, *xaxis), default=-1)
  if sk.shape[2] <= needed:
    raise ValueError(f'pre_normalize_3d: the alignment joints zaxis={tuple(zaxis)}, xaxis={tuple(xaxis)} need '
                     f'at least {needed + 1} joints, the keypoints have V={sk.shape[2]}; pass zaxis/xaxis for '
                     'this skeleton (or () to skip that rotation)')


def pre_normalize_3d(keypoint: np.ndarray, zaxis: Sequence[int] = (0, 1), xaxis: Sequence[int] = (8, 4)
                     ) -> tuple[np.ndarray, np.ndarray | None]:
  """``PreNormalize3D``: drop empty frames, put the main person first, centre and rotate (float64).

  1. A person is present in a frame unless all its coordinates are ``|x| <= 1e-8``. The main person is
     person 0, or person 1 when it is present in more frames (then the two are swapped); only the frames
     where the main person is present are kept.
  2. Subtract joint 1 of frame 0 of the main person (the last joint for layouts that are not 25-joint NTU);
     joints that are exactly zero stay zero.
  3. Rotate so that ``joint[zaxis[1]] - joint[zaxis[0]]`` lies along +z, then so that
     ``joint[xaxis[0]] - joint[xaxis[1]]`` lies along +x (both from frame 0 of the main person). An empty
     ``zaxis`` / ``xaxis`` skips that rotation (mmaction2's ``align_spine`` / ``align_shoulder=False``).

  Args:
    keypoint: ``(M, T, V, 3)``. mmaction2 accepts M in {1, 2}; for M > 2 only the first two persons are
      kept (the ones ``FormatGCNInput`` keeps anyway).

  Returns:
    ``(keypoint, body_center)``: float64 ``(M, T', V, 3)`` (float32 when both rotations are skipped) and
    the float32 ``(3,)`` centre that was subtracted. An all-zero input is returned unchanged (its own dtype,
    all frames) with ``body_center`` ``None``, as in the reference; so is an input in which the main person
    is never present (mmaction2 raises on it).
  """
  sk = np.asarray(keypoint)
  _check_3d(sk, zaxis, xaxis)
  sk = sk[:2]
  plan = _plan_pre_normalize_3d(sk, zaxis, xaxis)
  if plan is None:
    return sk, None
  return _apply_pre_normalize_3d(sk, plan, slice(None)), plan.body_center


# ----------------------------------------------------------------------------------------------------------
# 2. Features (GenSkeFeat)


def bone_parents(layout: str | Layout | Mapping) -> np.ndarray:
  """``parent[v1] = v2`` for every bone pair of the layout (``bone[v1] = x[v1] - x[v2]``), int ``(V,)``."""
  layout = get_layout(layout)
  parents = np.empty(layout.num_node, dtype=np.intp)
  for v1, v2 in layout.bone_pairs:
    parents[v1] = v2
  return parents


def joint_to_bone(x: np.ndarray, parents: np.ndarray, has_score: bool) -> np.ndarray:
  """``JointToBone``: float32 ``(M, T, V, C)`` bones ``x[v1] - x[v2]``; with a score channel (2D) channel 2
  becomes the mean of the two joints' scores."""
  m, t, v, c = x.shape
  rows = x.reshape(m * t, v * c)                                           # (M*T, V*C): long inner loops
  cols = (parents[:, None] * c + np.arange(c)).ravel()                     # column of x[v2, ch] for (v1, ch)
  other = rows[:, cols]
  bone = (rows - other).astype(np.float32, copy=False)
  if has_score:
    bone[:, 2::c] = (rows[:, 2::c] + other[:, 2::c]) / 2
  return bone.reshape(m, t, v, c)


def to_motion(x: np.ndarray, has_score: bool) -> np.ndarray:
  """``ToMotion``: ``x[t+1] - x[t]`` along T (same dtype), the last frame all zero; with a score channel (2D)
  channel 2 becomes the mean of the two frames' scores."""
  m, t, v, c = x.shape
  x = x.reshape(m, t, v * c)                                               # (M, T, V*C)
  motion = np.zeros_like(x)
  np.subtract(x[:, 1:], x[:, :-1], out=motion[:, :-1])
  if has_score:
    motion[:, :-1, 2::c] = (x[:, :-1, 2::c] + x[:, 1:, 2::c]) / 2
  return motion.reshape(m, t, v, c)


def _check_feats(feat: str | Sequence[str]) -> tuple[str, ...]:
  feats = (feat,) if isinstance(feat, str) else tuple(feat)
  bad = [f for f in feats if f not in FEATS]
  if not feats or bad:
    raise ValueError(f'unknown skeleton feature {feat!r}; use one of {FEATS} (or a sequence of them)')
  return feats


def skeleton_features(x: np.ndarray, feat: str | Sequence[str], parents: np.ndarray, has_score: bool
                      ) -> np.ndarray:
  """``GenSkeFeat``: the ``j``, ``b``, ``jm`` or ``bm`` stream of ``(M, T, V, C)`` keypoints.

  Motion is taken on the full sequence (before frame sampling), as in the reference. A sequence of feats
  is concatenated along C (``MergeSkeFeat``). ``j``/``jm`` keep the input dtype (float64 after 3D
  normalisation), ``b``/``bm`` are float32 like mmaction2's bone buffer.
  """
  feats = _check_feats(feat)
  bone = joint_to_bone(x, parents, has_score) if ('b' in feats or 'bm' in feats) else None
  streams = {'j': lambda: x, 'b': lambda: bone, 'jm': lambda: to_motion(x, has_score),
             'bm': lambda: to_motion(bone, has_score)}
  out = [streams[f]() for f in feats]
  return out[0] if len(out) == 1 else np.concatenate(out, axis=-1)


# ----------------------------------------------------------------------------------------------------------
# 3. Uniform frame sampling (UniformSampleFrames)


def _randint(rng: Rng, high: Any) -> Any:
  """Uniform integers in ``[0, high)`` (``high`` a scalar or an array)."""
  if isinstance(rng, np.random.RandomState):
    return rng.randint(high)
  return rng.integers(high)


def _clip_indices(num_frames: int, clip_len: int, clip: int, num_clips: int, rng: Rng, test_mode: bool
                  ) -> np.ndarray:
  """Indices (before ``mod T``) of one clip; consumes the RNG exactly like mmaction2 for a RandomState."""
  if num_frames < clip_len:
    if test_mode:
      start = clip if num_frames < num_clips else clip * num_frames // num_clips
    else:
      start = _randint(rng, num_frames)
    return np.arange(start, start + clip_len)
  if num_frames < 2 * clip_len:
    # Keep clip_len consecutive frames and skip T - clip_len random ones: a frame after k skipped gaps moves k.
    skips = rng.choice(clip_len + 1, num_frames - clip_len, replace=False)
    shift = np.zeros(clip_len + 1, dtype=np.int64)
    shift[skips] = 1
    return np.arange(clip_len) + np.cumsum(shift)[:-1]
  # One random frame in each of clip_len equal bins.
  bounds = np.arange(clip_len + 1) * num_frames // clip_len
  return bounds[:-1] + _randint(rng, np.diff(bounds))


def uniform_sample_indices(num_frames: int, clip_len: int = 100, num_clips: int = 1, *, rng: Rng
                           ) -> np.ndarray:
  """Training ``UniformSampleFrames``: int ``(num_clips * clip_len,)`` frame indices in ``[0, T)``.

  Three regimes per clip: ``T < clip_len``: a random start, looping (``mod T``); ``clip_len <= T <
  2 clip_len``: ``clip_len`` frames in order with ``T - clip_len`` random frames left out; ``T >=
  2 clip_len``: one random frame in each of ``clip_len`` equal bins.

  Args:
    rng: a ``np.random.Generator`` (e.g. ``pipeline.record_rng``), or a ``np.random.RandomState`` to make
      the same draws, in the same order, as mmaction2 on the legacy global RNG.
  """
  _check_sampling(num_frames, clip_len, num_clips)
  if not isinstance(rng, (np.random.Generator, np.random.RandomState)):
    raise TypeError(f'rng must be a np.random.Generator or np.random.RandomState, got {type(rng).__name__}; '
                    'use np.random.default_rng(seed) (never the global np.random functions)')
  inds = [_clip_indices(num_frames, clip_len, i, num_clips, rng, False) for i in range(num_clips)]
  return np.concatenate(inds) % num_frames


@functools.lru_cache(maxsize=4096)
def _test_indices_cached(num_frames: int, clip_len: int, num_clips: int, seed: int) -> np.ndarray:
  rng = np.random.RandomState(seed)     # local: mmaction2 reseeds the *global* RNG here, we never do
  inds = np.concatenate([_clip_indices(num_frames, clip_len, i, num_clips, rng, True) for i in range(num_clips)])
  inds = inds % num_frames
  inds.flags.writeable = False
  return inds


def test_sample_indices(num_frames: int, clip_len: int = 100, num_clips: int = 10, seed: int = TEST_SEED
                        ) -> np.ndarray:
  """Test/val ``UniformSampleFrames(test_mode=True)``: the exact indices mmaction2 produces.

  mmaction2 calls ``np.random.seed(255)`` at every call, so the indices depend only on ``(T, clip_len,
  num_clips)``; they are computed with a local ``RandomState(255)`` and cached (read-only array). For
  ``T < clip_len`` clip i starts at ``i`` (``T < num_clips``) or ``i*T // num_clips`` and loops.
  """
  _check_sampling(num_frames, clip_len, num_clips)
  return _test_indices_cached(int(num_frames), int(clip_len), int(num_clips), int(seed))


def _check_sampling(num_frames: int, clip_len: int, num_clips: int) -> None:
  if num_frames < 1:
    raise ValueError(f'cannot sample frames from a sequence of {num_frames} frames; zero-length samples must be '
                     'skipped when the annotations are loaded')
  if clip_len < 1 or num_clips < 1:
    raise ValueError(f'clip_len and num_clips must be positive, got clip_len={clip_len}, num_clips={num_clips}')


# ----------------------------------------------------------------------------------------------------------
# 4. Decode + FormatGCNInput


def format_gcn_input(x: np.ndarray, num_clips: int, num_person: int = 2) -> np.ndarray:
  """``FormatGCNInput``: ``(M, nc*T, V, C)`` -> float32 ``(nc, num_person, T, V, C)``, persons zero-padded or
  truncated to ``num_person``."""
  total = x.shape[1]
  if total % num_clips:
    raise ValueError(f'format_gcn_input: {total} frames cannot be split into {num_clips} clips')
  return _gather_format(x, np.arange(total), num_clips, num_person)


def _gather_format(x: np.ndarray, inds: np.ndarray, num_clips: int, num_person: int,
                   out: np.ndarray | None = None) -> np.ndarray:
  """``format_gcn_input(x[:, inds])`` (PoseDecode + FormatGCNInput) as one gather into the output layout,
  written into ``out`` (C-contiguous float32 of the result's shape) when given."""
  m, t, v, c = x.shape
  keep = min(m, num_person)
  clip_len = inds.size // num_clips
  shape = (num_clips, num_person, clip_len, v, c)
  if out is None:
    out = np.empty(shape, np.float32)
  elif out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous or not out.flags.writeable:
    raise ValueError(f'out must be a writeable C-contiguous float32 array of shape {shape}, got {out.dtype} '
                     f'{out.shape}')
  rows = x[:keep].reshape(keep * t, v * c).astype(np.float32, copy=False)  # (M*T, V*C)
  # Row of (clip i, person p, frame k) = p*T + inds[i*clip_len + k]: (nc, M, clip_len) -> (nc, M, clip_len, V*C)
  idx = np.arange(keep)[None, :, None] * t + inds.reshape(num_clips, 1, clip_len)
  flat = out.reshape(num_clips, num_person, clip_len, v * c)              # a view: out is contiguous
  # Every index is in range, so mode='clip' changes nothing but lets take write into `flat` unbuffered.
  np.take(rows, idx, axis=0, out=flat if keep == num_person else flat[:, :keep], mode='clip')
  flat[:, keep:] = 0
  return out


def _pair_motion(cur: np.ndarray, nxt: np.ndarray, last: np.ndarray, has_score: bool) -> np.ndarray:
  """``to_motion`` evaluated only at sampled frames: ``nxt`` holds frame t+1 of each frame t in ``cur``."""
  motion = nxt - cur
  if has_score:
    motion[..., 2] = (cur[..., 2] + nxt[..., 2]) / 2
  motion[:, last] = 0       # the last original frame has zero motion in every channel
  return motion


@functools.lru_cache(maxsize=64)
def _bone_parents_cached(layout: Layout) -> np.ndarray:
  parents = bone_parents(layout)
  parents.flags.writeable = False
  return parents


def process_keypoints(keypoint: np.ndarray, *, is_2d: bool, layout: str | Layout | Mapping,
                      feat: str | Sequence[str], clip_len: int = 100, num_clips: int = 1, test_mode: bool,
                      rng: Rng | None = None, img_shape: Sequence[int] | None = None, num_person: int = 2,
                      out: np.ndarray | None = None) -> np.ndarray:
  """:func:`process_sample` on arrays: ``keypoint`` is ``(M, T, V, 3)``, for 2D packed as (x, y, score) pixels.

  ``out``, when given, is a C-contiguous float32 array of the result's shape ``(num_clips, num_person,
  clip_len, V, C)`` that receives the result (a batch row, say), and is returned.

  The result equals prenormalise -> features on the full sequence -> sample -> format (and is tested to be
  identical to it and to mmaction2), but it is computed only on the frames that are sampled (and their
  successors, for motion) when those are fewer than T: every step after the frame selection works per
  frame, or on frame pairs (t, t+1).
  """
  layout = get_layout(layout)
  feats = _check_feats(feat)
  kp = np.asarray(keypoint)
  if kp.ndim != 4 or kp.shape[2] != layout.num_node or kp.shape[3] != 3:
    raise ValueError(f'keypoint has shape {kp.shape}, expected (M, T, {layout.num_node}, 3) for layout '
                     f'{layout.name!r} ({"x, y, score" if is_2d else "x, y, z"})')
  parents = _bone_parents_cached(layout) if ('b' in feats or 'bm' in feats) else None
  if is_2d:
    x = kp[:num_person]
    num_frames = x.shape[1]
    normalize = lambda frames: _pre_normalize_2d_packed(x[:, frames], img_shape)
  else:
    zaxis, xaxis = layout.align_3d()
    _check_3d(kp, zaxis, xaxis)
    x = kp[:2]
    plan = _plan_pre_normalize_3d(x, zaxis, xaxis)
    if plan is None:
      num_frames = x.shape[1]
      normalize = lambda frames: x[:, frames]
    else:
      num_frames = plan.frames.size
      normalize = lambda frames: _apply_pre_normalize_3d(x, plan, frames)

  if test_mode:
    inds = test_sample_indices(num_frames, clip_len, num_clips)
  else:
    if rng is None:
      raise ValueError('training sampling (test_mode=False) needs rng, a np.random.Generator (one per record)')
    inds = uniform_sample_indices(num_frames, clip_len, num_clips, rng=rng)

  motion = 'jm' in feats or 'bm' in feats
  if inds.size * (2 if motion else 1) >= num_frames:
    # Sampling touches every frame anyway (e.g. 10 test clips): the plain order is the cheapest.
    full = skeleton_features(normalize(slice(None))[:num_person], feats, parents, is_2d)
    return _gather_format(full, inds, num_clips, num_person, out)
  else:
    cur = normalize(inds)                              # (M, nc*clip_len, V, 3)
    if motion:
      nxt = normalize(np.minimum(inds + 1, num_frames - 1))
      last = inds == num_frames - 1
    streams = []
    for f in feats:
      if f == 'j':
        streams.append(cur)
      elif f == 'b':
        streams.append(joint_to_bone(cur, parents, is_2d))
      elif f == 'jm':
        streams.append(_pair_motion(cur, nxt, last, is_2d))
      else:
        streams.append(_pair_motion(joint_to_bone(cur, parents, is_2d), joint_to_bone(nxt, parents, is_2d),
                                    last, is_2d))
    sel = streams[0] if len(streams) == 1 else np.concatenate(streams, axis=-1)
  return _gather_format(sel, np.arange(inds.size), num_clips, num_person, out)


def process_sample(sample: Mapping[str, Any], *, layout: str | Layout | Mapping, feat: str | Sequence[str],
                   clip_len: int = 100, num_clips: int = 1, test_mode: bool, rng: Rng | None = None,
                   num_person: int = 2) -> np.ndarray:
  """The whole STGCN++ per-sample pipeline: prenormalise -> feature -> sample -> format.

  Args:
    sample: ``keypoint`` ``(M, T, V, C)`` (C=2 with ``keypoint_score`` ``(M, T, V)`` for 2D, C=3 for 3D),
      optional ``img_shape`` ``(h, w)`` (2D; default 1080x1920), as returned by ``SkeletonDataset[i]``.
    layout: skeleton layout (bone pairs); V must match.
    feat: ``'j'``, ``'b'``, ``'jm'`` or ``'bm'`` (or a sequence, concatenated along C).
    num_clips: clips to sample (10 for the test protocol, 1 for val and training).
    test_mode: deterministic mmaction2 test/val sampling (``rng`` unused) or training sampling from ``rng``.
    rng: a ``np.random.Generator`` (or a legacy ``RandomState`` to replay mmaction2's seeded draws).

  Returns:
    float32 ``(num_clips, num_person, clip_len, V, C)``.
  """
  kp = np.asarray(sample['keypoint'])
  score = sample.get('keypoint_score')
  is_2d = score is not None
  if is_2d:
    if kp.ndim != 4 or kp.shape[-1] != 2 or np.shape(score) != kp.shape[:-1]:
      raise ValueError(f'2D sample: keypoint {kp.shape} and keypoint_score {np.shape(score)} should be '
                       '(M, T, V, 2) and (M, T, V)')
    kp = pack_2d(kp[:num_person], np.asarray(score)[:num_person])
  elif kp.ndim != 4 or kp.shape[-1] != 3:
    raise ValueError(f'keypoint has shape {kp.shape} and there is no keypoint_score; expected 3D (M, T, V, 3) '
                     'keypoints, or 2D (M, T, V, 2) keypoints with keypoint_score')
  return process_keypoints(kp, is_2d=is_2d, layout=layout, feat=feat, clip_len=clip_len, num_clips=num_clips,
                           test_mode=test_mode, rng=rng, img_shape=sample.get('img_shape'),
                           num_person=num_person)
