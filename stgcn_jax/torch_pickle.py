"""Reads PyTorch ``.pth`` checkpoints without torch and without running code from the file.

``torch.save`` writes a pickle whose tensors point, through *persistent ids*, at raw storage buffers:

* the zip format (torch >= 1.6): ``<archive>/data.pkl`` (the pickle), ``<archive>/data/<key>`` (one raw buffer
  per storage), ``<archive>/byteorder`` (``little``/``big``; absent means little);
* the legacy format: five pickles in a row (magic number, protocol version, system info, the object, the list
  of storage keys), then each storage as an int64 element count followed by its bytes.

A plain ``pickle.load`` calls whatever callable the file names (``os.system``, ``builtins.eval``...). Here the
unpickler resolves globals through one table, :data:`ALLOWED_GLOBALS`: torch's tensor rebuild functions (our
numpy re-implementations, never torch's), storage classes (markers holding a numpy dtype), torch dtypes,
``collections.OrderedDict``, builtin containers and scalars, and numpy arrays/scalars (the table of
:mod:`stgcn_jax.safe_pickle`). A few bookkeeping classes that training frameworks store beside the weights
(mmengine's ``HistoryBuffer`` in ``message_hub``) become inert :class:`IgnoredObject` placeholders: nothing of
theirs is imported or called. Any other global raises :class:`UnsafeCheckpointError` before it is resolved,
so nothing in the file runs.

Tensors become numpy arrays (a copy, C-contiguous, native byte order, strides honoured). bfloat16 tensors
become ``ml_dtypes.bfloat16`` arrays (exact; ``.astype(np.float32)`` widens them losslessly).
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile
from collections.abc import Mapping
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

from stgcn_jax.safe_pickle import ALLOWED_GLOBALS as _NUMPY_AND_BUILTIN_GLOBALS
from stgcn_jax.safe_pickle import python3_name

__all__ = ['CheckpointFormatError', 'UnsafeCheckpointError', 'IgnoredObject', 'TorchCheckpoint', 'load',
           'load_checkpoint', 'load_state_dict', 'ALLOWED_GLOBALS']

LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
LEGACY_PROTOCOL = 1001


class CheckpointFormatError(ValueError):
  """The file is not a readable PyTorch checkpoint (truncated, corrupted, not a checkpoint, unsupported)."""


class UnsafeCheckpointError(pickle.UnpicklingError, ValueError):
  """The checkpoint's pickle names a global outside the allow-list; nothing from it was executed."""


class IgnoredObject:
  """Stands in for a framework bookkeeping object (e.g. mmengine's ``HistoryBuffer``) that is never used here.

  It is built from the pickle's data without importing or calling the original class; ``name`` says which.
  """

  name = '?'

  def __new__(cls, *args, **kwargs):
    return object.__new__(cls)

  def __init__(self, *args, **kwargs):
    pass

  def __setstate__(self, state):
    pass

  def __repr__(self) -> str:
    return f'<ignored {self.name}>'


def _ignored(qualname: str) -> type:
  return type('IgnoredObject', (IgnoredObject,), {'name': qualname})


# ------------------------------------------------------------------------------------------ storages, dtypes
# torch storage class name -> numpy dtype of its elements.
STORAGE_DTYPES: dict[str, np.dtype] = {
    'DoubleStorage': np.dtype(np.float64), 'FloatStorage': np.dtype(np.float32),
    'HalfStorage': np.dtype(np.float16), 'BFloat16Storage': np.dtype(ml_dtypes.bfloat16),
    'LongStorage': np.dtype(np.int64), 'IntStorage': np.dtype(np.int32), 'ShortStorage': np.dtype(np.int16),
    'CharStorage': np.dtype(np.int8), 'ByteStorage': np.dtype(np.uint8), 'BoolStorage': np.dtype(np.bool_),
    'ComplexFloatStorage': np.dtype(np.complex64), 'ComplexDoubleStorage': np.dtype(np.complex128),
    'UntypedStorage': np.dtype(np.uint8),   # bytes; the tensor's dtype comes with _rebuild_tensor_v3
}
# torch dtype name (as pickled: GLOBAL 'torch float32') -> numpy dtype.
TORCH_DTYPES: dict[str, np.dtype] = {
    'float64': np.dtype(np.float64), 'double': np.dtype(np.float64), 'float32': np.dtype(np.float32),
    'float': np.dtype(np.float32), 'float16': np.dtype(np.float16), 'half': np.dtype(np.float16),
    'bfloat16': np.dtype(ml_dtypes.bfloat16), 'int64': np.dtype(np.int64), 'long': np.dtype(np.int64),
    'int32': np.dtype(np.int32), 'int': np.dtype(np.int32), 'int16': np.dtype(np.int16),
    'short': np.dtype(np.int16), 'int8': np.dtype(np.int8), 'uint8': np.dtype(np.uint8),
    'bool': np.dtype(np.bool_), 'complex64': np.dtype(np.complex64), 'complex128': np.dtype(np.complex128),
}


