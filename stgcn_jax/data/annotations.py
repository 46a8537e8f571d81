"""Skeleton annotation files: safe loading, validation at load time, and a memory-mapped cache.

Mirrors mmaction2's ``PoseDataset`` (``mmaction/datasets/pose_dataset.py``; pyskl's is the same): an
annotation file is a pickle ``{'split': {name: [frame_dir, ...]}, 'annotations': [dict, ...]}`` and a split
selects, in file order, the annotations whose ``frame_dir`` it lists. Each annotation holds ``frame_dir``
(str), ``label`` (int), ``keypoint`` ``(M, T, V, C)`` (float16/32/64), optionally ``total_frames`` (= T),
``img_shape`` ``(h, w)`` and ``original_shape``; 2D files (``C = 2``) add ``keypoint_score`` ``(M, T, V)``,
3D files (``C = 3``) have none.

**Cache.** The published NTU pickles are over 1 GB; unpickling them in every worker and every run is slow and
memory hungry. The first load unpickles the file once (with :mod:`stgcn_jax.safe_pickle`, which refuses
anything but arrays and containers), validates every annotation, and writes two files:

* ``<name>.<fingerprint>.kp.npy``: every sample's keypoints concatenated, float32 ``(R, V, 3)``, R = sum of
  M*T (each sample person-major). 2D samples are packed as (x, y, score) pixels, 3D as (x, y, z). float16
  sources are widened exactly; float64 sources are rounded to float32.
* ``<name>.<fingerprint>.index.npz``: per sample the row offset, M, T, label, img_shape and frame_dir, plus
  the split lists and the file's modality (numpy arrays only, loaded with ``allow_pickle=False``).

They are written in ``cache_dir`` when one is given, else next to the annotation file, falling back to
``$STGCN_CACHE_DIR`` or ``~/.cache/stgcn_jax`` when that directory is not writable. The fingerprint is the source's size, its
mtime (ns) and a BLAKE2b hash of its first and last MiB (plus the cache format version): editing or
replacing the file gives a new fingerprint, so a stale cache is never used, it is rebuilt (and old caches
beside the file are removed). Later loads open the keypoints with ``np.load(mmap_mode='r')``: workers get
a few small index arrays when the dataset is pickled to them and read samples straight from the page cache,
with nothing unpickled per worker or per epoch. Writes go to temporary names and are renamed into place, so
concurrent builders (several hosts, several runs) never see a half-written cache.

**Validation policy.** Every problem raises a ``ValueError`` that names the file, the annotation's index in
``annotations`` and its ``frame_dir``, what was found, what was expected and how to fix it:

* the file is not a dict with an ``annotations`` list (and a ``split`` dict of lists of names when a split
  is requested); an annotation is not a dict or misses ``frame_dir``, ``label`` or ``keypoint``;
* ``keypoint`` is not a float array of rank 4 ``(M, T, V, C)``; ``C`` is not 2 (with ``keypoint_score``) or 3
  (without); the file mixes 2D and 3D samples or different V; V differs from the layout's joints;
* ``total_frames`` differs from the keypoint's T; ``keypoint_score`` is not ``(M, T, V)``; ``img_shape`` is
  not two positive integers; ``label`` is not an integer or not in ``[0, num_classes)``;
* NaN or infinite coordinates or scores;
* an unknown split name (the available ones are listed) or a split naming samples that are not in the file.

The one **skip**: samples with no frames (T = 0) or no persons (M = 0) carry no skeleton at all and
mmaction2 cannot sample them either. They are left out of the split, counted in
:attr:`SkeletonDataset.skipped` and listed in a logged warning; everything else is an error, because
silently dropping or patching a malformed sample would change the evaluation set.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stgcn_jax import files
from stgcn_jax.graph import Layout, get_layout
from stgcn_jax.safe_pickle import load_pickle

__all__ = ['SkeletonDataset', 'load_annotations', 'annotation_fingerprint', 'CACHE_VERSION']

_FLOAT32_MAX = float(np.finfo(np.float32).max)

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
_HASH_SPAN = 1 << 20          # bytes hashed at each end of the source for the fingerprint
_LIST_MAX = 10                # names listed in an error or warning before "... and N more"


def _preview(names: Sequence[str]) -> str:
  shown = ', '.join(repr(n) for n in names[:_LIST_MAX])
  return shown + (f' ... and {len(names) - _LIST_MAX} more' if len(names) > _LIST_MAX else '')


def annotation_fingerprint(path: str | os.PathLike) -> str:
  """A hex fingerprint of an annotation file: size, mtime and a hash of its first and last MiB."""
  path = Path(path)
  st = path.stat()
  h = hashlib.blake2b(digest_size=16)
  h.update(f'v{CACHE_VERSION}:{st.st_size}:{st.st_mtime_ns}:'.encode())
  with open(path, 'rb') as f:
    h.update(f.read(_HASH_SPAN))
    if st.st_size > _HASH_SPAN:
      f.seek(max(_HASH_SPAN, st.st_size - _HASH_SPAN))
      h.update(f.read(_HASH_SPAN))
  return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------
# The dataset


class SkeletonDataset:
  """The samples of one split, read from the memory-mapped cache (or from memory without one).

  ``ds[i]`` is a dict: ``keypoint`` float32 ``(M, T, V, C)`` (C=2 for 2D, 3 for 3D), ``keypoint_score``
  float32 ``(M, T, V)`` (2D only), ``total_frames`` (T), ``img_shape`` ``(h, w)`` or None when the file has
  none, ``label`` and ``frame_dir``. Pickling it (to Grain workers) sends the small index only; the
  keypoint memmap is reopened on first use.
  """

  def __init__(self, *, source: str, split: str | None, layout: Layout, num_classes: int, is_2d: bool,
               keypoints: np.ndarray | None, keypoints_path: str | None, rows: np.ndarray, persons: np.ndarray,
               frames: np.ndarray, labels: np.ndarray, img_shapes: np.ndarray, frame_dirs: np.ndarray,
               file_indices: np.ndarray, skipped: list[str]):
    self.source = source
    self.split = split
    self.layout = layout
    self.num_classes = num_classes
    self.is_2d = is_2d
    self.keypoints_path = keypoints_path
    self._keypoints = keypoints
    self._rows = rows                  # int64 (N,): first row of each sample in the flat (R, V, 3) array
    self.num_persons = persons         # int32 (N,): M
    self.total_frames = frames         # int32 (N,): T
    self.labels = labels               # int64 (N,)
    self._img_shapes = img_shapes      # int32 (N, 2), -1 where the file has none
    self.frame_dirs = frame_dirs       # str (N,)
    self.file_indices = file_indices   # int64 (N,): index in the file's ``annotations``
    self.skipped = skipped             # frame_dirs of the split left out (no frames or no persons)

  def __len__(self) -> int:
    return len(self.labels)

  def __repr__(self) -> str:
    return (f'SkeletonDataset({self.source!r}, split={self.split!r}, {len(self)} samples, '
            f'{"2D" if self.is_2d else "3D"}, layout={self.layout.name!r}, skipped={len(self.skipped)})')

  @property
  def keypoints(self) -> np.ndarray:
    """The flat float32 ``(R, V, 3)`` array of the whole file (memory-mapped when cached)."""
    if self._keypoints is None:
      self._keypoints = np.load(self.keypoints_path, mmap_mode='r')
    return self._keypoints

  def __getstate__(self) -> dict[str, Any]:
    state = dict(self.__dict__)
    if self.keypoints_path is not None:
      state['_keypoints'] = None        # workers reopen the memmap instead of receiving the data
    return state

  def _check_index(self, i: int) -> int:
    n = len(self)
    if not -n <= i < n:
      raise IndexError(f'sample index {i} out of range for {n} samples of split {self.split!r}')
    return i % n

  def img_shape(self, i: int) -> tuple[int, int] | None:
    h, w = self._img_shapes[i]
    return None if h < 0 else (int(h), int(w))

  def packed(self, i: int) -> np.ndarray:
    """Read-only float32 ``(M, T, V, 3)`` view of sample ``i``: (x, y, score) pixels for 2D, (x, y, z) for 3D."""
    i = self._check_index(i)
    m, t = int(self.num_persons[i]), int(self.total_frames[i])
    start = int(self._rows[i])
    return self.keypoints[start:start + m * t].reshape(m, t, self.layout.num_node, 3)

  def check_unique_frame_dirs(self) -> None:
    """Raises ValueError when the split names a ``frame_dir`` more than once.

    Training takes such a split as it is (the sample counts twice, as in mmaction2), but a results dump
    identifies each sample by its ``frame_dir`` (:mod:`stgcn_jax.results`), so an evaluation that writes one
    checks this before it starts.
    """
    names, first = np.unique(self.frame_dirs, return_index=True)
    if len(names) == len(self):
      return
    repeated = np.setdiff1d(np.arange(len(self)), first)[0]
    name = str(self.frame_dirs[repeated])
    where = [int(self.file_indices[j]) for j in np.flatnonzero(self.frame_dirs == name)]
    raise _fail(self.source, None, None, f'split {self.split!r} has {len(self) - len(names)} repeated frame_dir(s): '
                f'{name!r} names annotations {where}. Results files identify samples by frame_dir; give each '
                'sample of an evaluated split its own frame_dir')

  def __getitem__(self, i: int) -> dict[str, Any]:
    i = self._check_index(i)
    x = np.array(self.packed(i))                                       # a private, writable copy
    sample = {'total_frames': int(self.total_frames[i]), 'img_shape': self.img_shape(i),
              'label': int(self.labels[i]), 'frame_dir': str(self.frame_dirs[i])}
    if self.is_2d:
      sample['keypoint'] = np.ascontiguousarray(x[..., :2])             # (M, T, V, 2)
      sample['keypoint_score'] = np.ascontiguousarray(x[..., 2])        # (M, T, V)
    else:
      sample['keypoint'] = x                                            # (M, T, V, 3)
    return sample


# ----------------------------------------------------------------------------------------------------------
# Reading and validating the pickle


def _fail(source: str, i: int | None, frame_dir: Any, problem: str) -> ValueError:
  where = f'{source}: ' if i is None else f'{source}: annotation {i} ({frame_dir!r}): '
  return ValueError(where + problem)


class _FileIndex:
  """Everything about an annotation file except the keypoint values: what the cache's index.npz holds."""

  def __init__(self, *, is_2d: bool, num_joints: int, rows: np.ndarray, persons: np.ndarray, frames: np.ndarray,
               labels: np.ndarray, img_shapes: np.ndarray, frame_dirs: np.ndarray, splits: dict[str, list[str]] | None,
               fingerprint: str):
    self.is_2d = is_2d
    self.num_joints = num_joints
    self.rows, self.persons, self.frames = rows, persons, frames
    self.labels, self.img_shapes, self.frame_dirs = labels, img_shapes, frame_dirs
    self.splits = splits
    self.fingerprint = fingerprint

  def save(self, path: str) -> None:
    np.savez(path, rows=self.rows, persons=self.persons, frames=self.frames, labels=self.labels,
             img_shapes=self.img_shapes, frame_dirs=self.frame_dirs,
             meta=np.array(json.dumps({'version': CACHE_VERSION, 'fingerprint': self.fingerprint,
                                       'is_2d': self.is_2d, 'num_joints': self.num_joints,
                                       'splits': self.splits})))

  @classmethod
  def load(cls, path: str) -> _FileIndex:
    with np.load(path, allow_pickle=False) as z:
      meta = json.loads(str(z['meta']))
      if meta.get('version') != CACHE_VERSION:
        raise ValueError(f'cache format {meta.get("version")} != {CACHE_VERSION}')
      return cls(is_2d=bool(meta['is_2d']), num_joints=int(meta['num_joints']), rows=z['rows'],
                 persons=z['persons'], frames=z['frames'], labels=z['labels'], img_shapes=z['img_shapes'],
                 frame_dirs=z['frame_dirs'], splits=meta['splits'], fingerprint=meta['fingerprint'])


