"""Host memory allocator for XLA's CPU backend.

XLA:CPU allocates an executable's temporaries at every call and frees them when it returns: gigabytes for an
STGCN++ train step (3.8 GiB for the 3D model at batch 16), and on the CPU the thunks of every op allocate small
blocks too. glibc's malloc serves both badly:

- with its defaults, blocks that large requested from XLA's worker threads are always fresh ``mmap`` regions,
  returned to the kernel on ``free``, so every step page-faults and zeroes all of them again: about 680 000
  faults and 1.3 s of kernel time per 2D train step on a 2-core machine, a million faults per 3D step;
- :func:`keep_freed_memory` makes glibc serve them from its main heap and keep what is freed for the next step
  (after the first step: no faults), but then every thread shares that one arena, which the compiler's
  allocations leave fragmented: 9% of the time of inference went to glibc's ``_int_malloc`` afterwards.

gperftools' tcmalloc has neither problem when it keeps what is freed (``TCMALLOC_RELEASE_RATE=0``): measured
side by side with mmaction2 in one process on 2 cores, the 2D train step ran at 1.17–1.22× mmaction2 under it
against 1.05–1.17× with :func:`keep_freed_memory`, and inference at 1.49–1.67× against 1.42–1.48× (README,
"Speed"). tcmalloc must be loaded before the process starts, so :func:`relaunch_with_tcmalloc` re-executes the
command line with it preloaded (``LD_PRELOAD``). The command lines (``stgcn_jax.train``, ``stgcn_jax.test``,
``stgcn_jax.predict``) and ``scripts/benchmark.py`` call it first; all but ``predict`` then call
:func:`keep_freed_memory`, which applies where tcmalloc is not in use. In a notebook or your own script, call
:func:`keep_freed_memory` first thing, or start Python with ``LD_PRELOAD=libtcmalloc_minimal.so.4
TCMALLOC_RELEASE_RATE=0``.

``STGCN_JAX_HOST_MALLOC`` chooses:

- ``auto`` (the default): only where JAX will compute on the CPU, that is where ``JAX_PLATFORMS`` names ``cpu``
  first, or where it is unset and no accelerator plugin (CUDA, ROCm, TPU) is installed: tcmalloc when it is
  installed (Debian/Ubuntu: ``apt install libtcmalloc-minimal4``; Fedora: ``dnf install gperftools-libs``;
  conda: ``conda install -c conda-forge gperftools``), else glibc with :func:`keep_freed_memory`. On a GPU
  host glibc's defaults are kept: there the single arena serialises the allocations of XLA's parallel compiler
  threads (on a 16-core H100 machine the 2D train step's compile went from 62 s to over 90 s with it);
- ``tcmalloc``: tcmalloc wherever JAX computes, an error where it is not installed;
- ``keep``: glibc with :func:`keep_freed_memory`, wherever JAX computes;
- ``system``: glibc's defaults.

The cost of both ``tcmalloc`` and ``keep``: host memory freed by the process is not returned to the system until
it exits (the resident size stays at its peak).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import logging
import os
import pkgutil
import sys
from collections.abc import Mapping

ENV_VAR = 'STGCN_JAX_HOST_MALLOC'
CHOICES = ('auto', 'tcmalloc', 'keep', 'system')
# Set in the environment of the relaunched process: a relaunch happens at most once.
RELAUNCHED_VAR = 'STGCN_JAX_TCMALLOC_RELAUNCHED'
TCMALLOC_INSTALL = ('Debian/Ubuntu: apt install libtcmalloc-minimal4; Fedora: dnf install gperftools-libs; '
                    'conda: conda install -c conda-forge gperftools')

# glibc <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_applied = False


def accelerator_plugins() -> list[str]:
  """The PJRT accelerator plugins JAX would discover here (entry points, ``jax_plugins.*`` modules, libtpu)."""
  names = [ep.name for ep in importlib.metadata.entry_points(group='jax_plugins')]
  spec = importlib.util.find_spec('jax_plugins')
  if spec is not None and spec.submodule_search_locations:
    names += [m.name for m in pkgutil.iter_modules(spec.submodule_search_locations)]
  if importlib.util.find_spec('libtpu') is not None:
    names.append('libtpu')
  return sorted(set(names))


def computes_on_cpu() -> bool:
  """Whether JAX's default backend will be the CPU: ``JAX_PLATFORMS`` (first entry), else no accelerator plugin."""
  platforms = os.environ.get('JAX_PLATFORMS', '').strip()
  if platforms:
    return platforms.split(',')[0].strip().lower() == 'cpu'
  return not accelerator_plugins()


def choice() -> str:
  """The validated value of ``STGCN_JAX_HOST_MALLOC`` (default ``auto``)."""
  value = os.environ.get(ENV_VAR, 'auto').strip().lower()
  if value not in CHOICES:
    raise ValueError(f'{ENV_VAR}={os.environ[ENV_VAR]!r}: expected one of ' + ', '.join(repr(c) for c in CHOICES)
                     + " ('auto' is the default)")
  return value