class _StorageType:
  """What ``GLOBAL 'torch FloatStorage'`` resolves to: a marker with the element dtype."""

  def __init__(self, name: str, dtype: np.dtype):
    self.name, self.dtype = name, dtype

  def __repr__(self) -> str:
    return f'torch.{self.name}'


class _TorchDtype:
  def __init__(self, name: str, dtype: np.dtype):
    self.name, self.dtype = name, dtype


class _Storage(NamedTuple):
  """One storage's bytes as a flat numpy array of its element dtype (read-only view of the file's buffer)."""
  data: np.ndarray


def _as_shape(value: Any, what: str) -> tuple[int, ...]:
  if not isinstance(value, (tuple, list)) or not all(isinstance(x, int) and not isinstance(x, bool) for x in value):
    raise CheckpointFormatError(f'tensor {what} {value!r} is not a tuple of ints')
  return tuple(value)


def _view(storage: Any, offset: Any, size: Any, stride: Any, dtype: np.dtype | None = None) -> np.ndarray:
  """A copy of ``storage[offset + sum(i_k * stride_k)]`` over ``size``, checked to stay inside the storage."""
  if not isinstance(storage, _Storage):
    raise CheckpointFormatError(f'a tensor is rebuilt from {type(storage).__name__}, not from a storage')
  flat = storage.data
  if dtype is not None and dtype != flat.dtype:
    if flat.dtype.itemsize != 1 or flat.size % dtype.itemsize:
      raise CheckpointFormatError(f'storage of {flat.dtype} cannot hold {dtype} elements')
    flat = flat.view(dtype)
  size, stride = _as_shape(size, 'size'), _as_shape(stride, 'stride')
  if not isinstance(offset, int) or offset < 0 or len(size) != len(stride) or min(size + stride, default=0) < 0:
    raise CheckpointFormatError(f'malformed tensor view: offset {offset!r}, size {size}, stride {stride}')
  if 0 in size:
    return np.zeros(size, flat.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= flat.size:
    # Checked before as_strided: an out-of-range view would read memory outside the buffer.
    raise CheckpointFormatError(f'tensor view (offset {offset}, size {size}, stride {stride}) reaches element '
                                f'{last} of a storage of {flat.size} elements')
  item = flat.dtype.itemsize
  out = np.lib.stride_tricks.as_strided(flat[offset:], shape=size, strides=tuple(s * item for s in stride),
                                        writeable=False)
  return np.array(out, copy=True, order='C')


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
  return _view(storage, offset, size, stride)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
  if not isinstance(dtype, _TorchDtype):
    raise CheckpointFormatError(f'_rebuild_tensor_v3 got dtype {dtype!r}, not a torch dtype')
  return _view(storage, offset, size, stride, dtype.dtype)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
  if not isinstance(data, np.ndarray):
    raise CheckpointFormatError(f'a Parameter wraps {type(data).__name__}, not a tensor')
  return data


class _TensorClass:
  """Marker for ``torch.Tensor`` / ``torch.nn.Parameter`` as the ``new_type`` of ``_rebuild_from_type_v2``."""


def _rebuild_from_type_v2(func, new_type, args, state):
  if func not in (_rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter) or new_type is not _TensorClass:
    raise UnsafeCheckpointError(f'_rebuild_from_type_v2 with {func!r} / {new_type!r} is not allowed')
  return func(*args)


def _reconstructor(cls, base, state):
  # copyreg._reconstructor rebuilds str subclasses (torch's TorchVersion) and plain objects in protocol 2.
  if isinstance(cls, type) and issubclass(cls, IgnoredObject):
    return cls()
  if cls is str and base is str:
    return str(state)
  raise UnsafeCheckpointError(f'copyreg._reconstructor of {cls!r} is not allowed')


def _getattr_of_ignored(obj: Any, name: Any) -> type:
  # Protocol 0-3 pickles name a method as getattr(cls, 'name') (HistoryBuffer keeps its statistics methods in
  # its state). Allowed on an ignored placeholder only, where it gives another placeholder.
  if isinstance(obj, type) and issubclass(obj, IgnoredObject) and isinstance(name, str):
    return _ignored(f'{obj.name}.{name}')
  raise UnsafeCheckpointError(f'getattr({obj!r}, {name!r}) is not allowed: only attributes of ignored '
                              'bookkeeping objects may be looked up')


_IGNORED = ('mmengine.logging.history_buffer.HistoryBuffer',)

# (module, name) -> resolver. One visible table: this is the whole surface a file can reach.
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    **_NUMPY_AND_BUILTIN_GLOBALS,
    ('torch._utils', '_rebuild_tensor_v2'): lambda: _rebuild_tensor_v2,
    ('torch._utils', '_rebuild_tensor_v3'): lambda: _rebuild_tensor_v3,
    ('torch._utils', '_rebuild_parameter'): lambda: _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): lambda: _rebuild_parameter,
    ('torch._tensor', '_rebuild_from_type_v2'): lambda: _rebuild_from_type_v2,
    ('torch', 'Tensor'): lambda: _TensorClass,
    ('torch.nn.parameter', 'Parameter'): lambda: _TensorClass,
    ('torch', 'Size'): lambda: tuple,
    ('torch.torch_version', 'TorchVersion'): lambda: str,
    ('copyreg', '_reconstructor'): lambda: _reconstructor,
    ('builtins', 'getattr'): lambda: _getattr_of_ignored,
    **{('torch', n): (lambda n=n, d=d: _StorageType(n, d)) for n, d in STORAGE_DTYPES.items()},
    ('torch.storage', 'UntypedStorage'): lambda: _StorageType('UntypedStorage', STORAGE_DTYPES['UntypedStorage']),
    **{('torch', n): (lambda n=n, d=d: _TorchDtype(n, d)) for n, d in TORCH_DTYPES.items()},
    **{tuple(q.rsplit('.', 1)): (lambda q=q: _ignored(q)) for q in _IGNORED},
}