def _as_label(value: Any) -> int | None:
  if isinstance(value, (bool, np.bool_)):
    return None
  if isinstance(value, numbers.Integral):
    return int(value)
  if isinstance(value, np.ndarray) and value.shape in ((), (1,)) and value.dtype.kind in 'iu':
    return int(value.reshape(()))
  return None


def _as_count(value: Any) -> int | None:
  """An integer-valued scalar (Python or numpy, int or whole float) as an int; anything else None."""
  if isinstance(value, (bool, np.bool_)):
    return None
  if isinstance(value, np.ndarray) and value.shape in ((), (1,)):
    value = value.reshape(())[()]
  if isinstance(value, numbers.Integral):
    return int(value)
  if isinstance(value, numbers.Real) and float(value).is_integer():
    return int(value)
  return None


def _as_img_shape(value: Any) -> tuple[int, int] | None:
  try:
    h, w = (int(v) for v in value)
    if all(isinstance(v, numbers.Integral) or float(v).is_integer() for v in value) and h > 0 and w > 0:
      return h, w
  except (TypeError, ValueError):
    pass
  return None


def _validate_sample(source: str, i: int, a: Any, labels: bool = True
                     ) -> tuple[np.ndarray, np.ndarray | None, int, tuple[int, int] | None]:
  """Checks one annotation; returns (keypoint, keypoint_score or None, label, img_shape or None). With
  ``labels=False`` the label is optional and unchecked: -1 where it is missing or not a class index."""
  if not isinstance(a, Mapping):
    raise _fail(source, i, None, f'is a {type(a).__name__}, expected a dict with frame_dir, label, keypoint, ...')
  frame_dir = a.get('frame_dir')
  missing = [k for k in ('frame_dir', 'label', 'keypoint') if k not in a and (labels or k != 'label')]
  if missing:
    raise _fail(source, i, frame_dir, f'missing key(s) {missing}; every annotation needs frame_dir (str), label '
                f'(int) and keypoint (M, T, V, C) (it has {sorted(map(str, a))}). Regenerate the file or add them')
  if not isinstance(frame_dir, str):
    raise _fail(source, i, frame_dir, f'frame_dir is a {type(frame_dir).__name__}, expected a str (the sample name)')
  label = _as_label(a.get('label'))
  if label is None and labels:
    raise _fail(source, i, frame_dir, f'label {a["label"]!r} is not an integer class index')
  label = -1 if label is None else label
  kp = a['keypoint']
  if not isinstance(kp, np.ndarray) or kp.dtype.kind != 'f':
    kind = f'{type(kp).__name__} of {kp.dtype}' if isinstance(kp, np.ndarray) else type(kp).__name__
    raise _fail(source, i, frame_dir, f'keypoint is a {kind}, expected a float16/float32/float64 numpy array '
                '(M, T, V, C)')
  if kp.ndim != 4:
    raise _fail(source, i, frame_dir, f'keypoint has shape {kp.shape} (rank {kp.ndim}), expected rank 4 '
                '(M persons, T frames, V joints, C channels); add the missing person axis if M = 1')
  m, t, v, c = kp.shape
  score = a.get('keypoint_score')
  if score is not None:
    if c != 2:
      raise _fail(source, i, frame_dir, f'keypoint has C={c} channels and there is a keypoint_score; 2D '
                  'annotations hold (x, y) in keypoint (C=2) and the score separately')
    if not isinstance(score, np.ndarray) or score.dtype.kind != 'f' or score.shape != (m, t, v):
      got = f'shape {score.shape} {score.dtype}' if isinstance(score, np.ndarray) else type(score).__name__
      raise _fail(source, i, frame_dir, f'keypoint_score has {got}, expected a float array of shape {(m, t, v)} '
                  '(the keypoint shape without C)')
  elif c != 3:
    raise _fail(source, i, frame_dir, f'keypoint has C={c} channels and no keypoint_score; expected 3D (x, y, z) '
                'keypoints (C=3), or 2D (x, y) keypoints (C=2) with keypoint_score (M, T, V)')
  if 'total_frames' in a and _as_count(a['total_frames']) != t:
    raise _fail(source, i, frame_dir, f'total_frames is {a["total_frames"]!r} but keypoint has T={t} frames '
                f'(shape {kp.shape}); fix total_frames to {t} (or drop it, it is derived from keypoint)')
  img_shape = None
  if a.get('img_shape') is not None:
    img_shape = _as_img_shape(a['img_shape'])
    if img_shape is None:
      raise _fail(source, i, frame_dir, f'img_shape is {a["img_shape"]!r}, expected (height, width) in pixels')
  if not np.isfinite(kp).all():
    bad = np.argwhere(~np.isfinite(kp))[0]
    raise _fail(source, i, frame_dir, f'keypoint has {np.count_nonzero(~np.isfinite(kp))} NaN/Inf value(s), first at '
                f'(person, frame, joint, channel) = {tuple(int(b) for b in bad)}; store missing joints as 0 '
                '(and score 0), as the detectors do')
  if score is not None and not np.isfinite(score).all():
    raise _fail(source, i, frame_dir, f'keypoint_score has {np.count_nonzero(~np.isfinite(score))} NaN/Inf '
                'value(s); store missing joints with score 0')
  for name, arr in (('keypoint', kp), ('keypoint_score', score)):
    if arr is not None and arr.dtype.itemsize > 4 and arr.size and np.abs(arr).max() > _FLOAT32_MAX:
      raise _fail(source, i, frame_dir, f'{name} has values up to {np.abs(arr).max():.3g} in magnitude, beyond '
                  'float32 (the dtype the data is stored and computed in); rescale the coordinates')
  return kp, score, label, img_shape


