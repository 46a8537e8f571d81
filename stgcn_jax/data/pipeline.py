"""Grain input pipelines for training and evaluation: shuffle, repeat, sample, batch, shard, checkpoint.

Both pipelines are ``grain.MapDataset`` chains, so every element is a pure function of its position and the
whole stream is reproducible, checkpointable (the iterator state is one position per process) and identical
for any number of worker processes.

**Training** (:func:`make_train_iterator`) reads top to bottom:

  stream positions -> ``batch(B_local)`` -> ``[p::P]`` (this process's batches) -> ``map`` (epoch order, frame
  sampling and features of the whole batch, written in place) -> ``to_iter_dataset`` -> ``mp_prefetch``

* One *epoch* is the split repeated ``repeat`` times (mmaction2's ``RepeatDataset``; ``repeat=5`` with 16
  epochs is the "80e" schedule), shuffled with a permutation seeded by ``(seed, epoch)``, cut to a whole
  number of global batches (the remainder is dropped: static shapes). Epochs follow each other forever.
* ``g``, the position in this global stream, is the only input of each element: the sample is
  ``perm_epoch[g mod per_epoch] mod N`` and its frame sampling uses :func:`record_rng` ``(seed, g)``, the
  generator Grain's ``random_map`` derives from ``(seed, g)``. So the global stream depends only on (dataset,
  seed, global batch size, repeat, feature settings), never on the process count or the worker count. (It is
  also tied to numpy's ``Generator.permutation`` and Philox streams, which numpy keeps stable across releases.)
* Global batch ``b`` is positions ``[b*B, (b+1)*B)``; process ``p`` of ``P`` takes its rows
  ``[p*B_local, (p+1)*B_local)``. Batching the positions by ``B_local`` first and then taking every
  ``P``-th batch from ``p`` gives exactly those rows, and each process computes only its own samples.
* Samples are processed a batch per ``map`` call into one preallocated array: per-record Grain overhead and
  the stacking copy cost as much as the transform itself for 2D skeletons.

**Evaluation** (:func:`make_eval_iterator`): the dataset in order, padded to a whole number of global
batches of ``batch_size * shard_count`` with masked-out zero samples, split the same way (positions batched,
then mapped a batch at a time), so every shard yields the same number of batches and every sample appears
exactly once with ``mask`` True.

Shape letters: B batch, NC clips, M=2 persons, T=clip_len frames, V joints, C=3 channels.
"""

from __future__ import annotations

import functools
import numbers
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np
from absl import flags as absl_flags

from stgcn_jax.data import transforms
from stgcn_jax.data.annotations import SkeletonDataset
from stgcn_jax.graph import Layout, get_layout

__all__ = ['steps_per_epoch', 'make_train_iterator', 'make_eval_iterator', 'num_eval_batches', 'TrainOrder',
           'record_rng', 'NUM_PERSON']

NUM_PERSON = 2                 # FormatGCNInput(num_person=2) of every STGCN++ config


# ----------------------------------------------------------------------------------------------------------
# Argument checks