# ------------------------------------------------------------------------------------------------ unpickler
class _Unpickler(pickle.Unpickler):
  """Restricted unpickler; ``read_storage(key, dtype, numel)`` supplies the bytes behind a persistent id."""

  def __init__(self, file, source: str, read_storage=None):
    super().__init__(file)
    self._source = source
    self._read_storage = read_storage
    self._storages: dict[str, _Storage] = {}

  def find_class(self, module: str, name: str) -> Any:
    module, name = python3_name(module, name)
    resolver = ALLOWED_GLOBALS.get((module, name))
    if resolver is None and '.' in name and f'{module}.{name.split(".", 1)[0]}' in _IGNORED:
      return _ignored(f'{module}.{name}')   # protocol 4+: a method of an ignored class, named by its qualname
    if resolver is None:
      if module == 'torch' and name.endswith('Storage'):
        raise CheckpointFormatError(f'{self._source}: tensors stored as torch.{name} are not supported '
                                    f'(supported: {", ".join(sorted(STORAGE_DTYPES))})')
      raise UnsafeCheckpointError(
          f'{self._source}: refused to load the global {module}.{name}: a checkpoint may only contain tensors, '
          'numbers, strings and containers (dict, list, OrderedDict...). The file may be malicious; nothing '
          'from it was executed. If you trust its origin, re-save only the weights: '
          "torch.save({'state_dict': model.state_dict()}, path).")
    return resolver()

  def persistent_load(self, pid: Any) -> Any:
    if (not isinstance(pid, tuple) or len(pid) not in (5, 6) or pid[0] not in ('storage', b'storage')
        or not isinstance(pid[1], _StorageType) or self._read_storage is None):
      raise UnsafeCheckpointError(f'{self._source}: refused the persistent id {pid!r}; only tensor storages are '
                                  'allowed. The file may be malicious; nothing from it was executed.')
    storage_type, key, _, numel = pid[1:5]
    key = key.decode('ascii') if isinstance(key, bytes) else str(key)
    if not isinstance(numel, int) or numel < 0:
      raise CheckpointFormatError(f'{self._source}: storage {key} has a malformed size {numel!r}')
    if key not in self._storages:
      self._storages[key] = _Storage(self._read_storage(key, storage_type.dtype, numel))
    storage = self._storages[key]
    view = pid[5] if len(pid) == 6 else None
    if view is not None:   # legacy format: a storage that is a slice of another one
      _, view_offset, view_size = view
      storage = _Storage(storage.data[view_offset:view_offset + view_size])
    return storage