def _read_annotation_file(source: str) -> tuple[list[Any], dict[str, list[str]] | None]:
  data = load_pickle(source)
  if not isinstance(data, Mapping) or 'annotations' not in data:
    got = f'a dict with keys {sorted(map(str, data))}' if isinstance(data, Mapping) else f'a {type(data).__name__}'
    raise _fail(source, None, None, f'is {got}; expected the mmaction2/pyskl format {{"split": {{name: '
                '[frame_dir, ...]}, "annotations": [dict, ...]}')
  annos = data['annotations']
  if not isinstance(annos, (list, tuple)):
    raise _fail(source, None, None, f'"annotations" is a {type(annos).__name__}, expected a list of dicts')
  splits = data.get('split')
  if splits is not None:
    if not isinstance(splits, Mapping) or not all(
        isinstance(k, str) and isinstance(v, (list, tuple, np.ndarray)) for k, v in splits.items()):
      raise _fail(source, None, None, '"split" must map split names to lists of frame_dir names')
    splits = {k: [str(x) for x in v] for k, v in splits.items()}
  return annos, splits


def _index_and_write(source: str, fingerprint: str, allocate, labels: bool = True) -> tuple[_FileIndex, np.ndarray]:
  """Unpickles and validates ``source``; writes its keypoints into ``allocate(rows, V)``'s float32 array."""
  annos, splits = _read_annotation_file(source)
  checked = [_validate_sample(source, i, a, labels) for i, a in enumerate(annos)]
  is_2d = num_joints = None
  for i, (kp, score, _, _) in enumerate(checked):
    sample_2d = score is not None
    if is_2d is None:
      is_2d, num_joints, first = sample_2d, kp.shape[2], i
    elif sample_2d != is_2d or kp.shape[2] != num_joints:
      kind = lambda two_d, v: f'{"2D" if two_d else "3D"} with V={v}'
      raise _fail(source, i, annos[i]['frame_dir'], f'is {kind(sample_2d, kp.shape[2])} but annotation {first} '
                  f'({annos[first]["frame_dir"]!r}) is {kind(is_2d, num_joints)}; one file must hold one '
                  'modality and one skeleton layout')
  if is_2d is None:
    raise _fail(source, None, None, 'has no annotations')
  n = len(checked)
  persons = np.array([kp.shape[0] for kp, *_ in checked], dtype=np.int32)
  frames = np.array([kp.shape[1] for kp, *_ in checked], dtype=np.int32)
  sizes = persons.astype(np.int64) * frames
  rows = np.zeros(n, dtype=np.int64)
  np.cumsum(sizes[:-1], out=rows[1:])
  flat = allocate(int(sizes.sum()), num_joints)                           # (R, V, 3) float32
  for i, (kp, score, _, _) in enumerate(checked):
    block = flat[rows[i]:rows[i] + sizes[i]]                               # (M*T, V, 3), person-major
    m, t, v, c = kp.shape
    block[..., :c] = kp.reshape(m * t, v, c)
    if score is not None:
      block[..., 2] = score.reshape(m * t, v)
  img_shapes = np.array([s if s is not None else (-1, -1) for *_, s in checked], dtype=np.int32).reshape(n, 2)
  index = _FileIndex(is_2d=bool(is_2d), num_joints=int(num_joints), rows=rows, persons=persons, frames=frames,
                     labels=np.array([lab for _, _, lab, _ in checked], dtype=np.int64), img_shapes=img_shapes,
                     frame_dirs=np.array([a['frame_dir'] for a in annos], dtype=str), splits=splits,
                     fingerprint=fingerprint)
  return index, flat