def _check_positive(name: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    raise ValueError(f'{name} must be a positive integer, got {value!r}')
  return int(value)


def _check_shard(shard_index: Any, shard_count: Any) -> tuple[int, int]:
  shard_count = _check_positive('shard_count', shard_count)
  if isinstance(shard_index, bool) or not isinstance(shard_index, numbers.Integral) or not (
      0 <= shard_index < shard_count):
    raise ValueError(f'shard_index must be an integer in [0, {shard_count}) (this process among shard_count='
                     f'{shard_count}), got {shard_index!r}; pass jax.process_index() and jax.process_count()')
  return int(shard_index), shard_count


def _check_common(dataset: SkeletonDataset, feat: str, layout: Any, num_workers: Any) -> Layout:
  if not isinstance(dataset, SkeletonDataset):
    raise TypeError(f'dataset must be a SkeletonDataset (from load_annotations), got {type(dataset).__name__}')
  if len(dataset) == 0:
    raise ValueError(f'{dataset.source}: split {dataset.split!r} has no samples; check the split name and the '
                     f'annotation file ({len(dataset.skipped)} sample(s) were skipped as empty)')
  if feat not in transforms.FEATS:
    raise ValueError(f'unknown feature {feat!r}; use one of {transforms.FEATS}')
  layout = get_layout(layout)
  # Layouts that cannot serve this data raise here, before any batch is read.
  if feat in ('b', 'bm'):
    layout.bone_pairs
  if not dataset.is_2d:
    layout.align_3d()
  if layout.num_node != dataset.layout.num_node:
    raise ValueError(f'layout {layout.name!r} has {layout.num_node} joints but the dataset {dataset.source} '
                     f'was loaded with {dataset.layout.name!r} ({dataset.layout.num_node} joints); use the same '
                     'layout for loading and for the pipeline')
  if isinstance(num_workers, bool) or not isinstance(num_workers, numbers.Integral) or num_workers < 0:
    raise ValueError(f'num_workers must be an integer >= 0 (0: no worker processes), got {num_workers!r}')
  return layout


def _to_iterable(ds: grain.MapDataset, num_workers: int, num_threads: int, prefetch: int) -> grain.IterDataset:
  """The MapDataset as an IterDataset: ``num_threads`` threads per process, ``num_workers`` processes.

  Grain slices a MapDataset among workers element by element (worker w reads batches w, w+W, ...) and
  interleaves their outputs back in order, so the stream does not depend on the worker count.
  """
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))
  if num_workers > 0:
    # Grain's worker start reads an absl flag, which fails when no absl.app parsed the command line
    # (pytest, notebooks, plain scripts): the defaults are what we want there.
    if not absl_flags.FLAGS.is_parsed():
      absl_flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=prefetch))
  return it


# ----------------------------------------------------------------------------------------------------------
# Training


def steps_per_epoch(num_samples: int, repeat: int, global_batch_size: int) -> int:
  """Global batches per epoch: ``num_samples * repeat // global_batch_size`` (the remainder is dropped).

  Raises:
    ValueError: when the (repeated) split does not fill a single global batch.
  """
  num_samples = int(num_samples)
  repeat = _check_positive('repeat', repeat)
  global_batch_size = _check_positive('global_batch_size', global_batch_size)
  steps = num_samples * repeat // global_batch_size
  if steps == 0:
    raise ValueError(f'the dataset is too small for the batch: {num_samples} samples x repeat {repeat} = '
                     f'{num_samples * repeat} < global batch size {global_batch_size}, so an epoch has no full '
                     'batch; lower the batch size or raise the dataset repeat')
  return steps


class TrainOrder(Sequence):
  """The training stream's sample indices: position ``g`` -> index into the dataset, for ever.

  Epoch ``e`` covers positions ``[e*L, (e+1)*L)`` with ``L = steps_per_epoch * global_batch_size``: the
  first ``L`` entries of a permutation of ``range(N * repeat)`` (every sample ``repeat`` times) drawn by a
  ``np.random.Generator`` seeded with ``(seed, e)``, each taken ``mod N``. The two most recent epochs'
  permutations are cached per process (8 bytes per entry: 1.6 MB for NTU60 x-sub x 5); they are never
  pickled to workers, which rebuild them. ``len`` is ``sys.maxsize`` (an endless stream).
  """

  def __init__(self, num_samples: int, repeat: int, global_batch_size: int, seed: int):
    self.num_samples = int(num_samples)
    self.repeat = int(repeat)
    self.per_epoch = steps_per_epoch(num_samples, repeat, global_batch_size) * int(global_batch_size)
    self.seed = int(seed)
    self._cache: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()        # Grain reads the source from several threads

  def __len__(self) -> int:
    return sys.maxsize

  def __repr__(self) -> str:
    return (f'TrainOrder(num_samples={self.num_samples}, repeat={self.repeat}, per_epoch={self.per_epoch}, '
            f'seed={self.seed})')

  def __getstate__(self) -> dict[str, Any]:
    return {k: v for k, v in self.__dict__.items() if k not in ('_cache', '_lock')}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state, _cache={}, _lock=threading.Lock())

  def epoch(self, epoch: int) -> np.ndarray:
    """Read-only int64 ``(L,)``: the sample indices of epoch ``epoch``, in order."""
    epoch = int(epoch)
    with self._lock:
      order = self._cache.get(epoch)
      if order is None:
        # SeedSequence mixes (seed, epoch), so nearby seeds and epochs give unrelated permutations.
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.num_samples * self.repeat)[:self.per_epoch] % self.num_samples
        order.flags.writeable = False
        if len(self._cache) >= 2:
          del self._cache[min(self._cache)]
        self._cache[epoch] = order
      return order

  def __getitem__(self, g: int) -> int:
    if isinstance(g, slice):
      raise TypeError('TrainOrder is endless; index it with integers')
    epoch, k = divmod(int(g), self.per_epoch)
    return int(self.epoch(epoch)[k])


