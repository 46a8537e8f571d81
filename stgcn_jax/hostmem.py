"""Host memory allocator settings for XLA's CPU backend.

XLA:CPU allocates an executable's temporaries at every call and frees them when it returns: gigabytes for an
STGCN++ train step (3.8 GiB for the 3D model at batch 16). Under glibc, blocks that large requested from
XLA's worker threads are always fresh ``mmap`` regions, returned to the kernel on ``free``, so every step
page-faults and zeroes all of them again: about 680 000 faults and 1.3 s of kernel time per 2D train step on
a 2-core machine, a million faults per 3D step. :func:`keep_freed_memory` makes glibc serve them from its
main heap and keep what is freed for the next step instead (after the first step: no faults).

The command lines (``stgcn_jax.train``, ``stgcn_jax.test``) and ``scripts/benchmark.py`` call it at start-up;
call it first thing in a notebook or script to get the same. ``STGCN_JAX_HOST_MALLOC=system`` keeps glibc's
defaults. The cost: host memory freed by the process is not returned to the system until it exits (the
resident size stays at its peak), and all threads share one malloc arena.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

ENV_VAR = 'STGCN_JAX_HOST_MALLOC'

# glibc <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_applied = False


def keep_freed_memory() -> bool:
  """Configures glibc malloc to keep freed memory for reuse: one arena, no ``mmap``-backed blocks, no trimming.

  Call it before JAX starts its backend (its threads bind to a malloc arena on their first allocation).
  Returns whether the settings are in effect: ``False`` off Linux/glibc, or when ``STGCN_JAX_HOST_MALLOC`` is
  ``system``. Idempotent.
  """
  global _applied
  if _applied:
    return True
  choice = os.environ.get(ENV_VAR, 'keep').strip().lower()
  if choice == 'system':
    return False
  if choice != 'keep':
    raise ValueError(f"{ENV_VAR}={os.environ[ENV_VAR]!r}: expected 'keep' (the default) or 'system'")
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
