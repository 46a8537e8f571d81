"""A restricted unpickler for annotation files (mmaction2 / pyskl skeleton pickles).

The published annotation files (``ntu60_2d.pkl``, ``ntu60_hrnet.pkl``, ...) are plain pickles of builtin
containers and numpy arrays. ``pickle.load`` on a downloaded file runs whatever callable the file names
(``os.system``, ``builtins.eval``, ...), so this module loads them with an allow-list instead: only the
globals needed to rebuild numpy arrays, dtypes and scalars (numpy 1.x ``numpy.core.*`` and numpy 2.x
``numpy._core.*`` spellings), builtin containers and scalars, and ``collections.OrderedDict``.

Anything else raises :class:`UnsafePickleError` *before* the global is called, so nothing in the file runs.
Truncated, garbled or non-pickle files raise a ``ValueError`` naming the file, never a bare traceback from
inside :mod:`pickle`.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import collections
import io
import os
import pickle
from typing import Any

import numpy as np

__all__ = ['UnsafePickleError', 'load_pickle', 'loads_pickle', 'ALLOWED_GLOBALS']

_NUMPY_CORE = 'numpy._core' if int(np.__version__.split('.')[0]) >= 2 else 'numpy.core'


class UnsafePickleError(pickle.UnpicklingError, ValueError):
  """The pickle names a global outside the allow-list; nothing from it was executed."""


def _latin1_encode(text: str, encoding: str = 'latin1') -> bytes:
  """``_codecs.encode`` restricted to latin-1: protocol-2 pickles store ``bytes`` (numpy buffers) this way."""
  if codecs.lookup(encoding).name != 'iso8859-1':
    raise UnsafePickleError(f'_codecs.encode with encoding {encoding!r} is not allowed (only latin1)')
  return codecs.encode(text, 'latin1')


def _numpy_global(module: str, name: str) -> Any:
  # Files written under numpy 1.x name numpy.core.*, under 2.x numpy._core.*; resolve either spelling to the
  # installed numpy's module without going through the deprecated numpy.core shim.
  import importlib
  suffix = module.split('.', 2)[2] if module.count('.') >= 2 else ''
  target = f'{_NUMPY_CORE}.{suffix}' if suffix else _NUMPY_CORE
  return getattr(importlib.import_module(target), name)


_BUILTINS = ('dict', 'list', 'tuple', 'set', 'frozenset', 'str', 'int', 'float', 'bool', 'complex', 'bytes',
             'bytearray', 'slice', 'range')
_NUMPY_CORE_NAMES = {
    'multiarray': ('_reconstruct', 'scalar'),
    'numeric': ('_frombuffer',),
}

# (module, name) -> resolver. One visible table: this is the whole surface a file can reach.
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    **{('builtins', n): (lambda n=n: getattr(__import__('builtins'), n)) for n in _BUILTINS},
    ('collections', 'OrderedDict'): lambda: collections.OrderedDict,
    ('_codecs', 'encode'): lambda: _latin1_encode,
    ('numpy', 'ndarray'): lambda: np.ndarray,
    ('numpy', 'dtype'): lambda: np.dtype,
    **{(f'{core}.{sub}', n): (lambda core=core, sub=sub, n=n: _numpy_global(f'{core}.{sub}', n))
       for core in ('numpy.core', 'numpy._core') for sub, names in _NUMPY_CORE_NAMES.items() for n in names},
}


def python3_name(module: str, name: str) -> tuple[str, str]:
  """Protocol 0-2 pickles use Python 2 names (``__builtin__.xrange``, ``copy_reg``, ...): map them as pickle does."""
  if (module, name) in _compat_pickle.NAME_MAPPING:
    module, name = _compat_pickle.NAME_MAPPING[(module, name)]
  return _compat_pickle.IMPORT_MAPPING.get(module, module), name


class _RestrictedUnpickler(pickle.Unpickler):

  def __init__(self, file, source: str):
    super().__init__(file)
    self._source = source

  def find_class(self, module: str, name: str) -> Any:
    module, name = python3_name(module, name)
    resolver = ALLOWED_GLOBALS.get((module, name))
    if resolver is None:
      raise UnsafePickleError(
          f'{self._source}: refused to load the global {module}.{name}: an annotation file may only contain '
          'numpy arrays and builtin containers (dict, list, tuple, str, int, float, ...). The file may be '
          'malicious; nothing from it was executed. Do not open it with plain pickle.load unless you trust '
          'its origin; if you do, re-save it as plain dicts, lists and numpy arrays.')
    return resolver()

  def persistent_load(self, pid: Any) -> Any:
    raise UnsafePickleError(f'{self._source}: refused a persistent id {pid!r}; annotation files never use them. '
                            'The file may be malicious; nothing from it was executed.')


def _load(file, source: str) -> Any:
  try:
    obj = _RestrictedUnpickler(file, source).load()
  except UnsafePickleError:
    raise
  except Exception as e:  # pickle raises many types (EOFError, UnpicklingError, KeyError, ...) on bad input
    raise ValueError(f'{source}: not a readable pickle ({type(e).__name__}: {e}); the file is truncated, '
                     'corrupted or not a pickle at all. Re-download or regenerate it.') from None
  trailing = file.read(1)
  if trailing:
    raise ValueError(f'{source}: unexpected data after the end of the pickle; the file is corrupted or two '
                     'files were concatenated. Re-download or regenerate it.')
  return obj


def load_pickle(path: str | os.PathLike) -> Any:
  """Loads a pickle that may only contain numpy arrays and builtin containers.

  Raises:
    FileNotFoundError: ``path`` does not exist.
    UnsafePickleError: the file names a callable outside the allow-list (nothing is executed).
    ValueError: the file is truncated, garbled or not a pickle.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'annotation file {path!r} does not exist; check the path (ann_file in the config)')
  if os.path.isdir(path):
    raise ValueError(f'{path}: is a directory, expected an annotation pickle file')
  with open(path, 'rb', buffering=1 << 20) as f:
    return _load(f, path)


def loads_pickle(data: bytes, source: str = '<bytes>') -> Any:
  """:func:`load_pickle` for an in-memory pickle; ``source`` names it in error messages."""
  return _load(io.BytesIO(data), source)