def record_rng(seed: int, position: int) -> np.random.Generator:
  """The ``np.random.Generator`` that samples the frames of training stream position ``position``.

  A Philox stream keyed by ``seed`` (through numpy's ``SeedSequence``) with the counter ``(0, 0, 0,
  position)``: the generator Grain's ``MapDataset.random_map(seed=seed)`` gives element ``position``, built
  directly so that a whole batch is sampled in one map call.
  """
  bit_generator = np.random.Philox(key=_philox_key(int(seed)))
  _rewind(bit_generator, position)
  return np.random.Generator(bit_generator)


def _rewind(bit_generator: np.random.Philox, position: int) -> None:
  """Puts ``bit_generator`` (keyed by the seed) in :func:`record_rng`'s state for ``position``. Rewinding one
  generator costs a third of building a new one, which matters at ~0.1 ms per 2D sample."""
  state = bit_generator.state
  state['state']['counter'] = np.array([0, 0, 0, position], np.uint64)
  state.update(buffer=np.zeros(4, np.uint64), buffer_pos=4, has_uint32=0, uinteger=0)
  bit_generator.state = state


@functools.lru_cache(maxsize=16)
def _philox_key(seed: int) -> np.ndarray:
  key = np.random.Philox(seed).state['state']['key']
  key.flags.writeable = False
  return key


class _BatchMap(grain.transforms.Map):
  """A map from a batch of positions to a batch of samples, built in place by :meth:`_sample_into`: no
  per-record Grain overhead and no stacking copy."""

  def __init__(self, dataset: SkeletonDataset, *, feat: str, layout: Layout, clip_len: int, num_clips: int,
               num_person: int):
    self.dataset, self.feat, self.layout = dataset, feat, layout
    self.clip_len, self.num_clips, self.num_person = clip_len, num_clips, num_person

  def _empty(self, batch: int) -> np.ndarray:
    return np.empty((batch, self.num_clips, self.num_person, self.clip_len, self.layout.num_node, 3), np.float32)

  def _sample_into(self, out: np.ndarray, i: int, rng: np.random.Generator | None) -> None:
    """Sample ``i`` of the dataset into the batch row ``out``: test-mode clips when ``rng`` is None."""
    ds = self.dataset
    # packed(i) is a read-only view (of the memmap): process_keypoints copies only the frames it samples.
    transforms.process_keypoints(
        ds.packed(i), is_2d=ds.is_2d, layout=self.layout, feat=self.feat, clip_len=self.clip_len,
        num_clips=self.num_clips, test_mode=rng is None, rng=rng, img_shape=ds.img_shape(i),
        num_person=self.num_person, out=out)


