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
  its exit status. Flag errors (absl's, a config override naming no field, a config file that cannot be loaded)
  print one ``error:`` line and give status 2."""
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

  def parse_flags(args):
    # Config files and --config.a.b=value overrides are loaded while absl parses the flags, and their errors are
    # not absl's (which it reports itself): a missing field, a config file that fails to load.
    try:
      rest = flags.FLAGS(args)
    except flags.Error as e:  # absl's own: an unknown flag, a value of the wrong type (status 2, as every mistake)
      sys.exit(fail(f'{e} (--helpshort lists the flags)'))
    except Exception as e:   # noqa: BLE001 - anything a config file's code raises, too
      sys.exit(fail(config_flag_error(e, args)))
    for flag in config_flags_of(flags.FLAGS):
      try:
        getattr(flag.value, 'to_dict')      # a config that failed to load raises on any attribute
      except OSError as e:
        sys.exit(fail(config_file_error(flag, e)))
    return rest

  try:
    app.run(main, argv=argv, flags_parser=parse_flags)
  except SystemExit as e:
    if e.code not in (None, 0):
      return e.code if isinstance(e.code, int) else 2
  return status


def config_flags_of(flag_values) -> list:
  """The ml_collections config-file flags that were given (``--config FILE``)."""
  from ml_collections import config_flags
  found = []
  for name in flag_values:
    flag = flag_values[name]
    try:
      config_flags.get_config_filename(flag)
    except TypeError:         # not a config flag
      continue
    if flag.present and flag.value is not None:
      found.append(flag)
  return found


def config_file_error(flag, error: BaseException) -> str:
  """The message for a config file that could not be loaded (``error``: ml_collections' report)."""
  from ml_collections import config_flags
  path = config_flags.get_config_filename(flag)
  if not Path(path).is_file():
    return (f'--{flag.name} {path}: no such config file; give one of configs/*.py (e.g. '
            'configs/ntu60_2d_joint.py) or a path to your own')
  detail = str(error).strip().splitlines()[-1].strip()
  return f'--{flag.name} {path}: the config file cannot be loaded ({detail})'


def config_flag_error(error: BaseException, args: list[str]) -> str:
  """The message for an error raised while absl parsed the flags: a config override naming a field the config
  does not have, or a config file whose code fails (it runs during parsing)."""
  if isinstance(error, (KeyError, AttributeError)):
    key = str(error).strip('"\'')
    overrides = [a for a in args[1:] if a.startswith('--') and '.' in a.split('=', 1)[0]]
    named = [a for a in overrides if key in a.split('=', 1)[0].lstrip('-').split('.')[1:]]
    if named:
      field = named[0].split('=', 1)[0]
      return (f'{field}: the config has no field {key!r}; configs are locked, so a field must already exist '
              '(check the spelling; configs/base.py lists them all)')
  config_args = [a for a in args[1:] if a.startswith('--config=')] or [
      f'--config {b}' for a, b in zip(args[1:], args[2:]) if a == '--config']
  where = f'{config_args[-1]}: ' if config_args else ''
  return f'{where}the config file or an override failed ({type(error).__name__}: {error})'


def fail(message: Any, status: int = 2) -> int:
  print(f'error: {message}', file=sys.stderr)
  return status
