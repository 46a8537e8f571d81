"""The host allocator: XLA:CPU's per-call temporaries stop page-faulting after the first call, under glibc with
keep_freed_memory and under tcmalloc after the relaunch."""

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


_RELAUNCH = 'from stgcn_jax import hostmem; hostmem.relaunch_with_tcmalloc()\n'
needs_tcmalloc = pytest.mark.skipif(hostmem.find_tcmalloc() is None, reason='tcmalloc (gperftools) is not installed')


def _env(setting: str) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if k not in ('LD_PRELOAD', 'TCMALLOC_RELEASE_RATE',
                                                          hostmem.RELAUNCHED_VAR)}
  return dict(env, JAX_PLATFORMS='cpu', **{hostmem.ENV_VAR: setting})


def _probe(setting: str, relaunch: bool = False) -> tuple[str, int]:
  code = (_RELAUNCH if relaunch else '') + _PROBE
  out = subprocess.run([sys.executable, '-c', code], env=_env(setting), capture_output=True, text=True, check=True)
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
  for call in (hostmem.keep_freed_memory, hostmem.relaunch_with_tcmalloc):
    with pytest.raises(ValueError, match="STGCN_JAX_HOST_MALLOC='fast'.*'auto'.*'tcmalloc'.*'keep'.*'system'"):
      call()


_REPORT = ('import os; print(os.getpid(), hostmem.tcmalloc_loaded(), hostmem.keep_freed_memory()); '
           'print(hostmem.describe())')


@needs_tcmalloc
@pytest.mark.parametrize('setting, on_tcmalloc, kept', [('auto', True, False), ('tcmalloc', True, False),
                                                        ('keep', False, True), ('system', False, False)])
def test_relaunch_on_tcmalloc(setting, on_tcmalloc, kept):
  proc = subprocess.Popen([sys.executable, '-c', _RELAUNCH + _REPORT], env=_env(setting), stdout=subprocess.PIPE,
                          text=True)
  out, _ = proc.communicate()
  assert proc.returncode == 0
  first, described = out.splitlines()
  assert first.split() == [str(proc.pid), str(on_tcmalloc), str(kept)]    # relaunched in the same process
  assert described == {'auto': 'tcmalloc (TCMALLOC_RELEASE_RATE=0)', 'tcmalloc': 'tcmalloc (TCMALLOC_RELEASE_RATE=0)',
                       'keep': 'glibc, freed memory kept (stgcn_jax.hostmem)', 'system': 'glibc defaults'}[setting]


@needs_tcmalloc
@pytest.mark.parametrize('rate, described', [(None, 'tcmalloc (TCMALLOC_RELEASE_RATE=0)'),
                                             ('3', 'tcmalloc (TCMALLOC_RELEASE_RATE=3)')])
def test_a_process_preloaded_with_tcmalloc_is_relaunched_only_to_keep_freed_memory(rate, described):
  env = dict(_env('auto'), LD_PRELOAD=hostmem.find_tcmalloc())
  if rate is not None:
    env['TCMALLOC_RELEASE_RATE'] = rate
  code = _RELAUNCH + 'import os; print(os.environ.get(hostmem.RELAUNCHED_VAR)); print(hostmem.describe())'
  out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, check=True)
  assert out.stdout.splitlines() == [('1' if rate is None else 'None'), described]


@needs_tcmalloc
def test_tcmalloc_reuses_temporaries_after_the_relaunch():
  applied, faults = _probe('auto', relaunch=True)
  assert applied == 'False'                      # tcmalloc serves malloc: glibc's settings do not apply
  assert faults < 1000, faults


def test_relaunch_env_preloads_tcmalloc_first_and_keeps_the_callers_settings():
  env = hostmem.relaunch_env({'LD_PRELOAD': 'libfoo.so', 'PATH': '/bin'}, 'libtcmalloc_minimal.so.4')
  assert env == {'LD_PRELOAD': 'libtcmalloc_minimal.so.4:libfoo.so', 'PATH': '/bin', 'TCMALLOC_RELEASE_RATE': '0',
                 hostmem.RELAUNCHED_VAR: '1'}
  env = hostmem.relaunch_env({'TCMALLOC_RELEASE_RATE': '2'}, '/opt/lib/libtcmalloc.so')
  assert env == {'LD_PRELOAD': '/opt/lib/libtcmalloc.so', 'TCMALLOC_RELEASE_RATE': '2', hostmem.RELAUNCHED_VAR: '1'}
  env = hostmem.relaunch_env({'LD_PRELOAD': 'libtcmalloc.so.4'}, None)     # already on tcmalloc
  assert env == {'LD_PRELOAD': 'libtcmalloc.so.4', 'TCMALLOC_RELEASE_RATE': '0', hostmem.RELAUNCHED_VAR: '1'}


@pytest.fixture
def no_exec(monkeypatch):
  """Fails the test if the process would be re-executed; tcmalloc counts as installed and not loaded."""
  def execve(*args):
    raise AssertionError(f'relaunched: {args}')
  monkeypatch.setattr(hostmem.os, 'execve', execve)
  monkeypatch.setattr(hostmem, 'find_tcmalloc', lambda: 'libtcmalloc_minimal.so.4')
  monkeypatch.setattr(hostmem, 'tcmalloc_loaded', lambda: False)
  monkeypatch.delenv(hostmem.RELAUNCHED_VAR, raising=False)


@pytest.mark.parametrize('setting, on_cpu', [('auto', False), ('keep', True), ('system', True)])
def test_no_relaunch_where_tcmalloc_is_not_wanted(no_exec, monkeypatch, setting, on_cpu):
  monkeypatch.setenv(hostmem.ENV_VAR, setting)
  monkeypatch.setattr(hostmem, 'computes_on_cpu', lambda: on_cpu)
  hostmem.relaunch_with_tcmalloc()


def test_no_second_relaunch(no_exec, monkeypatch):
  monkeypatch.setattr(hostmem, 'computes_on_cpu', lambda: True)
  monkeypatch.setenv(hostmem.RELAUNCHED_VAR, '1')        # the preload did not take
  monkeypatch.setenv(hostmem.ENV_VAR, 'auto')
  hostmem.relaunch_with_tcmalloc()                       # falls back to glibc
  monkeypatch.setenv(hostmem.ENV_VAR, 'tcmalloc')
  with pytest.raises(RuntimeError, match='tcmalloc: the relaunched process does not run on it.*HOST_MALLOC=auto'):
    hostmem.relaunch_with_tcmalloc()


def test_tcmalloc_asked_for_but_not_installed(no_exec, monkeypatch):
  monkeypatch.setattr(hostmem, 'find_tcmalloc', lambda: None)
  monkeypatch.setenv(hostmem.ENV_VAR, 'auto')
  monkeypatch.setattr(hostmem, 'computes_on_cpu', lambda: True)
  hostmem.relaunch_with_tcmalloc()                       # auto: glibc instead
  monkeypatch.setenv(hostmem.ENV_VAR, 'tcmalloc')
  with pytest.raises(RuntimeError, match='tcmalloc: it is not installed .*apt install libtcmalloc-minimal4'):
    hostmem.relaunch_with_tcmalloc()


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