class _TrainBatch(_BatchMap):
  """Stream positions ``(B_local,)`` -> ``{'keypoint': float32 (B_local, 1, M, T, V, C), 'label': int32}``.

  Position ``g`` is sample ``order[g]``, sampled with :func:`record_rng` ``(seed, g)``.
  """

  def __init__(self, dataset: SkeletonDataset, order: TrainOrder, *, feat: str, layout: Layout, clip_len: int,
               seed: int, num_person: int):
    super().__init__(dataset, feat=feat, layout=layout, clip_len=clip_len, num_clips=1, num_person=num_person)
    self.order, self.seed = order, seed

  def map(self, positions: np.ndarray) -> dict[str, np.ndarray]:
    indices = np.array([self.order[int(g)] for g in positions], np.int64)
    out = self._empty(len(indices))
    bit_generator = np.random.Philox(key=_philox_key(self.seed))
    rng = np.random.Generator(bit_generator)
    for row, (g, i) in enumerate(zip(positions, indices)):
      _rewind(bit_generator, int(g))                          # rng is now record_rng(seed, g)
      self._sample_into(out[row], int(i), rng)
    return {'keypoint': out, 'label': self.dataset.labels[indices].astype(np.int32)}


def make_train_iterator(dataset: SkeletonDataset, *, feat: str, layout: str | Layout | Mapping, clip_len: int,
                        global_batch_size: int, seed: int, repeat: int = 5, shard_index: int = 0,
                        shard_count: int = 1, num_workers: int = 0, num_threads: int = 2, prefetch: int = 2,
                        num_person: int = NUM_PERSON) -> grain.DatasetIterator:
  """The endless training stream of this process: shuffled epochs of ``repeat`` x the split, batched.

  Args:
    dataset: the training split (``load_annotations``).
    feat: ``'j'``, ``'b'``, ``'jm'`` or ``'bm'``.
    layout: the skeleton layout (bone pairs); must have the dataset's number of joints.
    clip_len: frames per clip (100 in the STGCN++ configs).
    global_batch_size: the batch over all processes; a multiple of ``shard_count``.
    seed: non-negative integer; fixes the epoch permutations and every sample's frame sampling.
    repeat: how many times each epoch repeats the split (mmaction2 ``RepeatDataset(times=5)``).
    shard_index, shard_count: this process and the process count (``jax.process_index()/process_count()``).
    num_workers: Grain worker processes (0: sample in this process's threads). The stream is the same.
    num_threads, prefetch: threads and batches buffered per process (per worker when ``num_workers > 0``).
    num_person: persons per clip, M (``FormatGCNInput(num_person)``: the first ones, zeros where a sample has
      fewer); the model's ``num_person``.

  Returns:
    a Grain ``DatasetIterator`` (``get_state``/``set_state``; works with ``grain.checkpoint.CheckpointSave`` /
    ``CheckpointRestore`` in Orbax) yielding ``{'keypoint': float32 (B_local, 1, M, T, V, C),
    'label': int32 (B_local,)}``, ``B_local = global_batch_size // shard_count``, rows
    ``[shard_index*B_local, (shard_index+1)*B_local)`` of each global batch. Batch ``s`` (counted from 0) is
    global step ``s``; epoch ``e`` is steps ``[e*S, (e+1)*S)`` with ``S = steps_per_epoch(len(dataset),
    repeat, global_batch_size)``.
  """
  layout = _check_common(dataset, feat, layout, num_workers)
  clip_len = _check_positive('clip_len', clip_len)
  global_batch_size = _check_positive('global_batch_size', global_batch_size)
  shard_index, shard_count = _check_shard(shard_index, shard_count)
  if global_batch_size % shard_count:
    raise ValueError(f'global_batch_size {global_batch_size} is not divisible by {shard_count} processes; use '
                     f'a multiple of {shard_count}')
  if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
    raise ValueError(f'seed must be a non-negative integer, got {seed!r}')
  local_batch = global_batch_size // shard_count
  order = TrainOrder(len(dataset), repeat, global_batch_size, int(seed))
  ds = (grain.MapDataset.range(0, sys.maxsize)                               # stream position g
        .batch(local_batch, drop_remainder=True)                              # k: positions [k*B_local, ...)
        [shard_index::shard_count]                                            # k = b*P + p: rows of process p
        .map(_TrainBatch(dataset, order, feat=feat, layout=layout, clip_len=clip_len, seed=int(seed),
                         num_person=_check_positive('num_person', num_person))))
  return iter(_to_iterable(ds, int(num_workers), num_threads, prefetch))