def tcmalloc_loaded() -> bool:
  """Whether this process's ``malloc`` is gperftools' tcmalloc (preloaded, or linked into the executable)."""
  if not sys.platform.startswith('linux'):
    return False
  try:
    process = ctypes.CDLL(None)
    return (ctypes.cast(process.malloc, ctypes.c_void_p).value
            == ctypes.cast(process.tc_malloc, ctypes.c_void_p).value)
  except (OSError, AttributeError):
    return False


def find_tcmalloc() -> str | None:
  """The installed tcmalloc library's name as the dynamic loader finds it (``libtcmalloc_minimal.so.4``), or None."""
  for name in ('tcmalloc_minimal', 'tcmalloc'):
    found = ctypes.util.find_library(name)
    if found:
      return found
  return None


def _wants_tcmalloc(setting: str) -> bool:
  return setting == 'tcmalloc' or (setting == 'auto' and computes_on_cpu())


def relaunch_env(environ: Mapping[str, str], library: str | None) -> dict[str, str]:
  """``environ`` with ``library`` preloaded first (None: ``LD_PRELOAD`` as it is), tcmalloc told to keep freed
  memory unless the caller set a release rate, and the relaunch marked."""
  env = dict(environ)
  if library is not None:
    env['LD_PRELOAD'] = ':'.join(p for p in (library, environ.get('LD_PRELOAD', '')) if p)
  env.setdefault('TCMALLOC_RELEASE_RATE', '0')
  env[RELAUNCHED_VAR] = '1'
  return env


def relaunch_with_tcmalloc() -> None:
  """Re-executes this process's command line (``sys.orig_argv``) on tcmalloc, where it is wanted.

  Call it first thing in a command line's ``__main__``, before anything is written or started that the new
  process would repeat. The new process preloads tcmalloc and runs with ``TCMALLOC_RELEASE_RATE=0`` (unless that
  is set); a process already on tcmalloc is relaunched only to set that rate. Nothing happens off Linux, when
  ``STGCN_JAX_HOST_MALLOC`` is ``keep`` or ``system``, when it is ``auto`` and JAX will compute on an
  accelerator or tcmalloc is not installed, when the process is on tcmalloc with a release rate set, and in a
  process it relaunched already. The process keeps its id, so launchers and signals are not affected.
  Raises ``RuntimeError`` when ``STGCN_JAX_HOST_MALLOC`` is ``tcmalloc`` and tcmalloc cannot be used.
  """
  setting = choice()
  if not _wants_tcmalloc(setting):
    return
  loaded = tcmalloc_loaded()
  if loaded and 'TCMALLOC_RELEASE_RATE' in os.environ:
    return
  if not sys.platform.startswith('linux'):
    if setting == 'tcmalloc':
      raise RuntimeError(f'{ENV_VAR}=tcmalloc: preloading tcmalloc needs Linux; use auto or system')
    return
  library = None if loaded else find_tcmalloc()
  if os.environ.get(RELAUNCHED_VAR) or not (loaded or library):
    if setting == 'tcmalloc' and not loaded:
      why = ('the relaunched process does not run on it (see the dynamic loader\'s message above)'
             if library else f'it is not installed ({TCMALLOC_INSTALL})')
      raise RuntimeError(f'{ENV_VAR}=tcmalloc: {why}; or set {ENV_VAR}=auto to fall back to glibc')
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, relaunch_env(os.environ, library))


def keep_freed_memory() -> bool:
  """Configures glibc malloc to keep freed memory for reuse: one arena, no ``mmap``-backed blocks, no trimming.

  Call it before JAX starts its backend (its threads bind to a malloc arena on their first allocation).
  Returns whether the settings are in effect: ``False`` off Linux/glibc, when the process runs on tcmalloc,
  when ``STGCN_JAX_HOST_MALLOC`` is ``system`` or ``tcmalloc``, or when it is ``auto`` and JAX will compute on an
  accelerator. Idempotent.
  """
  global _applied
  if _applied:
    return True
  setting = choice()
  if setting in ('system', 'tcmalloc') or (setting == 'auto' and not computes_on_cpu()):
    return False
  if not sys.platform.startswith('linux') or tcmalloc_loaded():
    return False
  try:
    libc = ctypes.CDLL(None)
    libc.gnu_get_libc_version      # glibc only (musl has no mallopt parameters like these)
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  # M_TRIM_THRESHOLD -1 disables trimming (glibc stores it as size_t); M_MMAP_MAX 0 serves large blocks from
  # the heap; M_ARENA_MAX 1 routes every thread to the main arena, the only one whose large blocks obey it.
  ok = all(mallopt(param, value) == 1
           for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
  if not ok:
    logging.getLogger(__name__).warning('glibc mallopt refused a setting; host allocations keep the defaults')
    return False
  _applied = True
  return True


def describe() -> str:
  """The host allocator in effect, in words (for logs and benchmark reports)."""
  if tcmalloc_loaded():
    rate = os.environ.get('TCMALLOC_RELEASE_RATE')
    return 'tcmalloc' + ('' if rate is None else f' (TCMALLOC_RELEASE_RATE={rate})')
  return 'glibc, freed memory kept (stgcn_jax.hostmem)' if _applied else 'glibc defaults'
