"""keep_freed_memory: XLA:CPU's per-call temporaries stop page-faulting after the first call."""

import os
import subprocess
import sys

import pytest

from stgcn_jax import hostmem

pytestmark = pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc settings')

# A jitted function whose 64 MiB matmul result is an XLA temporary (only its sum is returned); prints the fewest
# minor page faults of one call over four calls after two warm-ups.
_PROBE = r'''
import resource, sys
from stgcn_jax import hostmem
print(hostmem.keep_freed_memory())
import jax, jax.numpy as jnp
x = jnp.ones((4096, 4096), jnp.float32)
f = jax.jit(lambda x: jnp.sum(jnp.dot(x, x) * 2.0))
f(x).block_until_ready(); f(x).block_until_ready()
faults = []
for _ in range(4):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(faults))
'''


def _probe(setting: str) -> tuple[str, int]:
  env = dict(os.environ, JAX_PLATFORMS='cpu', **{hostmem.ENV_VAR: setting})
  out = subprocess.run([sys.executable, '-c', _PROBE], env=env, capture_output=True, text=True, check=True)
  applied, faults = out.stdout.split()
  return applied, int(faults)


def test_temporaries_are_reused_instead_of_faulted_in_again():
  applied, faults = _probe('auto')               # JAX_PLATFORMS=cpu: applies
  assert applied == 'True'
  assert faults < 1000, faults                   # a 64 MiB temporary is 16384 pages
  applied, faults = _probe('system')
  assert applied == 'False'
  assert faults > 16384 / 2, faults              # glibc's default: the temporary is mapped afresh every call


def test_unknown_setting_is_rejected(monkeypatch):
  monkeypatch.setattr(hostmem, '_applied', False)
  monkeypatch.setenv(hostmem.ENV_VAR, 'fast')
  with pytest.raises(ValueError, match="STGCN_JAX_HOST_MALLOC='fast'.*'auto'.*'keep'.*'system'"):
    hostmem.keep_freed_memory()


@pytest.mark.parametrize('platforms, on_cpu', [('cpu', True), (' CPU ', True), ('cpu,cuda', True),
                                               ('cuda', False), ('cuda,cpu', False), ('tpu', False)])
def test_auto_follows_jax_platforms(monkeypatch, platforms, on_cpu):
  monkeypatch.setattr(hostmem, 'accelerator_plugins', lambda: ['xla_cuda13'])   # JAX_PLATFORMS decides alone
  monkeypatch.setenv('JAX_PLATFORMS', platforms)
  assert hostmem.computes_on_cpu() is on_cpu


def test_auto_leaves_accelerator_hosts_alone(monkeypatch, tmp_path):
  # An accelerator plugin as JAX finds one: a module of the jax_plugins namespace package.
  (tmp_path / 'jax_plugins' / 'fake_accel').mkdir(parents=True)
  (tmp_path / 'jax_plugins' / 'fake_accel' / '__init__.py').write_text('')
  monkeypatch.delenv('JAX_PLATFORMS', raising=False)
  monkeypatch.setenv(hostmem.ENV_VAR, 'auto')
  monkeypatch.setattr(hostmem, '_applied', False)
  monkeypatch.syspath_prepend(str(tmp_path))
  assert 'fake_accel' in hostmem.accelerator_plugins()
  assert hostmem.computes_on_cpu() is False
  assert hostmem.keep_freed_memory() is False     # returns before any mallopt call
  assert hostmem._applied is False