# ----------------------------------------------------------------------------------------------------------
# Evaluation


class _EvalBatch(_BatchMap):
  """Padded-split positions ``(B,)`` -> a batch of deterministic test-mode clips; positions past the split
  are masked-out zero samples (never computed on)."""

  def map(self, positions: np.ndarray) -> dict[str, np.ndarray]:
    ds = self.dataset
    mask = positions < len(ds)
    out = self._empty(len(positions))
    out[~mask] = 0
    for row in np.flatnonzero(mask):
      self._sample_into(out[row], int(positions[row]), None)
    index = np.where(mask, positions, -1).astype(np.int64)
    label = np.where(mask, ds.labels[np.minimum(positions, len(ds) - 1)], -1).astype(np.int64)
    return {'keypoint': out, 'label': label, 'index': index, 'mask': mask}


def num_eval_batches(num_samples: int, batch_size: int, shard_count: int = 1) -> int:
  """Batches every shard yields: ``ceil(num_samples / (batch_size * shard_count))``."""
  global_batch = _check_positive('batch_size', batch_size) * _check_positive('shard_count', shard_count)
  return -(-int(num_samples) // global_batch)


def make_eval_iterator(dataset: SkeletonDataset, *, feat: str, layout: str | Layout | Mapping, clip_len: int,
                       num_clips: int, batch_size: int, shard_index: int = 0, shard_count: int = 1,
                       num_workers: int = 0, num_threads: int = 2, prefetch: int = 2,
                       num_person: int = NUM_PERSON) -> grain.IterDataset:
  """The split in order, with mmaction2's deterministic test/val sampling, sharded over processes.

  Args:
    dataset: the evaluation split.
    feat, layout, clip_len: as for :func:`make_train_iterator`.
    num_clips: clips per sample (10 for the test protocol, 1 for validation).
    batch_size: samples per batch of this process (the global batch is ``batch_size * shard_count``).
    shard_index, shard_count: this process and the process count.
    num_workers, num_threads, prefetch: as for :func:`make_train_iterator`; the output does not change.
    num_person: as for :func:`make_train_iterator`.

  Returns:
    a re-iterable Grain ``IterDataset`` of dicts ``{'keypoint': float32 (batch_size, NC, M, T, V, C),
    'label': int64 (batch_size,), 'index': int64 (batch_size,), 'mask': bool (batch_size,)}``. Every shard
    yields :func:`num_eval_batches` batches; global batch ``b`` holds positions ``[b*G, (b+1)*G)`` of the
    split (``G = batch_size * shard_count``) and this shard its rows ``[shard_index*batch_size, ...)``.
    ``index`` is the position in ``dataset``; rows past the end of the split are zeros with ``mask``
    False, ``index`` and ``label`` -1. Over all shards each index appears exactly once with ``mask`` True.
  """
  layout = _check_common(dataset, feat, layout, num_workers)
  clip_len = _check_positive('clip_len', clip_len)
  num_clips = _check_positive('num_clips', num_clips)
  batch_size = _check_positive('batch_size', batch_size)
  shard_index, shard_count = _check_shard(shard_index, shard_count)
  padded = num_eval_batches(len(dataset), batch_size, shard_count) * batch_size * shard_count
  ds = (grain.MapDataset.range(padded)                                        # positions >= N are padding
        .batch(batch_size, drop_remainder=True)
        [shard_index::shard_count]
        .map(_EvalBatch(dataset, feat=feat, layout=layout, clip_len=clip_len, num_clips=num_clips,
                        num_person=_check_positive('num_person', num_person))))
  return _to_iterable(ds, int(num_workers), num_threads, prefetch)
