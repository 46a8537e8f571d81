"""Plumbing shared by the absl command lines (``stgcn_jax.train``, ``stgcn_jax.test``): config files that
import their base, the multi-host flags, the persistent compilation cache, logging, exit statuses, and the host
allocator settings (:mod:`stgcn_jax.hostmem`)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stgcn_jax import hostmem
from stgcn_jax import sharding as sharding_lib


def add_config_root(argv: list[str]) -> None:
  """Config files import their base as ``from configs import base``: put the folder above ``configs/`` on the path."""
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      path = arg.split('=', 1)[1]
    elif arg == '--config' and i + 1 < len(argv):
      path = argv[i + 1]
    else:
      continue
    root = str(Path(path.split(':', 1)[0]).absolute().parent.parent)
    if root not in sys.path:
      sys.path.insert(0, root)


def define_distributed_flags(flags) -> None:
  flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 for multi-host runs (default: '
                      'auto-detected from SLURM / Open MPI / TPU / JAX_COORDINATOR_ADDRESS).')
  flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-host, with --coordinator_address and '
                       '--process_id).')
  flags.DEFINE_integer('process_id', None, 'This process index, 0..N-1 (multi-host, with --coordinator_address and '
                       '--num_processes).')


def use_compilation_cache(path: str) -> Path:
  """Keeps the compiled XLA executables in ``path`` (JAX's persistent compilation cache), so that a later run
  of the same step on the same backend and JAX version loads it instead of compiling again (the train step
  compiles in 20-60 s). Must be called before the first compile. Returns the directory."""
  import jax

  from stgcn_jax.train import write_probe

  directory = Path(path).expanduser()
  try:
    write_probe(directory)
  except OSError as e:
    raise ValueError(f'--compilation_cache_dir {path}: not a writable directory ({e.strerror or e}); pass a '
                     'writable folder, or leave the flag out to compile every run') from e
  jax.config.update('jax_compilation_cache_dir', str(directory))
  return directory


def relaunch_with_tcmalloc() -> None:
  """First thing in a command line's ``__main__``: re-executes it on tcmalloc where that is the host allocator to
  use (:func:`stgcn_jax.hostmem.relaunch_with_tcmalloc`); exits with status 2 and the reason when
  ``STGCN_JAX_HOST_MALLOC`` is invalid, or is ``tcmalloc`` and tcmalloc cannot be used."""
  try:
    hostmem.relaunch_with_tcmalloc()
  except (RuntimeError, ValueError) as e:
    sys.exit(fail(e))


def run(body: Callable[[Any], int | None], argv: list[str] | None = None) -> int:
  """Parses the flags defined so far, starts the multi-host runtime when asked, runs ``body(FLAGS)`` and returns
  its exit status (flag errors give absl's status)."""
  from absl import app, flags

  argv = sys.argv if argv is None else argv
  if 'compilation_cache_dir' not in flags.FLAGS:
    flags.DEFINE_string('compilation_cache_dir', None, 'Keep compiled steps in this folder and reuse them in '
                        'later runs (JAX persistent compilation cache; default: off, or $JAX_COMPILATION_CACHE_DIR).')
  hostmem.keep_freed_memory()     # before JAX starts its backend threads
  add_config_root(argv)
  status = 0

  def main(_):
    nonlocal status
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s: %(message)s')
    logging.getLogger(__name__).info('host allocator: %s', hostmem.describe())
    FLAGS = flags.FLAGS
    if FLAGS.compilation_cache_dir:
      try:
        use_compilation_cache(FLAGS.compilation_cache_dir)
      except ValueError as e:
        status = fail(e)
        return
    try:
      sharding_lib.maybe_initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    except ValueError as e:
      status = fail(e)
      return
    status = body(FLAGS) or 0

  try:
    app.run(main, argv=argv)
  except SystemExit as e:
    if e.code not in (None, 0):
      return e.code if isinstance(e.code, int) else 2
  return status


def fail(message: Any, status: int = 2) -> int:
  print(f'error: {message}', file=sys.stderr)
  return status