def _unpickle(file, source: str, read_storage=None) -> Any:
  try:
    return _Unpickler(file, source, read_storage).load()
  except (UnsafeCheckpointError, CheckpointFormatError):
    raise
  except Exception as e:  # pickle raises many types (EOFError, UnpicklingError, KeyError...) on bad input
    raise CheckpointFormatError(f'{source}: not a readable PyTorch checkpoint ({type(e).__name__}: {e}); the '
                                'file is truncated, corrupted or not a checkpoint. Re-download it.') from None


def _load_zip(path: str, zf: zipfile.ZipFile) -> Any:
  names = zf.namelist()
  pkls = [n for n in names if n.endswith('data.pkl') and n.count('/') == 1]
  if len(pkls) != 1:
    raise CheckpointFormatError(f'{path}: a zip file but not a PyTorch checkpoint (expected one '
                                f'<archive>/data.pkl, found {pkls or "none"}); TorchScript archives are not supported')
  prefix = pkls[0][:-len('data.pkl')]
  byteorder = 'little'
  if prefix + 'byteorder' in names:
    byteorder = zf.read(prefix + 'byteorder').decode('ascii', 'replace').strip()
    if byteorder not in ('little', 'big'):
      raise CheckpointFormatError(f'{path}: unknown byteorder {byteorder!r}')
  names = set(names)

  def read_storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
    member = f'{prefix}data/{key}'
    if member not in names:
      raise CheckpointFormatError(f'{path}: storage {member} is missing; the file is truncated or corrupted')
    try:
      raw = zf.read(member)
    except (zipfile.BadZipFile, EOFError, OSError) as e:
      raise CheckpointFormatError(f'{path}: corrupted or truncated zip archive ({e}); re-download the file') from None
    if len(raw) < numel * dtype.itemsize:
      raise CheckpointFormatError(f'{path}: storage {member} holds {len(raw)} bytes, expected '
                                  f'{numel * dtype.itemsize} ({numel} × {dtype})')
    return _from_bytes(raw[:numel * dtype.itemsize], dtype, byteorder)

  return _unpickle(io.BytesIO(zf.read(pkls[0])), path, read_storage)


def _from_bytes(raw: bytes, dtype: np.dtype, byteorder: str) -> np.ndarray:
  arr = np.frombuffer(raw, dtype=dtype.newbyteorder('<' if byteorder == 'little' else '>'))
  return arr.astype(dtype, copy=False)


def _load_legacy(path: str, f) -> Any:
  magic = _unpickle(f, path)
  if magic != LEGACY_MAGIC:
    raise CheckpointFormatError(f'{path}: not a PyTorch checkpoint (neither a torch zip archive nor the legacy '
                                'format); check the file name or re-download it')
  protocol = _unpickle(f, path)
  if protocol != LEGACY_PROTOCOL:
    raise CheckpointFormatError(f'{path}: legacy checkpoint protocol {protocol!r} is not supported')
  sys_info = _unpickle(f, path)
  byteorder = 'little' if not isinstance(sys_info, Mapping) or sys_info.get('little_endian', True) else 'big'
  pending: dict[str, tuple[np.dtype, int, list]] = {}

  def read_storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
    # The bytes follow the pickles: hand out a buffer now, fill it once they are read.
    buf = np.empty(numel, dtype)
    pending[key] = (dtype, numel, buf)
    return buf

  _unpickle(f, path, read_storage)          # first pass: learns which storages exist and their sizes
  keys = _unpickle(f, path)
  if not isinstance(keys, list) or set(keys) != set(pending):
    raise CheckpointFormatError(f'{path}: the storage key list does not match the tensors; the file is corrupted')
  for key in keys:
    dtype, numel, buf = pending[key]
    head = f.read(8)
    if len(head) < 8:
      raise CheckpointFormatError(f'{path}: truncated (storage {key} is missing); re-download the file')
    count = struct.unpack('<q' if byteorder == 'little' else '>q', head)[0]
    raw = f.read(count * dtype.itemsize) if count >= 0 else b''
    if count != numel or len(raw) != numel * dtype.itemsize:
      raise CheckpointFormatError(f'{path}: truncated or corrupted storage {key} (expected {numel} elements)')
    buf[...] = _from_bytes(raw, dtype, byteorder)
  # Tensors were copied out of the still-empty buffers while unpickling: unpickle again, now with the data.
  f.seek(0)
  for _ in range(3):
    _unpickle(f, path)
  filled = {k: v[2] for k, v in pending.items()}
  return _unpickle(f, path, lambda key, dtype, numel: filled[key])


