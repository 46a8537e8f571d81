"""Model speed side by side with mmaction2: train step and inference of STGCN++, pipeline and whole epoch.

For each skeleton kind (2D coco-17, 3D nturgb+d-25) at batch 16, M=2 persons, T=100 frames, this measures in
one process, alternating iteration by iteration so that load from other jobs hits both sides alike:

- our jitted train step (train-mode forward, backward, SGD Nesterov update; ``stgcn_jax.steps``) and our
  jitted inference (eval-mode ``predict_clips`` on one clip per sample);
- the same two for the genuine mmaction2 model (``model.train_step`` with an mmengine ``OptimWrapper`` /
  ``eval`` + ``no_grad`` backbone and head), when ``torch`` and ``mmaction`` import, with
  ``torch.set_num_threads(--torch-threads)``, on the GPU when JAX runs on one (``--torch-device``); otherwise,
  on the CPU, the reference figures of ``fixtures/mmaction2/bench_cpu.json`` (the same box, idle) are quoted
  when they were measured at the run's batch and dtype (batch 16, float32), and no ratio is given otherwise.

On an accelerator each timed iteration runs ``--steps-per-iter`` steps back to back (default 10) and waits for
the last, as a training loop does; on the CPU each is one step after an untimed pause.

It reports samples/s (median over ``--iters`` after warm-ups), the ratio to mmaction2, the fraction of the
matmul peak in the compute dtype measured here with a large ``jnp.dot`` (model FLOPs = 2 × ``backbone_macs``; a
train step counts 3× the forward), the train step's compile time, and memory: XLA's buffer sizes of each
compiled step, the process's peak RSS, and on accelerators the device's peak bytes in use. Then the Grain
pipeline alone (train iterator, and the 10-clip test iterator) on NTU-sized synthetic samples (T=300, M=2), and
a few training steps fed by the Grain iterator (data loading, host-to-device copy included) against the bare
step.

The process uses the host allocator the training and test command lines use (:mod:`stgcn_jax.hostmem`): where
JAX computes on the CPU, it relaunches itself on tcmalloc when that is installed, else it makes glibc keep freed
memory (``STGCN_JAX_HOST_MALLOC=keep`` forces the latter, ``system`` measures with glibc's defaults); mmaction2
shares the process and the allocator, which the report names.

Usage::

  python scripts/benchmark.py                          # 2D and 3D, ~5 min on 2 CPU cores with mmaction2
  python scripts/benchmark.py --kinds 2d --iters 5 --skip-torch --json
  python scripts/benchmark.py --dtype bfloat16 --batch 64     # accelerators

mmaction2 for the side-by-side (kept out of requirements.txt): ``pip install torch==2.13.0 mmengine
mmcv-lite==2.1.0 scipy einops importlib_metadata`` then ``pip install --no-deps mmaction2==1.2.0``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pickle
import resource
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from stgcn_jax import cli, hostmem, steps, torch_reference
from stgcn_jax.model import ModelConfig, backbone_macs, build_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pipeline import synthetic_annotations  # noqa: E402  (sibling script)

LAYOUTS = {'2d': 'coco', '3d': 'nturgb+d'}
NUM_PERSON, NUM_FRAMES, NUM_CLASSES = 2, 100, 60
REFERENCE = Path(__file__).resolve().parents[2] / 'shared' / 'fixtures' / 'mmaction2' / 'bench_cpu.json'
MM_CONFIG = 'stgcnpp_8xb16-joint-u100-80e_ntu60-xsub-keypoint-{kind}.py'


# -------------------------------------------------------------------------------------------------- timing
def _block(tree: Any) -> None:
  jax.block_until_ready(tree)


def _summary(times: list[float], batch: int) -> dict[str, float]:
  med = statistics.median(times)
  return {'median_s': med, 'min_s': min(times), 'max_s': max(times), 'samples_per_s': batch / med,
          'iters': len(times)}


PAUSE_S = 0.5


def _alternate(fns: dict[str, Callable[[int], None]], warmup: int, iters: int, steps: int = 1,
               pause: float = PAUSE_S) -> dict[str, list[float]]:
  """Runs every function ``warmup`` times, then ``iters`` rounds of each in turn; wall seconds per step.

  Each function ``fn(steps)`` runs ``steps`` steps back to back and waits for the last one, so that on an
  accelerator the host's dispatch overlaps the device's work as in a training loop. Each call starts after an
  untimed ``pause``: on the CPU, OpenMP workers (torch) and XLA's thread pool keep spinning for a while after
  their work ends, and on a 2-core machine that spinning would be charged to whichever side runs next.
  """
  for _ in range(warmup):
    for fn in fns.values():
      fn(steps)
  times: dict[str, list[float]] = {name: [] for name in fns}
  for _ in range(iters):
    for name, fn in fns.items():
      time.sleep(pause)
      start = time.perf_counter()
      fn(steps)
      times[name].append((time.perf_counter() - start) / steps)
  return times


def matmul_peak(n: int = 2048, iters: int = 5, dtype: Any = jnp.float32) -> float:
  """FLOP/s of a jitted ``n × n`` matmul in ``dtype`` on the default device (median of ``iters``)."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  f = jax.jit(jnp.dot)
  _block(f(a, b))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    _block(f(a, b))
    times.append(time.perf_counter() - start)
  return 2 * n ** 3 / statistics.median(times)