# ----------------------------------------------------------------------------------------------------------
# The cache


def _cache_dirs(source: Path, cache_dir: str | os.PathLike | None) -> list[Path]:
  dirs = [] if cache_dir is None else [Path(cache_dir).expanduser().absolute()]
  dirs.append(source.parent)
  dirs.append(Path(os.environ.get('STGCN_CACHE_DIR', Path.home() / '.cache' / 'stgcn_jax')))
  return list(dict.fromkeys(dirs))


def _cache_paths(directory: Path, source: Path, fingerprint: str) -> tuple[Path, Path]:
  stem = f'{source.name}.{fingerprint[:20]}'
  return directory / f'{stem}.kp.npy', directory / f'{stem}.index.npz'


def _open_cache(kp_path: Path, index_path: Path, fingerprint: str) -> tuple[_FileIndex, np.ndarray] | None:
  if not (kp_path.exists() and index_path.exists()):
    return None
  try:
    index = _FileIndex.load(str(index_path))
    keypoints = np.load(kp_path, mmap_mode='r')
  except (OSError, ValueError, KeyError) as e:
    logger.warning('ignoring unreadable annotation cache %s (%s); rebuilding it', index_path, e)
    return None
  expected_rows = int((index.persons.astype(np.int64) * index.frames).sum())
  if (index.fingerprint != fingerprint or keypoints.dtype != np.float32
      or keypoints.shape != (expected_rows, index.num_joints, 3)):
    logger.warning('annotation cache %s does not match its source; rebuilding it', index_path)
    return None
  return index, keypoints


