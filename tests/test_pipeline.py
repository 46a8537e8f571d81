"""Grain pipelines: eval exact against the mmaction2 goldens, train stream determinism, sharding, workers, resume."""

import gc
import json

import grain
import numpy as np
import pytest

from stgcn_jax.data import pipeline as P
from stgcn_jax.data import transforms as T
from stgcn_jax.data.annotations import load_annotations

DIMS = {'2d': 'coco', '3d': 'nturgb+d'}
MODES = {'test': 10, 'val': 1}


def _load(fixtures_dir, dim, split=None, **kw):
  kw.setdefault('use_cache', False)
  return load_annotations(fixtures_dir / f'ntu60_{dim}_synth.pkl', split=split, layout=DIMS[dim], **kw)


@pytest.fixture(scope='module')
def ds2d(fixtures_dir):
  return _load(fixtures_dir, '2d')


def _train(ds, n, **kw):
  """The first ``n`` batches of a train iterator (2D joint stream, clip_len 100 unless overridden)."""
  args = dict(feat='j', layout=ds.layout, clip_len=100, global_batch_size=4, seed=7, repeat=2)
  args.update(kw)
  it = P.make_train_iterator(ds, **args)
  return it, [next(it) for _ in range(n)]


def _same(a, b):
  return all(np.array_equal(x['keypoint'], y['keypoint']) and np.array_equal(x['label'], y['label'])
             for x, y in zip(a, b, strict=True))


# ----------------------------------------------------------------------------------------------------------
# Evaluation


@pytest.mark.parametrize('feat', T.FEATS)
@pytest.mark.parametrize('dim', sorted(DIMS))
def test_eval_matches_mmaction2_goldens(fixtures_dir, dim, feat):
  ds = _load(fixtures_dir, dim)
  with np.load(fixtures_dir / f'pipeline_{dim}_synth.npz') as z:
    npz = dict(z)
  for mode, num_clips in MODES.items():
    seen = []
    for batch in P.make_eval_iterator(ds, feat=feat, layout=DIMS[dim], clip_len=100, num_clips=num_clips,
                                      batch_size=3):
      assert batch['keypoint'].dtype == np.float32 and batch['label'].dtype == np.int64
      assert batch['keypoint'].shape == (3, num_clips, 2, 100, ds.layout.num_node, 3)
      for row in np.flatnonzero(batch['mask']):
        i = int(batch['index'][row])
        fd = str(ds.frame_dirs[i])
        ref = npz[f'{mode}/{feat}/{fd}']
        out = batch['keypoint'][row]
        assert np.array_equal(out, ref), f'{dim} {mode} {feat} {fd}: max |diff| {np.abs(out - ref).max()}'
        assert batch['label'][row] == ds.labels[i]
        seen.append(i)
    assert sorted(seen) == list(range(len(ds)))


@pytest.mark.parametrize('num_person', [1, 3])
def test_person_count_of_the_clips(ds2d, num_person):
  # FormatGCNInput(num_person): the first persons of each sample, zeros where it has fewer.
  train = next(P.make_train_iterator(ds2d, feat='j', layout='coco', clip_len=20, global_batch_size=4, seed=3,
                                     num_person=num_person))['keypoint']
  two = next(P.make_train_iterator(ds2d, feat='j', layout='coco', clip_len=20, global_batch_size=4, seed=3))
  assert train.shape == (4, 1, num_person, 20, 17, 3)
  m = min(num_person, 2)
  np.testing.assert_array_equal(train[:, :, :m], two['keypoint'][:, :, :m])
  batch = next(iter(P.make_eval_iterator(ds2d, feat='j', layout='coco', clip_len=20, num_clips=2, batch_size=7,
                                         num_person=num_person)))
  for i in range(len(ds2d)):
    want = T.process_sample(ds2d[i], layout='coco', feat='j', clip_len=20, num_clips=2, test_mode=True,
                            num_person=num_person)
    np.testing.assert_array_equal(batch['keypoint'][i], want)
    assert not batch['keypoint'][i, :, int(ds2d.num_persons[i]):].any()


