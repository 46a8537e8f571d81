"""Shared test fixtures: where the mmaction2 goldens live, and CPU-only JAX."""

import os
from pathlib import Path

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Eight fake CPU devices, as the reference 8-GPU setup: data-parallel tests build meshes of 1..8 of them.
if '--xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()

import pytest

_DEFAULT_FIXTURES = Path(__file__).resolve().parents[2] / 'shared' / 'fixtures' / 'mmaction2'
FIXTURES = Path(os.environ.get('STGCN_FIXTURES', _DEFAULT_FIXTURES))


@pytest.fixture(scope='session')
def fixtures_dir() -> Path:
  """``../shared/fixtures/mmaction2`` beside the checkout (override with ``STGCN_FIXTURES``)."""
  if not (FIXTURES / 'README.md').exists():
    pytest.fail(f'mmaction2 golden fixtures not found at {FIXTURES}; set STGCN_FIXTURES to their folder')
  return FIXTURES