def _build_cache(source: Path, fingerprint: str, dirs: list[Path]) -> tuple[_FileIndex, np.ndarray, Path | None]:
  """Builds the cache in the first writable directory; in memory (with a warning) if none is writable."""
  for directory in dirs:
    try:
      directory.mkdir(parents=True, exist_ok=True)
      fd, tmp_kp = files.mkstemp(dir=directory, prefix=f'.{source.name}.', suffix='.kp.npy.tmp')
      os.close(fd)
    except OSError:
      continue
    kp_path, index_path = _cache_paths(directory, source, fingerprint)
    tmp_index = tmp_kp[:-len('.kp.npy.tmp')] + '.index.npz'
    try:
      allocate = lambda r, v: np.lib.format.open_memmap(tmp_kp, mode='w+', dtype=np.float32, shape=(r, v, 3))
      logger.info('building the annotation cache of %s in %s (once per file version)', source, directory)
      index, flat = _index_and_write(str(source), fingerprint, allocate)
      flat.flush()
      del flat
      index.save(tmp_index)
      os.replace(tmp_kp, kp_path)          # keypoints first: a present index always has its keypoints
      os.replace(tmp_index, index_path)
    finally:
      for tmp in (tmp_kp, tmp_index):
        if os.path.exists(tmp):
          os.remove(tmp)
    if directory == source.parent:
      _remove_stale(directory, source, keep=(kp_path, index_path))
    return index, np.load(kp_path, mmap_mode='r'), kp_path
  logger.warning('no writable directory for the annotation cache of %s (tried %s); keeping it in memory',
                 source, ', '.join(map(str, dirs)))
  index, flat = _index_and_write(str(source), fingerprint, lambda r, v: np.zeros((r, v, 3), np.float32))
  return index, flat, None


