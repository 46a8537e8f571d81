"""scripts/benchmark.py's timing harness: steps per timed call, alternation, per-step times."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

_SCRIPTS = Path(__file__).resolve().parents[1] / 'scripts'


@pytest.fixture(scope='module')
def benchmark():
  sys.path.insert(0, str(_SCRIPTS))
  try:
    spec = importlib.util.spec_from_file_location('stgcn_benchmark', _SCRIPTS / 'benchmark.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
  finally:
    sys.path.remove(str(_SCRIPTS))


def test_alternate_times_steps_back_to_back_and_reports_per_step(benchmark, monkeypatch):
  clock = [0.0]
  monkeypatch.setattr(benchmark.time, 'perf_counter', lambda: clock[0])
  monkeypatch.setattr(benchmark.time, 'sleep', lambda s: calls.append(('sleep', s)))
  calls = []

  def fake(name, seconds_per_step):
    def fn(steps):
      calls.append((name, steps))
      clock[0] += seconds_per_step * steps
    return fn

  times = benchmark._alternate({'a': fake('a', 0.5), 'b': fake('b', 2.0)}, warmup=1, iters=2, steps=4, pause=0.25)
  assert times == {'a': [0.5, 0.5], 'b': [2.0, 2.0]}
  # warm-up without pauses, then each timed call after its own pause, alternating a, b.
  assert calls == [('a', 4), ('b', 4)] + [('sleep', 0.25), ('a', 4), ('sleep', 0.25), ('b', 4)] * 2
  summary = benchmark._summary(times['b'], batch=16)
  assert summary['samples_per_s'] == 8.0 and summary['median_s'] == 2.0 and summary['iters'] == 2


@pytest.mark.parametrize('argv, message', [(['--steps-per-iter', '-1'], '--steps-per-iter'),
                                            (['--batch', '32', '--samples', '16'], '--samples')])
def test_bad_arguments_are_rejected(benchmark, argv, message, capsys):
  with pytest.raises(SystemExit):
    benchmark.main(argv)
  assert message in capsys.readouterr().err


def test_missing_torch_is_reported_not_raised(benchmark, monkeypatch):
  monkeypatch.setitem(sys.modules, 'torch', None)          # import torch raises ImportError
  module, why = benchmark.import_mmaction(2)
  assert module is None and why == 'torch is not installed'


def _fake_run(calls):
  def run(args, host_malloc):
    calls.append(args)
    return {'kinds': {}}
  return run


@pytest.mark.parametrize('argv, preallocate', [
    (['--skip-pipeline', '--batch', '128'], 'false'),               # mmaction2 may share the accelerator
    (['--skip-pipeline', '--batch', '128', '--skip-torch'], None),   # JAX alone keeps its default
    (['--skip-pipeline', '--torch-device', 'cpu'], None)])
def test_arguments_reach_the_run_and_jax_leaves_room_for_torch(benchmark, monkeypatch, argv, preallocate):
  calls = []
  monkeypatch.setattr(benchmark, 'run', _fake_run(calls))
  monkeypatch.setattr(benchmark, 'print_table', lambda result: None)
  monkeypatch.setattr(benchmark.hostmem, 'keep_freed_memory', lambda: False)
  monkeypatch.delenv('XLA_PYTHON_CLIENT_PREALLOCATE', raising=False)
  benchmark.main(argv)
  # --samples (default 64) only sizes the pipeline measurement, so a batch above it is fine with --skip-pipeline.
  assert len(calls) == 1 and calls[0].samples == 64
  assert benchmark.os.environ.get('XLA_PYTHON_CLIENT_PREALLOCATE') == preallocate


def test_mmaction2_imports_without_its_multimodal_models(benchmark, monkeypatch, tmp_path):
  # mmaction.models imports VindLU whenever transformers>=4.28 is installed, and that import fails against
  # newer transformers releases (seen on a GPU machine). A stand-in package reproduces that failure mode.
  package = tmp_path / 'mmaction'
  (package / 'utils').mkdir(parents=True)
  (package / 'models').mkdir()
  (package / '__init__.py').write_text('')
  (package / 'utils' / '__init__.py').write_text('def register_all_modules():\n  pass\n')
  (package / 'utils' / 'dependency.py').write_text('WITH_MULTIMODAL = True\n')
  (package / 'models' / '__init__.py').write_text(
      'from mmaction.utils.dependency import WITH_MULTIMODAL\n'
      'if WITH_MULTIMODAL:\n'
      "  raise ImportError(\"cannot import name 'apply_chunking_to_forward' from 'transformers.modeling_utils'\")\n")
  threads = []
  monkeypatch.setitem(sys.modules, 'torch', type(sys)('torch'))
  sys.modules['torch'].set_num_threads = threads.append
  for name in [n for n in sys.modules if n == 'mmaction' or n.startswith('mmaction.')]:
    monkeypatch.delitem(sys.modules, name)
  monkeypatch.syspath_prepend(str(tmp_path))
  try:
    module, why = benchmark.import_mmaction(3)
    assert why == '' and module.__file__ == str(package / '__init__.py') and threads == [3]
    assert sys.modules['mmaction.utils.dependency'].WITH_MULTIMODAL is False
  finally:
    for name in [n for n in sys.modules if n == 'mmaction' or n.startswith('mmaction.')]:
      del sys.modules[name]


@pytest.fixture(scope='module')
def bench_pipeline():
  spec = importlib.util.spec_from_file_location('stgcn_bench_pipeline', _SCRIPTS / 'bench_pipeline.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize('argv,message', [(['--runs', '0'], '--runs must be positive, got 0'),
                                          (['--batch', '0', '--samples', '4'], '--batch must be positive, got 0'),
                                          (['--batch', '-1'], '--batch must be positive, got -1'),
                                          (['--samples', '0'], '--samples must be positive, got 0')])
def test_bench_pipeline_rejects_bad_counts(bench_pipeline, argv, message, capsys):
  with pytest.raises(SystemExit) as e:
    bench_pipeline.main(argv + ['--dims', '2d'])
  assert e.value.code == 2 and message in capsys.readouterr().err


def test_bench_pipeline_cpu_speedup_compares_like_with_like(bench_pipeline):
  ours = {'ms_per_sample': 2.0, 'cpu_ms_per_sample': 1.0}
  measured = bench_pipeline.cpu_speedup({'ms_per_sample': 8.0, 'cpu_ms_per_sample': 4.0}, ours)
  assert measured['cpu_speedup_vs_mmaction2'] == 4.0 and 'both measured here' in measured['cpu_speedup_basis']
  stored = bench_pipeline.cpu_speedup({'ms_per_sample': 8.0, 'source': 'fixtures README'}, ours)
  assert stored['cpu_speedup_vs_mmaction2'] == 8.0 and 'wall time' in stored['cpu_speedup_basis']
  # A run: mmaction2 measured here (when installed) is compared in CPU time with ours.
  out = bench_pipeline.main(['--samples', '16', '--batch', '16', '--runs', '1', '--dims', '2d', '--json'])
  for row in out['results']:
    mm, grain = row['mmaction2'], row['grain']
    if 'cpu_ms_per_sample' in mm:
      assert row['cpu_speedup_vs_mmaction2'] == mm['cpu_ms_per_sample'] / grain['cpu_ms_per_sample']
    else:
      assert row['cpu_speedup_vs_mmaction2'] == mm['ms_per_sample'] / grain['cpu_ms_per_sample']


def test_stored_mmaction2_figures_are_compared_only_at_their_batch_and_dtype(benchmark, tmp_path):
  def row(kind, batch, infer, train, **extra):
    return {'kind': kind, 'batch': batch, 'inference': {'samples_per_s': infer},
            'train_step': {'samples_per_s': train}, **extra}
  path = tmp_path / 'bench_cpu.json'
  path.write_text(json.dumps({'runs': [[row('2d', 16, 12.0, 3.5), row('3d', 16, 8.0, 2.0)],
                                       [row('2d', 16, 13.0, 3.0), row('2d', 4, 50.0, 9.0, dtype='bfloat16')]]}))
  rates, why = benchmark._reference_rates(16, 'float32', path)
  assert rates == {'2d': {'inference': 13.0, 'train_step': 3.5}, '3d': {'inference': 8.0, 'train_step': 2.0}}
  assert why == ''
  assert benchmark._reference_rates(4, 'bfloat16', path)[0] == {'2d': {'inference': 50.0, 'train_step': 9.0}}
  for batch, dtype in ((2, 'float32'), (16, 'bfloat16'), (4, 'float32')):
    rates, why = benchmark._reference_rates(batch, dtype, path)
    assert rates == {}
    assert why == (f'bench_cpu.json holds batch 16 float32, batch 4 bfloat16 figures and this run is batch {batch} '
                   f'{dtype}: no ratio (run with those settings, or with mmaction2 installed, to compare)')
  assert benchmark._reference_rates(16, 'float32', tmp_path / 'none.json') == ({}, 'none.json not found')
