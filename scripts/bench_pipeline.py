"""Data-pipeline speed: samples/s of the Grain train and 10-clip test pipelines on NTU-sized samples.

Synthetic samples of the NTU60 size (T=300 frames, M=2 persons; 2D coco-17 pixels with scores, 3D
nturgb+d-25 metres) are written to a temporary annotation file and loaded through the memory-mapped cache,
as in a real run. Each pipeline then runs in one process with one thread (``num_workers=0``,
``num_threads=1``), and the median over several runs is reported, next to the bare per-sample transform
(``transforms.process_keypoints`` in a loop, no Grain) and to mmaction2's own pipeline: timed here when
``mmaction`` is importable, otherwise its figures measured on this project's 2-core reference box
(``fixtures/mmaction2/README.md``, "Data-pipeline speed").

Usage::

  python scripts/bench_pipeline.py                  # ~1 min on 2 cores
  python scripts/bench_pipeline.py --json --runs 7 --feats j b
"""

from __future__ import annotations

import argparse
import json
import pickle
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from stgcn_jax.data import pipeline, transforms
from stgcn_jax.data.annotations import load_annotations

LAYOUTS = {'2d': 'coco', '3d': 'nturgb+d'}
# Genuine mmaction2 1.2.0, one process, median ms per NTU-sized sample (fixtures README, bench_cpu.json box).
MMACTION2_REFERENCE_MS = {
    ('2d', 'train', 'j'): 1.68, ('2d', 'train', 'b'): 2.06, ('2d', 'test', 'j'): 2.14, ('2d', 'test', 'b'): 2.51,
    ('3d', 'train', 'j'): 18.9, ('3d', 'train', 'b'): 19.5, ('3d', 'test', 'j'): 19.4, ('3d', 'test', 'b'): 19.5,
}


def synthetic_annotations(dim: str, num_samples: int, num_frames: int = 300, seed: int = 0) -> dict[str, Any]:
  """An mmaction2-format annotation dict of ``num_samples`` two-person samples of ``num_frames`` frames."""
  rng = np.random.default_rng(seed)
  annos = []
  for i in range(num_samples):
    a = {'frame_dir': f'bench_{dim}_{i:04d}', 'label': i % 60, 'total_frames': num_frames}
    if dim == '2d':
      xy = rng.uniform(0, 1, (2, num_frames, 17, 2)) * np.array([1920, 1080])
      a.update(keypoint=xy.astype(np.float32), img_shape=(1080, 1920), original_shape=(1080, 1920),
               keypoint_score=rng.uniform(0, 1, (2, num_frames, 17)).astype(np.float32))
    else:
      body = rng.normal(0, 0.3, (2, num_frames, 25, 3)) + np.array([0, 0.2, 3.0])
      a['keypoint'] = body.astype(np.float32)
    annos.append(a)
  names = [a['frame_dir'] for a in annos]
  return {'split': {'xsub_train': names, 'xsub_val': names}, 'annotations': annos}


def _median_rate(fn: Callable[[], int], runs: int) -> dict[str, float]:
  """Runs ``fn`` (returns the samples it processed) ``runs`` times after one warm-up.

  Returns the median wall-clock samples/s and the median CPU time of this process per sample (all its
  threads: the cost on one core, less sensitive than wall time to other jobs on a shared machine).
  """
  fn()
  rates, cpu_ms = [], []
  for _ in range(runs):
    start, cpu = time.perf_counter(), time.process_time()
    n = fn()
    rates.append(n / (time.perf_counter() - start))
    cpu_ms.append((time.process_time() - cpu) * 1e3 / n)
  med = statistics.median(rates)
  return {'samples_per_s': med, 'ms_per_sample': 1e3 / med, 'cpu_ms_per_sample': statistics.median(cpu_ms),
          'min_samples_per_s': min(rates), 'max_samples_per_s': max(rates)}


def _grain_train(ds, feat: str, batch: int, steps: int) -> Callable[[], int]:
  """``steps`` batches of one endless iterator per run: the steady state of a training run."""
  it = pipeline.make_train_iterator(ds, feat=feat, layout=ds.layout, clip_len=100, global_batch_size=batch,
                                    seed=0, repeat=5, num_threads=1, prefetch=1)

  def run() -> int:
    for _ in range(steps):
      next(it)
    return steps * batch
  return run


def _grain_test(ds, feat: str, batch: int, num_clips: int) -> Callable[[], int]:
  """One pass over the split per run (iterator start included, as in an evaluation)."""
  def run() -> int:
    n = 0
    for b in pipeline.make_eval_iterator(ds, feat=feat, layout=ds.layout, clip_len=100, num_clips=num_clips,
                                         batch_size=batch, num_threads=1, prefetch=1):
      n += int(b['mask'].sum())
    return n
  return run


def _bare(ds, feat: str, test_mode: bool, num_clips: int) -> Callable[[], int]:
  def run() -> int:
    rng = np.random.default_rng(0)
    for i in range(len(ds)):
      transforms.process_keypoints(ds.packed(i), is_2d=ds.is_2d, layout=ds.layout, feat=feat, clip_len=100,
                                   num_clips=num_clips, test_mode=test_mode, rng=rng, img_shape=ds.img_shape(i))
    return len(ds)
  return run