def _remove_stale(directory: Path, source: Path, keep: tuple[Path, Path]) -> None:
  for old in directory.glob(f'{glob.escape(source.name)}.*.kp.npy'):
    if old not in keep:
      for path in (old, old.with_name(old.name[:-len('.kp.npy')] + '.index.npz')):
        try:
          path.unlink()
        except OSError:
          pass


# ----------------------------------------------------------------------------------------------------------
# Public entry point


def load_annotations(path: str | os.PathLike, split: str | None = 'xsub_train',
                     layout: str | Layout | Mapping = 'coco', num_classes: int | None = 60,
                     cache_dir: str | os.PathLike | None = None, use_cache: bool = True) -> SkeletonDataset:
  """Loads (and validates) one split of an mmaction2/pyskl skeleton annotation file.

  Args:
    path: the annotation pickle (``ntu60_2d.pkl``, ``ntu60_3danno.pkl``, ...).
    split: a key of the file's ``split`` dict (``xsub_train``, ``xsub_val``, ...), or None for every sample.
    layout: the skeleton layout the model uses; its number of joints must match the file's V.
    num_classes: labels must lie in ``[0, num_classes)``. ``None``: the labels are not used (prediction on
      unlabelled or foreign-labelled skeletons): optional, unchecked, -1 where missing, and the file is read
      into memory (no cache).
    cache_dir: where to put the memory-mapped cache (default: next to the annotation file, or
      ``$STGCN_CACHE_DIR`` / ``~/.cache/stgcn_jax`` when that directory is not writable).
    use_cache: False reads the pickle into memory every time (small files, tests).

  Returns:
    a :class:`SkeletonDataset` with the split's samples in file order.

  Raises:
    FileNotFoundError, ValueError (see the module docstring for every check), UnsafePickleError.
  """
  source = Path(path).expanduser().absolute()
  if source.is_dir():
    raise IsADirectoryError(f'annotation file {str(source)!r} is a directory; give the path of the .pkl file in '
                            'it (ann_file in the config)')
  if not source.is_file():
    raise FileNotFoundError(f'annotation file {str(source)!r} does not exist; check the path (ann_file in the '
                            'config)')
  layout = get_layout(layout)
  if num_classes is not None and (not isinstance(num_classes, numbers.Integral) or num_classes < 1):
    raise ValueError(f'num_classes must be a positive integer or None, got {num_classes!r}')
  use_cache = use_cache and num_classes is not None
  fingerprint = annotation_fingerprint(source)
  kp_path = None
  if use_cache:
    dirs = _cache_dirs(source, cache_dir)
    for directory in dirs:
      found = _open_cache(*_cache_paths(directory, source, fingerprint), fingerprint)
      if found is not None:
        index, keypoints = found
        kp_path = _cache_paths(directory, source, fingerprint)[0]
        break
    else:
      index, keypoints, kp_path = _build_cache(source, fingerprint, dirs)
  else:
    index, keypoints = _index_and_write(str(source), fingerprint, lambda r, v: np.zeros((r, v, 3), np.float32),
                                        labels=num_classes is not None)
  return _select(str(source), index, keypoints, kp_path, split, layout,
                 None if num_classes is None else int(num_classes))


