"""Host memory allocator settings for XLA's CPU backend.

XLA:CPU allocates an executable's temporaries at every call and frees them when it returns: gigabytes for an
STGCN++ train step (3.8 GiB for the 3D model at batch 16). Under glibc, blocks that large requested from
XLA's worker threads are always fresh ``mmap`` regions, returned to the kernel on ``free``, so every step
page-faults and zeroes all of them again: about 680 000 faults and 1.3 s of kernel time per 2D train step on
a 2-core machine, a million faults per 3D step. :func:`keep_freed_memory` makes glibc serve them from its
main heap and keep what is freed for the next step instead (after the first step: no faults).

The command lines (``stgcn_jax.train``, ``stgcn_jax.test``) and ``scripts/benchmark.py`` call it at start-up;
call it first thing in a notebook or script to get the same. ``STGCN_JAX_HOST_MALLOC`` chooses:

- ``auto`` (the default): the settings apply only where JAX will compute on the CPU, that is where
  ``JAX_PLATFORMS`` names ``cpu`` first, or where it is unset and no accelerator plugin (CUDA, ROCm, TPU) is
  installed. On a GPU host the single arena serialises the allocations of XLA's parallel compiler threads:
  on a 16-core H100 machine the 2D train step's compile went from 62 s to over 90 s with it;
- ``keep``: always apply them;
- ``system``: keep glibc's defaults.

The cost: host memory freed by the process is not returned to the system until it exits (the resident size
stays at its peak), and all threads share one malloc arena.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import logging
import os
import pkgutil
import sys

ENV_VAR = 'STGCN_JAX_HOST_MALLOC'

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


def keep_freed_memory() -> bool:
  """Configures glibc malloc to keep freed memory for reuse: one arena, no ``mmap``-backed blocks, no trimming.

  Call it before JAX starts its backend (its threads bind to a malloc arena on their first allocation).
  Returns whether the settings are in effect: ``False`` off Linux/glibc, when ``STGCN_JAX_HOST_MALLOC`` is
  ``system``, or when it is ``auto`` (the default) and JAX will compute on an accelerator. Idempotent.
  """
  global _applied
  if _applied:
    return True
  choice = os.environ.get(ENV_VAR, 'auto').strip().lower()
  if choice not in ('auto', 'keep', 'system'):
    raise ValueError(f"{ENV_VAR}={os.environ[ENV_VAR]!r}: expected 'auto' (the default), 'keep' or 'system'")
  if choice == 'system' or (choice == 'auto' and not computes_on_cpu()):
    return False
  if not sys.platform.startswith('linux'):
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