@pytest.mark.parametrize('shard_count', [1, 2, 3])
@pytest.mark.parametrize('batch_size', [1, 2, 4])
def test_eval_shards_cover_every_sample_once(ds2d, shard_count, batch_size):
  n = len(ds2d)                                            # 7: never a multiple of batch_size * shard_count > 1
  per_shard = []
  for p in range(shard_count):
    batches = list(P.make_eval_iterator(ds2d, feat='j', layout='coco', clip_len=20, num_clips=1,
                                        batch_size=batch_size, shard_index=p, shard_count=shard_count))
    per_shard.append(batches)
  expected = -(-n // (batch_size * shard_count))
  assert [len(b) for b in per_shard] == [expected] * shard_count == [P.num_eval_batches(n, batch_size,
                                                                                        shard_count)] * shard_count
  counts = np.zeros(n, np.int64)
  for batches in per_shard:
    for b in batches:
      assert b['keypoint'].shape == (batch_size, 1, 2, 20, 17, 3) and b['mask'].dtype == np.bool_
      np.add.at(counts, b['index'][b['mask']], 1)
      pad = ~b['mask']
      assert np.all(b['index'][pad] == -1) and not b['keypoint'][pad].any()
      assert np.array_equal(b['label'][b['mask']], ds2d.labels[b['index'][b['mask']]])
  assert np.array_equal(counts, np.ones(n))
  # Global batch k is split order [k*G, (k+1)*G): shard p holds its rows [p*b, (p+1)*b).
  first = np.concatenate([per_shard[p][0]['index'] for p in range(shard_count)])
  g = batch_size * shard_count
  assert np.array_equal(first, np.where(np.arange(g) < n, np.arange(g), -1))


# ----------------------------------------------------------------------------------------------------------
# Training stream


def test_steps_per_epoch_drops_the_remainder_and_rejects_tiny_datasets():
  assert P.steps_per_epoch(7, 2, 4) == 3                   # 14 samples -> 3 batches of 4, 2 dropped
  assert P.steps_per_epoch(40091, 5, 128) == 1566
  with pytest.raises(ValueError, match='too small for the batch'):
    P.steps_per_epoch(3, 1, 4)


def test_epoch_order_covers_every_sample_repeat_times_and_reshuffles():
  order = P.TrainOrder(num_samples=7, repeat=3, global_batch_size=7, seed=1)
  epochs = [order.epoch(e) for e in range(3)]
  for e in epochs:
    assert np.array_equal(np.bincount(e, minlength=7), [3] * 7)
  assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
  assert order[2 * 21 + 5] == epochs[2][5]                 # positions run on across epochs
  # Dropping the remainder: each sample at most `repeat` times, the epoch a whole number of batches.
  cut = P.TrainOrder(num_samples=7, repeat=3, global_batch_size=4, seed=1)
  assert cut.per_epoch == 20 and np.bincount(cut.epoch(0), minlength=7).max() <= 3
  assert not np.array_equal(P.TrainOrder(7, 3, 7, seed=2).epoch(0), epochs[0])


def test_train_batches_follow_the_epoch_order_with_valid_sampled_frames(ds2d):
  _, batches = _train(ds2d, 6)                             # 2 epochs of 3 steps
  order = P.TrainOrder(len(ds2d), 2, 4, seed=7)
  idx = np.concatenate([order.epoch(0), order.epoch(1)])
  labels = np.concatenate([b['label'] for b in batches])
  assert labels.dtype == np.int32 and np.array_equal(labels, ds2d.labels[idx])
  for b in batches:
    assert b['keypoint'].shape == (4, 1, 2, 100, 17, 3) and b['keypoint'].dtype == np.float32
  # Position g is sample idx[g], sampled with record_rng(seed, g).
  for g in (0, 5, 11):
    i = int(idx[g])
    want = T.process_keypoints(ds2d.packed(i), is_2d=True, layout='coco', feat='j', clip_len=100, test_mode=False,
                               rng=P.record_rng(7, g), img_shape=ds2d.img_shape(i))
    assert np.array_equal(batches[g // 4]['keypoint'][g % 4], want)
  # Every sampled frame of person 0 is a frame of the pre-normalised sequence; T >= 2*clip_len samples one
  # frame from each bin of T/100 frames, in order; the same sample at two positions is sampled differently.
  rows = np.concatenate([b['keypoint'][:, 0, 0] for b in batches])          # (12, 100, V, C)
  long_outputs = []
  for row, i in zip(rows, idx):
    packed = ds2d.packed(int(i))
    full = T.pre_normalize_2d(packed[..., :2], packed[..., 2], ds2d.img_shape(int(i)))[0]   # (T, V, C)
    match = (row[:, None] == full[None]).all(axis=(2, 3))                   # (100, T)
    assert match.any(axis=1).all(), ds2d.frame_dirs[i]
    if full.shape[0] == 300:
      frames = match.argmax(axis=1)
      assert np.array_equal(frames // 3, np.arange(100)), frames
      long_outputs.append(row)
  assert len(long_outputs) >= 2 and not np.array_equal(long_outputs[0], long_outputs[1])


def test_record_rng_is_grains_random_map_generator():
  """The per-position generator equals the one Grain's random_map hands element g (the stream's history)."""
  draws = grain.MapDataset.range(0, 1000).random_map(lambda g, rng: rng.integers(1 << 62, size=3), seed=42)
  for g in (0, 1, 17, 999):
    assert np.array_equal(P.record_rng(42, g).integers(1 << 62, size=3), draws[g])
  assert not np.array_equal(P.record_rng(43, 1).integers(1 << 62, size=3), draws[1])


def test_train_stream_is_deterministic_and_depends_on_the_seed(ds2d):
  _, a = _train(ds2d, 4)
  _, b = _train(ds2d, 4)
  _, c = _train(ds2d, 4, seed=8)
  assert _same(a, b)
  assert not all(np.array_equal(x['keypoint'], y['keypoint']) for x, y in zip(a, c))


@pytest.mark.parametrize('feat', ['b', 'jm'])
def test_train_shards_concatenate_to_the_single_process_batch(fixtures_dir, feat):
  ds = _load(fixtures_dir, '3d')                          # 8 samples, repeat 2, global batch 4 -> 4 steps
  _, whole = _train(ds, 5, feat=feat)
  _, s0 = _train(ds, 5, feat=feat, shard_index=0, shard_count=2)
  _, s1 = _train(ds, 5, feat=feat, shard_index=1, shard_count=2)
  joined = [{k: np.concatenate([x[k], y[k]]) for k in x} for x, y in zip(s0, s1)]
  assert s0[0]['keypoint'].shape == (2, 1, 2, 100, 25, 3)
  assert _same(whole, joined)


def _check_resume(ds, make, first, after):
  it = make()
  for _ in range(first):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(after)]
  fresh = make()
  fresh.set_state(state)
  assert _same([next(fresh) for _ in range(after)], expected)
  return state, expected


@pytest.mark.parametrize('first', [1, 2])                 # mid-epoch, and across the epoch boundary at step 3
def test_state_restore_resumes_with_the_same_batches(ds2d, first):
  make = lambda: P.make_train_iterator(ds2d, feat='bm', layout='coco', clip_len=100, global_batch_size=4, seed=3,
                                       repeat=2)
  state, _ = _check_resume(ds2d, make, first, 4)
  assert json.loads(json.dumps(state)) == state            # plain JSON, as Grain's Orbax handler writes it


def test_orbax_checkpoint_roundtrip(ds2d, tmp_path):
  ocp = pytest.importorskip('orbax.checkpoint')
  make = lambda: P.make_train_iterator(ds2d, feat='j', layout='coco', clip_len=50, global_batch_size=2, seed=5,
                                       repeat=1, shard_index=1, shard_count=2)
  it = make()
  for _ in range(4):                                       # 7 samples / 2 = 3 steps per epoch: into epoch 1
    next(it)
  options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
  with ocp.CheckpointManager(tmp_path / 'ckpt', options=options) as mngr:
    mngr.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  expected = [next(it) for _ in range(3)]
  restored = make()
  with ocp.CheckpointManager(tmp_path / 'ckpt', options=options) as mngr:
    mngr.restore(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  assert _same([next(restored) for _ in range(3)], expected)


def test_worker_processes_give_the_same_stream_and_resume(fixtures_dir, tmp_path):
  # The memmap cache is what workers receive in practice: the pickled dataset carries the index only.
  ds = _load(fixtures_dir, '2d', use_cache=True, cache_dir=tmp_path)
  assert ds.keypoints_path is not None
  _, single = _train(ds, 5, feat='jm')
  it, multi = _train(ds, 3, feat='jm', num_workers=2)
  try:
    state = it.get_state()
    multi += [next(it) for _ in range(2)]
    assert _same(single, multi)
    it.set_state(state)                                    # rewinds the workers too
    assert _same([next(it) for _ in range(2)], single[3:])
    evals = [list(P.make_eval_iterator(ds, feat='b', layout='coco', clip_len=100, num_clips=10, batch_size=3,
                                       num_workers=w)) for w in (0, 2)]
    assert len(evals[0]) == len(evals[1]) == 3
    for x, y in zip(*evals):
      assert all(np.array_equal(x[k], y[k]) for k in x)
  finally:
    it.close()
    del multi, evals
    gc.collect()


def test_argument_errors_are_explicit(ds2d):
  kw = dict(feat='j', layout='coco', clip_len=100, global_batch_size=4, seed=0)
  with pytest.raises(ValueError, match='not divisible by 3 processes'):
    P.make_train_iterator(ds2d, **{**kw, 'shard_count': 3})
  with pytest.raises(ValueError, match='shard_index'):
    P.make_train_iterator(ds2d, **{**kw, 'shard_index': 2, 'shard_count': 2})
  with pytest.raises(ValueError, match='unknown feature'):
    P.make_train_iterator(ds2d, **{**kw, 'feat': 'joint'})
  with pytest.raises(ValueError, match='too small'):
    P.make_train_iterator(ds2d, **{**kw, 'global_batch_size': 64})
  with pytest.raises(ValueError, match='25 joints'):
    P.make_eval_iterator(ds2d, feat='j', layout='nturgb+d', clip_len=100, num_clips=1, batch_size=2)
  with pytest.raises(ValueError, match='seed'):
    P.make_train_iterator(ds2d, **{**kw, 'seed': -1})
