"""scripts/benchmark.py's timing harness: steps per timed call, alternation, per-step times."""

import importlib.util
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
  assert module is None and why.startswith('torch: ')