def _mmaction2(annos: list[dict[str, Any]], dim: str, feat: str, test_mode: bool, num_clips: int
               ) -> Callable[[], int] | None:
  """mmaction2's own transforms on the same samples, when mmaction2 is installed."""
  try:
    from mmaction.datasets import transforms as mt  # noqa: PLC0415 (optional dependency)
  except ImportError:
    return None
  prenorm = mt.PreNormalize2D() if dim == '2d' else mt.PreNormalize3D()
  steps = [prenorm, mt.GenSkeFeat(dataset=LAYOUTS[dim], feats=[feat]),
           mt.UniformSampleFrames(clip_len=100, num_clips=num_clips, test_mode=test_mode), mt.PoseDecode(),
           mt.FormatGCNInput(num_person=2)]

  def run() -> int:
    for a in annos:
      results = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in a.items()}
      results.update(start_index=0, modality='Pose')
      for step in steps:
        results = step(results)
    return len(annos)
  return run


def cpu_speedup(mm: dict[str, Any], ours: dict[str, Any]) -> dict[str, Any]:
  """Our pipeline against mmaction2's in CPU time per sample (less sensitive than wall time to other jobs on a
  shared machine), like with like: mmaction2's CPU time where it was measured in this run; for the stored
  reference, which has only wall time, that wall time (it ran alone, single-threaded, on an idle machine, where
  wall time is CPU time), and ``cpu_speedup_basis`` says so."""
  if 'cpu_ms_per_sample' in mm:
    return {'cpu_speedup_vs_mmaction2': mm['cpu_ms_per_sample'] / ours['cpu_ms_per_sample'],
            'cpu_speedup_basis': 'CPU time against CPU time, both measured here'}
  return {'cpu_speedup_vs_mmaction2': mm['ms_per_sample'] / ours['cpu_ms_per_sample'],
          'cpu_speedup_basis': "our CPU time against the stored reference's wall time (idle machine, one thread)"}


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--samples', type=int, default=256, help='synthetic samples per modality')
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--runs', type=int, default=5, help='timed runs (median reported)')
  parser.add_argument('--feats', nargs='+', default=['j'], choices=transforms.FEATS)
  parser.add_argument('--dims', nargs='+', default=['2d', '3d'], choices=sorted(LAYOUTS))
  parser.add_argument('--json', action='store_true', help='print the results as JSON')
  args = parser.parse_args(argv)
  for name in ('samples', 'batch', 'runs'):
    if getattr(args, name) < 1:
      parser.error(f'--{name} must be positive, got {getattr(args, name)}')
  if args.samples < args.batch:
    parser.error(f'--samples ({args.samples}) must be at least --batch ({args.batch})')

  results: dict[str, Any] = {'config': vars(args) | {'T': 300, 'M': 2, 'clip_len': 100, 'test_clips': 10,
                                                      'num_workers': 0, 'num_threads': 1}, 'results': []}
  with tempfile.TemporaryDirectory() as tmp:
    for dim in args.dims:
      data = synthetic_annotations(dim, args.samples)
      path = Path(tmp) / f'bench_{dim}.pkl'
      path.write_bytes(pickle.dumps(data, protocol=4))
      ds = load_annotations(path, split='xsub_train', layout=LAYOUTS[dim], cache_dir=tmp)
      steps = len(ds) // args.batch
      for feat in args.feats:
        for mode, num_clips in (('train', 1), ('test', 10)):
          test_mode = mode == 'test'
          grain_fn = _grain_test(ds, feat, args.batch, num_clips) if test_mode else \
              _grain_train(ds, feat, args.batch, steps)
          row = {'dim': dim, 'feat': feat, 'mode': mode, 'grain': _median_rate(grain_fn, args.runs),
                 'per_sample_fn': _median_rate(_bare(ds, feat, test_mode, num_clips), args.runs)}
          mm = _mmaction2(data['annotations'], dim, feat, test_mode, num_clips)
          if mm is not None:
            row['mmaction2'] = _median_rate(mm, args.runs) | {'source': 'measured here'}
          elif (dim, mode, feat) in MMACTION2_REFERENCE_MS:
            ms = MMACTION2_REFERENCE_MS[(dim, mode, feat)]
            row['mmaction2'] = {'ms_per_sample': ms, 'samples_per_s': 1e3 / ms,
                                'source': 'fixtures README (mmaction2 not installed)'}
          if 'mmaction2' in row:
            row['speedup_vs_mmaction2'] = row['grain']['samples_per_s'] / row['mmaction2']['samples_per_s']
            row.update(cpu_speedup(row['mmaction2'], row['grain']))
          results['results'].append(row)

  if args.json:
    json.dump(results, sys.stdout, indent=1)
    print()
  else:
    print(f'NTU-sized samples (T=300, M=2), one process, one thread, median of {args.runs} runs')
    print(f'{"dim":4} {"feat":4} {"mode":6} {"grain/s":>9} {"ms":>7} {"cpu ms":>7} {"fn only/s":>10} '
          f'{"mmaction2/s":>12} {"speedup":>8} {"cpu":>6}  mmaction2 source')
    for r in results['results']:
      mm = r.get('mmaction2')
      print(f'{r["dim"]:4} {r["feat"]:4} {r["mode"]:6} {r["grain"]["samples_per_s"]:9.0f} '
            f'{r["grain"]["ms_per_sample"]:7.2f} {r["grain"]["cpu_ms_per_sample"]:7.2f} '
            f'{r["per_sample_fn"]["samples_per_s"]:10.0f} '
            f'{mm["samples_per_s"] if mm else float("nan"):12.0f} {r.get("speedup_vs_mmaction2", float("nan")):7.1f}x '
            f'{r.get("cpu_speedup_vs_mmaction2", float("nan")):5.1f}x'
            f'  {mm["source"] if mm else "-"}')
  return results


if __name__ == '__main__':
  main()
