"""Shared test fixtures: where the mmaction2 goldens live, and CPU-only JAX."""

import os
from pathlib import Path

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Eight fake CPU devices, as the reference 8-GPU setup: data-parallel tests build meshes of 1..8 of them.
if '--xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()

import tempfile

import jax
import pytest

# Many tests compile the same small programs (tiny training configs, the reference models): a persistent
# compilation cache for the session makes the repeats cheap. STGCN_TEST_JAX_CACHE overrides its location.
jax.config.update('jax_compilation_cache_dir', os.environ.get(
    'STGCN_TEST_JAX_CACHE', os.path.join(tempfile.gettempdir(), f'stgcn_jax_test_cache_{os.getuid()}')))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)

_DEFAULT_FIXTURES = Path(__file__).resolve().parents[2] / 'shared' / 'fixtures' / 'mmaction2'
FIXTURES = Path(os.environ.get('STGCN_FIXTURES', _DEFAULT_FIXTURES))


@pytest.fixture(scope='session')
def fixtures_dir() -> Path:
  """``../shared/fixtures/mmaction2`` beside the checkout (override with ``STGCN_FIXTURES``)."""
  if not (FIXTURES / 'README.md').exists():
    pytest.fail(f'mmaction2 golden fixtures not found at {FIXTURES}; set STGCN_FIXTURES to their folder')
  return FIXTURES