def _rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024    # Linux: KiB


def _device_peak_mib() -> float | None:
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get('peak_bytes_in_use')
  return None if peak is None else peak / 2 ** 20


def _memory_analysis(compiled) -> dict[str, float] | None:
  """XLA's buffer sizes of a compiled executable (arguments, outputs, temporaries), MiB."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001  (not every backend implements it)
    return None
  if m is None:
    return None
  mib = lambda b: b / 2 ** 20
  return {'argument_mib': mib(m.argument_size_in_bytes), 'output_mib': mib(m.output_size_in_bytes),
          'temp_mib': mib(m.temp_size_in_bytes), 'alias_mib': mib(m.alias_size_in_bytes)}


# ------------------------------------------------------------------------------------------------ ours
class Ours:
  """Our jitted train step (state donated) and inference on fixed random batches of one kind."""

  def __init__(self, kind: str, batch: int, dtype: str, seed: int = 0):
    self.cfg = ModelConfig(layout=LAYOUTS[kind], num_classes=NUM_CLASSES)
    model = build_model(self.cfg, seed=seed, dtype=dtype)
    graphdef, params, stats = steps.split_model(model)
    optimizer = steps.make_optimizer(0.1)
    self.state = steps.init_train_state(params, stats, optimizer)
    rng = np.random.default_rng(seed)
    v = self.cfg.num_node
    self.batch = {'keypoint': jnp.asarray(rng.normal(size=(batch, 1, NUM_PERSON, NUM_FRAMES, v, 3)), jnp.float32),
                  'label': jnp.asarray(rng.integers(0, NUM_CLASSES, batch), jnp.int32)}
    self.key = jax.random.key(seed)
    train_step = jax.jit(steps.make_train_step(graphdef, optimizer), donate_argnums=0)
    start = time.perf_counter()
    self.train_compiled = train_step.lower(self.state, self.batch, self.key).compile()
    self.compile_s = time.perf_counter() - start
    eval_step = jax.jit(steps.make_eval_step(graphdef, micro_batch='auto'))
    start = time.perf_counter()
    self.eval_compiled = eval_step.lower(params, stats, self.batch['keypoint']).compile()
    self.eval_compile_s = time.perf_counter() - start
    self.memory = {'train_step': _memory_analysis(self.train_compiled),
                   'inference': _memory_analysis(self.eval_compiled)}

  def train(self, steps: int = 1, next_batch: Callable[[], dict[str, jax.Array]] | None = None) -> None:
    """``steps`` train steps on the fixed batch, or on ``next_batch()`` each; waits for the last."""
    for _ in range(steps):
      batch = self.batch if next_batch is None else next_batch()
      self.state, metrics = self.train_compiled(self.state, batch, self.key)
    _block(metrics['loss'])

  def infer(self, steps: int = 1) -> None:
    for _ in range(steps):
      out = self.eval_compiled(self.state.params, self.state.stats, self.batch['keypoint'])
    _block(out)

  def flops(self) -> float:
    """Forward FLOPs of one sample (2 × MACs of convolutions and graph aggregations)."""
    return 2.0 * backbone_macs(self.cfg, NUM_FRAMES, NUM_PERSON)


# -------------------------------------------------------------------------------------------- mmaction2
def import_mmaction(threads: int) -> tuple[types.ModuleType | None, str]:
  """``(mmaction, '')`` when torch and mmaction2 import, torch limited to ``threads``; else ``(None, why)``."""
  mmaction, why = torch_reference.import_mmaction()
  if mmaction is not None:
    import torch  # noqa: PLC0415  (optional)
    torch.set_num_threads(threads)
  return mmaction, why


class MMAction2:
  """The genuine mmaction2 STGCN++ (built from the wheel's config) on the same batch shapes."""

  def __init__(self, mmaction: types.ModuleType, kind: str, batch: int, device: str = 'cpu', seed: int = 0):
    import torch  # noqa: PLC0415
    from mmengine.config import Config  # noqa: PLC0415
    from mmengine.optim import OptimWrapper  # noqa: PLC0415
    from mmaction.registry import MODELS  # noqa: PLC0415
    from mmaction.structures import ActionDataSample  # noqa: PLC0415

    torch.manual_seed(seed)
    config = Path(mmaction.__file__).parent / '.mim' / 'configs' / 'skeleton' / 'stgcnpp' / MM_CONFIG.format(kind=kind)
    self.model = MODELS.build(Config.fromfile(str(config)).model).to(device)
    opt = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    self.optim = OptimWrapper(opt)
    rng = np.random.default_rng(seed)
    v = 17 if kind == '2d' else 25
    x = torch.from_numpy(rng.normal(size=(batch, 1, NUM_PERSON, NUM_FRAMES, v, 3)).astype(np.float32)).to(device)
    labels = rng.integers(0, NUM_CLASSES, batch)
    samples = [ActionDataSample().set_gt_label(int(y)).to(device) for y in labels]
    self.data = {'inputs': list(x), 'data_samples': samples}
    self.x = x.reshape(batch, NUM_PERSON, NUM_FRAMES, v, 3)
    self.torch = torch
    self.sync = torch.cuda.synchronize if device.startswith('cuda') else (lambda: None)

  def train(self, steps: int = 1) -> None:
    self.model.train()
    for _ in range(steps):
      self.model.train_step(self.data, self.optim)
    self.sync()

  def infer(self, steps: int = 1) -> None:
    self.model.eval()
    with self.torch.no_grad():
      for _ in range(steps):
        self.model.cls_head(self.model.backbone(self.x))
    self.sync()


def _reference_rates(batch: int, dtype: str, path: Path = REFERENCE) -> tuple[dict[str, dict[str, float]], str]:
  """Median samples/s of the stored mmaction2 runs (best of the runs), per kind, of the rows measured at this
  run's ``batch`` and ``dtype`` (rows without a ``dtype`` are torch's default, float32): a ratio against
  figures of another batch or dtype would compare different work. Returns ``(rates, why)``; ``why`` says
  why there are none."""
  if not path.exists():
    return {}, f'{path.name} not found'
  rows = [row for run in json.loads(path.read_text())['runs'] for row in run]
  matching = [row for row in rows if row.get('batch') == batch and row.get('dtype', 'float32') == dtype]
  out: dict[str, dict[str, float]] = {}
  for row in matching:
    best = out.setdefault(row['kind'], {'inference': 0.0, 'train_step': 0.0})
    for what in best:
      best[what] = max(best[what], row[what]['samples_per_s'])
  if out:
    return out, ''
  stored = sorted({f"batch {row.get('batch')} {row.get('dtype', 'float32')}" for row in rows})
  return {}, (f"{path.name} holds {', '.join(stored) or 'no'} figures and this run is batch {batch} {dtype}: "
              'no ratio (run with those settings, or with mmaction2 installed, to compare)')


# --------------------------------------------------------------------------------------------- pipeline
def _pipeline(kind: str, batch: int, samples: int, tmp: str, ours: Ours | None, epoch_steps: int,
              iters: int, steps: int, pause: float) -> dict[str, Any]:
  """Grain pipeline samples/s (train, 10-clip test) and train steps fed by Grain against the bare step."""
  from stgcn_jax.data import pipeline  # noqa: PLC0415
  from stgcn_jax.data.annotations import load_annotations  # noqa: PLC0415

  path = Path(tmp) / f'bench_{kind}.pkl'
  path.write_bytes(pickle.dumps(synthetic_annotations(kind, samples), protocol=4))
  ds = load_annotations(path, split='xsub_train', layout=LAYOUTS[kind], cache_dir=tmp)
  out: dict[str, Any] = {'samples': len(ds), 'T': 300, 'M': NUM_PERSON}

  it = pipeline.make_train_iterator(ds, feat='j', layout=ds.layout, clip_len=NUM_FRAMES, global_batch_size=batch,
                                    seed=0, repeat=5, num_threads=2, prefetch=2)
  next(it)
  n_batches = max(len(ds) // batch, 1)
  rates = []
  for _ in range(iters):
    start = time.perf_counter()
    for _ in range(n_batches):
      next(it)
    rates.append(n_batches * batch / (time.perf_counter() - start))
  out['train_pipeline_samples_per_s'] = statistics.median(rates)

  rates = []
  for _ in range(max(iters // 2, 1)):
    start, n = time.perf_counter(), 0
    for b in pipeline.make_eval_iterator(ds, feat='j', layout=ds.layout, clip_len=NUM_FRAMES, num_clips=10,
                                         batch_size=batch, num_threads=2, prefetch=2):
      n += int(b['mask'].sum())
    rates.append(n / (time.perf_counter() - start))
  out['test10_pipeline_samples_per_s'] = statistics.median(rates)

  if ours is not None and epoch_steps > 0:
    def next_batch() -> dict[str, jax.Array]:
      b = next(it)
      return {'keypoint': jnp.asarray(b['keypoint']), 'label': jnp.asarray(b['label'])}

    fed = functools.partial(ours.train, next_batch=next_batch)
    fed(1)
    times = _alternate({'bare': ours.train, 'grain': fed}, warmup=0, iters=epoch_steps, steps=steps, pause=pause)
    bare, grain = _summary(times['bare'], batch), _summary(times['grain'], batch)
    out['train_step_bare_samples_per_s'] = bare['samples_per_s']
    out['train_with_grain_samples_per_s'] = grain['samples_per_s']
    out['grain_over_bare'] = grain['samples_per_s'] / bare['samples_per_s']
  return out


# ------------------------------------------------------------------------------------------------- main
def run(args: argparse.Namespace, host_malloc: str) -> dict[str, Any]:
  device = jax.devices()[0]
  on_cpu = device.platform == 'cpu'
  steps = args.steps_per_iter or (1 if on_cpu else 10)
  pause = PAUSE_S if on_cpu else 0.0
  torch_device = args.torch_device if args.torch_device != 'auto' else ('cpu' if on_cpu else 'cuda')
  peak = matmul_peak(2048 if on_cpu else 8192, dtype=jnp.dtype(args.dtype))
  result: dict[str, Any] = {
      'config': vars(args) | {'M': NUM_PERSON, 'T': NUM_FRAMES, 'steps_per_iter': steps,
                              'torch_device': torch_device},
      'device': f'{device.platform}:{device.device_kind}', 'jax': jax.__version__,
      'cpu_count': os.cpu_count(), 'matmul_peak_gflops': peak / 1e9, 'host_malloc': host_malloc, 'kinds': {}}
  mmaction, why = (None, '--skip-torch') if args.skip_torch else import_mmaction(args.torch_threads)
  # The stored mmaction2 figures were measured on the 2-core CPU machine: quoted only against a CPU run.
  reference, unmatched = _reference_rates(args.batch, args.dtype) if on_cpu else ({}, '')
  if mmaction is not None:
    result['mmaction2_source'] = f'measured here (torch {torch_device})'
  elif reference:
    result['mmaction2_source'] = f'{REFERENCE.name} (not measured here: {why})'
  else:
    result['mmaction2_source'] = f'none (not measured here: {why}' + (f'; {unmatched})' if unmatched else ')')
  with tempfile.TemporaryDirectory() as tmp:
    for kind in args.kinds:
      ours = Ours(kind, args.batch, args.dtype)
      fns: dict[str, Callable[[int], None]] = {'ours_train': ours.train, 'ours_infer': ours.infer}
      if mmaction is not None:
        mm = MMAction2(mmaction, kind, args.batch, torch_device)
        fns |= {'mm_train': mm.train, 'mm_infer': mm.infer}
      times = _alternate(fns, args.warmup, args.iters, steps, pause)
      row: dict[str, Any] = {name: _summary(t, args.batch) for name, t in times.items()}
      flops = ours.flops()
      row['forward_gflop_per_sample'] = flops / 1e9
      row['train_compile_s'], row['infer_compile_s'] = ours.compile_s, ours.eval_compile_s
      row['train_peak_fraction'] = row['ours_train']['samples_per_s'] * 3 * flops / peak
      row['infer_peak_fraction'] = row['ours_infer']['samples_per_s'] * flops / peak
      row['xla_memory'] = ours.memory
      mm_rates = ({'train_step': row['mm_train']['samples_per_s'], 'inference': row['mm_infer']['samples_per_s']}
                  if mmaction is not None else reference.get(kind))
      if mmaction is None and reference and not mm_rates:
        row['mmaction2_note'] = f'{REFERENCE.name} has no {kind} figures at batch {args.batch} {args.dtype}: no ratio'
      if mm_rates:
        row['mmaction2_samples_per_s'] = mm_rates
        row['train_ratio'] = row['ours_train']['samples_per_s'] / mm_rates['train_step']
        row['infer_ratio'] = row['ours_infer']['samples_per_s'] / mm_rates['inference']
      if not args.skip_pipeline:
        row['pipeline'] = _pipeline(kind, args.batch, args.samples, tmp, ours, args.epoch_steps, args.iters,
                                    steps, pause)
      row['process_peak_rss_mib'] = _rss_mib()
      row['device_peak_mib'] = _device_peak_mib()
      result['kinds'][kind] = row
      del ours
  return result


def print_table(r: dict[str, Any]) -> None:
  cfg = r['config']
  print(f"device {r['device']} (jax {r['jax']}, {r['cpu_count']} CPUs), {cfg['dtype']} matmul peak "
        f"{r['matmul_peak_gflops']:.0f} GFLOP/s; batch {cfg['batch']}, M={cfg['M']}, T={cfg['T']}, "
        f"median of {cfg['iters']} × {cfg['steps_per_iter']} steps; host malloc: {r['host_malloc']}; "
        f"mmaction2: {r['mmaction2_source']}")
  print(f"{'kind':4} {'what':10} {'ours/s':>8} {'mmaction2/s':>12} {'ratio':>6} {'%peak':>6}")
  for kind, row in r['kinds'].items():
    mm = row.get('mmaction2_samples_per_s', {})
    for what, key, mkey, frac in (('train step', 'ours_train', 'train_step', 'train_peak_fraction'),
                                  ('inference', 'ours_infer', 'inference', 'infer_peak_fraction')):
      ratio = row.get('train_ratio' if key == 'ours_train' else 'infer_ratio', float('nan'))
      print(f"{kind:4} {what:10} {row[key]['samples_per_s']:8.2f} {mm.get(mkey, float('nan')):12.2f} "
            f"{ratio:5.2f}x {100 * row[frac]:5.1f}%")
    mem = row['xla_memory']['train_step'] or {}
    print(f"     train-step compile {row['train_compile_s']:.1f} s, inference compile {row['infer_compile_s']:.1f} s; "
          f"XLA temp {mem.get('temp_mib', float('nan')):.0f} MiB; process peak RSS {row['process_peak_rss_mib']:.0f} MiB"
          + (f"; device peak {row['device_peak_mib']:.0f} MiB" if row['device_peak_mib'] else ''))
    p = row.get('pipeline')
    if p:
      line = (f"     Grain pipeline: train {p['train_pipeline_samples_per_s']:.0f} samples/s, 10-clip test "
              f"{p['test10_pipeline_samples_per_s']:.0f} samples/s")
      if 'grain_over_bare' in p:
        line += (f"; train step fed by Grain {p['train_with_grain_samples_per_s']:.2f}/s vs bare "
                 f"{p['train_step_bare_samples_per_s']:.2f}/s ({100 * p['grain_over_bare']:.0f}%)")
      print(line)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--kinds', nargs='+', default=['2d', '3d'], choices=sorted(LAYOUTS))
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--iters', type=int, default=7, help='timed iterations per measurement (median reported)')
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'], help='compute dtype (ours)')
  parser.add_argument('--skip-torch', action='store_true', help='do not run mmaction2 even if importable')
  parser.add_argument('--torch-threads', type=int, default=2)
  parser.add_argument('--torch-device', default='auto',
                      help="mmaction2's torch device: 'cpu', 'cuda', or 'auto' (cuda when JAX runs on a GPU)")
  parser.add_argument('--steps-per-iter', type=int, default=0,
                      help='steps run back to back per timed iteration (0: 1 on the CPU, 10 on accelerators)')
  parser.add_argument('--skip-pipeline', action='store_true', help='no Grain pipeline / whole-epoch measurement')
  parser.add_argument('--samples', type=int, default=64, help='synthetic NTU-sized samples for the pipeline')
  parser.add_argument('--epoch-steps', type=int, default=4, help='train steps fed by Grain (and bare) to time')
  parser.add_argument('--json', action='store_true', help='print the results as JSON')
  args = parser.parse_args(argv)
  if args.steps_per_iter < 0:
    parser.error('--steps-per-iter must be 0 (automatic) or positive')
  for name in ('batch', 'iters', 'samples'):
    if getattr(args, name) < 1:
      parser.error(f'--{name} must be positive')
  if not args.skip_pipeline and args.samples < args.batch:
    parser.error(f'--samples ({args.samples}) must be at least --batch ({args.batch})')
  if not args.skip_torch and args.torch_device != 'cpu':
    # mmaction2 may share the accelerator: JAX must not reserve 75% of its memory up front (set before JAX
    # starts its backend). A value the caller set wins.
    os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  # Both sides share the process and so the allocator: the one our command lines run with (tcmalloc, relaunched
  # in __main__, else glibc keeping freed memory).
  hostmem.keep_freed_memory()
  host_malloc = hostmem.describe()
  result = run(args, host_malloc)
  if args.json:
    json.dump(result, sys.stdout, indent=1)
    print()
  else:
    print_table(result)
  return result


if __name__ == '__main__':
  cli.relaunch_with_tcmalloc()
  main()