def _select(source: str, index: _FileIndex, keypoints: np.ndarray, kp_path: Path | None, split: str | None,
            layout: Layout, num_classes: int | None) -> SkeletonDataset:
  if index.num_joints != layout.num_node:
    hint = {17: "'coco'", 25: "'nturgb+d'", 18: "'openpose'", 21: "'handmp'"}.get(index.num_joints, 'a matching one')
    raise _fail(source, None, None, f'keypoints have V={index.num_joints} joints but layout {layout.name!r} has '
                f'{layout.num_node}; use the layout this file was made for ({hint})')
  n = len(index.labels)
  if split is None:
    chosen = np.arange(n)
  else:
    if not index.splits:
      raise _fail(source, None, None, f'has no "split" dict, so split {split!r} cannot be selected; pass split=None '
                  'to use every sample')
    if split not in index.splits:
      raise _fail(source, None, None, f'unknown split {split!r}; the file has {sorted(index.splits)}')
    wanted = index.splits[split]
    names = set(wanted)
    known = set(index.frame_dirs.tolist())
    unknown = [name for name in wanted if name not in known]
    if unknown:
      raise _fail(source, None, None, f'split {split!r} names {len(unknown)} sample(s) that are not in '
                  f'"annotations": {_preview(unknown)}; the split and the annotations come from different files '
                  'or versions')
    # mmaction2 keeps the annotations (in file order) whose frame_dir the split lists.
    chosen = np.array([i for i, name in enumerate(index.frame_dirs.tolist()) if name in names], dtype=np.int64)
  chosen = chosen.astype(np.int64)
  labels = index.labels[chosen]
  bad = np.flatnonzero((labels < 0) | (labels >= num_classes)) if num_classes is not None else np.zeros(0, int)
  if bad.size:
    i = int(chosen[bad[0]])
    raise _fail(source, i, str(index.frame_dirs[i]), f'label {int(index.labels[i])} is outside [0, {num_classes}) '
                f'({bad.size} such sample(s), labels span {int(labels.min())}..{int(labels.max())}); set '
                f'num_classes to at least {int(labels.max()) + 1} or fix the labels')
  empty = (index.frames[chosen] == 0) | (index.persons[chosen] == 0)
  skipped = index.frame_dirs[chosen[empty]].tolist()
  if skipped:
    logger.warning('%s: skipped %d sample(s) of split %r with no frames or no persons: %s', source, len(skipped),
                   split, _preview(skipped))
  chosen = chosen[~empty]
  return SkeletonDataset(source=source, split=split, layout=layout, num_classes=num_classes, is_2d=index.is_2d,
                         keypoints=keypoints, keypoints_path=None if kp_path is None else str(kp_path),
                         rows=index.rows[chosen], persons=index.persons[chosen], frames=index.frames[chosen],
                         labels=index.labels[chosen], img_shapes=index.img_shapes[chosen],
                         frame_dirs=index.frame_dirs[chosen], file_indices=chosen, skipped=skipped)