def load(path: str | os.PathLike) -> Any:
  """Loads a ``torch.save`` file; tensors become numpy arrays. Never runs code from the file.

  Raises:
    FileNotFoundError: ``path`` does not exist.
    UnsafeCheckpointError: the pickle names a callable outside the allow-list (nothing was executed).
    CheckpointFormatError: truncated/corrupted file, not a PyTorch checkpoint, or an unsupported tensor type.
  """
  path = os.fspath(path)
  try:
    return _load(path)
  except UnsafeCheckpointError as e:   # raised inside an allowed callable: say which file
    if str(e).startswith(path):
      raise
    raise UnsafeCheckpointError(f'{path}: {e}. The file may be malicious; nothing from it was executed.') from None


def _load(path: str) -> Any:
  if not os.path.exists(path):
    raise FileNotFoundError(f'checkpoint {path!r} does not exist; check the path')
  if os.path.isdir(path):
    raise CheckpointFormatError(f'{path}: is a directory, expected a PyTorch .pth file (a converted stgcn_jax '
                                'checkpoint directory is loaded with stgcn_jax.checkpoint.load_model)')
  with open(path, 'rb') as f:
    head = f.read(4)
    f.seek(0)
    if head[:2] == b'PK':
      try:
        with zipfile.ZipFile(f) as zf:
          return _load_zip(path, zf)
      except zipfile.BadZipFile as e:
        raise CheckpointFormatError(f'{path}: corrupted or truncated zip archive ({e}); re-download the '
                                    'file') from None
      except (EOFError, OSError, zipfile.LargeZipFile) as e:
        raise CheckpointFormatError(f'{path}: unreadable zip archive ({type(e).__name__}: {e}); the file is '
                                    'truncated or corrupted') from None
    if head[:1] != b'\x80':  # every pickle of protocol >= 2 starts with PROTO
      raise CheckpointFormatError(f'{path}: not a PyTorch checkpoint (starts with {head!r}, neither a zip '
                                  'archive nor a pickle)')
    return _load_legacy(path, f)


class TorchCheckpoint(NamedTuple):
  state_dict: dict[str, np.ndarray]
  meta: dict[str, Any] | None


_WRAPPER_KEYS = ('state_dict', 'model', 'model_state_dict', 'module', 'net')


def load_checkpoint(path: str | os.PathLike) -> TorchCheckpoint:
  """``(state_dict, meta)`` of a checkpoint: mmengine/mmcv ``{'meta', 'state_dict', 'optimizer', ...}`` (only
  ``state_dict`` and ``meta`` are kept), ``{'model': ...}``, or a bare state dict (pyskl demo files).

  Raises :class:`CheckpointFormatError` when no mapping of names to tensors is found.
  """
  obj = load(path)
  path = os.fspath(path)
  if not isinstance(obj, Mapping):
    raise CheckpointFormatError(f'{path}: holds a {type(obj).__name__}, not a state dict or a dict with '
                                "'state_dict'; not a model checkpoint")
  meta = obj.get('meta') if isinstance(obj.get('meta'), Mapping) else None
  if not _is_state_dict(obj):
    for key in _WRAPPER_KEYS:
      if isinstance(obj.get(key), Mapping) and _is_state_dict(obj[key]):
        obj = obj[key]
        break
    else:
      raise CheckpointFormatError(f'{path}: no state dict found: top-level keys {sorted(map(str, obj))[:10]}; '
                                  f"expected tensors by name, or one of {list(_WRAPPER_KEYS)} holding them")
  bad = [k for k, v in obj.items() if not isinstance(v, np.ndarray)]
  if bad:
    raise CheckpointFormatError(f'{path}: state dict entries {bad[:5]} are not tensors')
  return TorchCheckpoint({str(k): v for k, v in obj.items()}, None if meta is None else dict(meta))


def _is_state_dict(obj: Mapping) -> bool:
  return bool(obj) and all(isinstance(k, str) for k in obj) and all(isinstance(v, np.ndarray) for v in obj.values())


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The state dict of a checkpoint as numpy arrays (see :func:`load_checkpoint`; meta is dropped)."""
  return load_checkpoint(path).state_dict
