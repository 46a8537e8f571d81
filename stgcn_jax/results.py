"""Per-sample test results on disk: the ``--dump`` format of ``stgcn_jax.test``, and mmaction2's dumps.

Our format (``FORMAT = 'stgcn_jax.results/1'``) is a pickle of one plain dict, readable by the restricted
unpickler :mod:`stgcn_jax.safe_pickle` (numpy arrays and builtin containers only)::

    {'format':      'stgcn_jax.results/1',
     'scores':      float32 (N, K)   clip-averaged class probabilities (softmax per clip, mean over clips),
     'labels':      int64 (N,)       ground-truth class of each sample,
     'frame_dirs':  list[str] (N)    the annotation's ``frame_dir`` of each sample (None only for fused
                                     results of files that had none),
     'class_names': list[str] (K) or None,
     'meta':        dict of plain values (str, int, float, bool, None, lists/dicts of them): config, checkpoint,
                    num_clips, ... whatever the writer records}

Rows are in split order. Files are written atomically (a temporary file in the same folder, then a rename),
so an interrupted run never leaves a truncated dump behind.

:func:`read_results` also reads the dumps of mmaction2 1.x (``tools/test.py --dump result.pkl``, i.e.
mmengine's ``DumpResults`` metric): a list with one dict per sample, the ``ActionDataSample.to_dict()`` of
the prediction, holding

* ``'pred_score'``: torch float tensor (K,), the clip-averaged scores;
* ``'gt_label'``: torch int64 tensor of shape (1,);
* ``'pred_label'``: torch int64 tensor (1,) (ignored: it is the argmax of ``pred_score``);
* metainfo such as ``'num_classes'``, and ``'frame_dir'`` only when the pipeline packed it (the default
  ``PackActionInputs`` does not).

mmaction2 pickles those tensors with plain ``pickle`` (protocol 2), so the file names torch's rebuild
functions (``torch._utils._rebuild_tensor_v2``, ``torch.storage._load_from_bytes``). They are rebuilt only
through a safe path: torch's own ``torch.load(..., weights_only=True)`` when torch is importable, else the
torch-free restricted reader :mod:`stgcn_jax.torch_pickle` when it is available; otherwise reading fails with
a message saying what to install. Any other global in the file is refused before it runs, as in
:mod:`stgcn_jax.safe_pickle`. Numpy arrays, numpy scalars and plain ints in place of tensors are accepted too.
Every error names the file.
"""

from __future__ import annotations

import _compat_pickle
import dataclasses
import importlib
import io
import os
import pickle
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import numpy as np

from stgcn_jax import files, safe_pickle

__all__ = ['FORMAT', 'Results', 'ResultsFormatError', 'write_results', 'read_results']

FORMAT = 'stgcn_jax.results/1'


class ResultsFormatError(ValueError):
  """The file is not a results dump we can read (wrong structure, inconsistent shapes, unreadable tensors)."""


@dataclasses.dataclass(frozen=True)
class Results:
  """One results file in memory. ``source_format`` is ``'stgcn_jax'`` or ``'mmaction2'``."""
  scores: np.ndarray               # (N, K) float32
  labels: np.ndarray               # (N,) int64
  frame_dirs: list[str] | None     # (N,) or None when the file has none (mmaction2 default)
  class_names: list[str] | None    # (K,) or None
  meta: dict[str, Any]
  path: str
  source_format: str

  @property
  def num_samples(self) -> int:
    return int(self.scores.shape[0])

  @property
  def num_classes(self) -> int:
    return int(self.scores.shape[1])


# ------------------------------------------------------------------------------------------------ writing
def _plain(value: Any, where: str) -> Any:
  """``value`` as builtin types only, so the dump loads with the restricted unpickler."""
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, Mapping):
    out = {}
    for k, v in value.items():
      if not isinstance(k, str):
        raise ValueError(f'meta{where}: key {k!r} is not a string; meta must be a dict of plain values')
      out[k] = _plain(v, f'{where}[{k!r}]')
    return out
  if isinstance(value, (list, tuple)):
    return [_plain(v, f'{where}[{i}]') for i, v in enumerate(value)]
  raise ValueError(f'meta{where} is a {type(value).__name__}; meta may only hold str, int, float, bool, None '
                   'and lists/dicts of them (convert paths and configs to strings)')


def _validate(scores: np.ndarray, labels: np.ndarray, frame_dirs, class_names, where: str):
  if scores.ndim != 2 or scores.shape[0] == 0 or scores.shape[1] == 0:
    raise ResultsFormatError(f'{where}: scores must be a non-empty (N, K) array, got shape {scores.shape}')
  n, k = scores.shape
  if labels.shape != (n,):
    raise ResultsFormatError(f'{where}: labels have shape {labels.shape}, expected ({n},) to match scores '
                             f'{scores.shape}')
  if not np.isfinite(scores).all():
    i = int(np.flatnonzero(~np.isfinite(scores).all(axis=1))[0])
    raise ResultsFormatError(f'{where}: the scores of sample {i} contain NaN or Inf ({scores[i][:6]}...); the '
                             'model that wrote them diverged, or the file is damaged')
  bad = np.flatnonzero((labels < 0) | (labels >= k))
  if bad.size:
    raise ResultsFormatError(f'{where}: label {int(labels[bad[0]])} of sample {int(bad[0])} is outside [0, {k}) '
                             f'for {k} class scores; the labels and scores come from different label sets')
  if frame_dirs is not None:
    if len(frame_dirs) != n or not all(isinstance(f, str) for f in frame_dirs):
      raise ResultsFormatError(f'{where}: frame_dirs must be {n} strings (one per sample), got {len(frame_dirs)} '
                               'entries')
    if len(set(frame_dirs)) != n:
      seen, dup = set(), None
      for f in frame_dirs:
        if f in seen:
          dup = f
          break
        seen.add(f)
      raise ResultsFormatError(f'{where}: frame_dir {dup!r} appears more than once; each sample must be '
                               'evaluated exactly once')
  if class_names is not None and (len(class_names) != k or not all(isinstance(c, str) for c in class_names)):
    raise ResultsFormatError(f'{where}: class_names must be {k} strings (one per score column), got '
                             f'{len(class_names)} entries')


def write_results(path: str | os.PathLike, scores, labels, frame_dirs: Sequence[str] | None,
                  class_names: Sequence[str] | None = None, meta: Mapping[str, Any] | None = None) -> str:
  """Writes a results dump in the documented format (atomically) and returns its path.

  ``scores`` (N, K) is stored as float32 and ``labels`` (N,) as int64. Raises ``ValueError`` on inconsistent
  shapes, duplicate ``frame_dirs`` or a ``meta`` holding anything but plain values.
  """
  path = os.fspath(path)
  scores = np.ascontiguousarray(np.asarray(scores, dtype=np.float32))
  labels_in = np.asarray(labels)
  if labels_in.size and not np.issubdtype(labels_in.dtype, np.integer):
    raise ResultsFormatError(f'{path}: labels must be integers, got dtype {labels_in.dtype}')
  labels = np.ascontiguousarray(labels_in.astype(np.int64))
  frame_dirs = None if frame_dirs is None else [str(f) if isinstance(f, np.str_) else f for f in frame_dirs]
  class_names = None if class_names is None else list(class_names)
  _validate(scores, labels, frame_dirs, class_names, path)
  payload = {'format': FORMAT, 'scores': scores, 'labels': labels, 'frame_dirs': frame_dirs,
             'class_names': class_names, 'meta': _plain(dict(meta or {}), '')}
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = files.mkstemp(prefix=os.path.basename(path) + '.', suffix='.tmp', dir=folder)
  try:
    with os.fdopen(fd, 'wb') as f:
      pickle.dump(payload, f, protocol=4)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the complete new one
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path


# ------------------------------------------------------------------------------------------------ reading
def _torch_backend(path: str) -> tuple[str, Callable[[tuple[str, str]], Any] | None]:
  """How to rebuild torch tensors: ``(name, resolver)``, resolver ``None`` when no safe path exists."""
  try:
    import torch  # noqa: F401  (optional: only mmaction2 dumps need it)
  except ImportError:
    torch = None
  if torch is not None:
    import torch._utils

    def load_storage(data: bytes):
      # The bytes are a legacy-format torch.save of one storage; weights_only refuses any non-tensor global.
      return torch.load(io.BytesIO(data), weights_only=True)

    table = {('torch.storage', '_load_from_bytes'): load_storage,
             ('torch._utils', '_rebuild_tensor_v2'): torch._utils._rebuild_tensor_v2,
             ('torch._utils', '_rebuild_tensor_v3'): torch._utils._rebuild_tensor_v3,
             **{('torch', name): getattr(torch, name) for name in ('float32', 'float64', 'float16', 'int64',
                                                                    'int32', 'bfloat16', 'uint8', 'bool')}}
    return 'torch', table.get
  try:
    torch_pickle = importlib.import_module('stgcn_jax.torch_pickle')
  except ImportError:
    return 'none', None

  def load_storage_free(data: bytes):
    # torch_pickle reads files; a storage pickled inside the dump is a complete legacy-format torch.save.
    with tempfile.NamedTemporaryFile(suffix='.pth') as f:
      f.write(data)
      f.flush()
      return torch_pickle.load(f.name)

  def resolve(key: tuple[str, str]) -> Any:
    if key == ('torch.storage', '_load_from_bytes'):
      return load_storage_free
    resolver = torch_pickle.ALLOWED_GLOBALS.get(key) if key[0].startswith('torch') else None
    return None if resolver is None else resolver()

  return 'torch_pickle', resolve


class _TensorDumpUnpickler(pickle.Unpickler):
  """safe_pickle's allow-list plus torch's tensor rebuild functions, resolved through ``torch_resolver``."""

  def __init__(self, file, source: str, backend: str, torch_resolver):
    super().__init__(file)
    self._source, self._backend, self._torch_resolver = source, backend, torch_resolver

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in _compat_pickle.NAME_MAPPING:
      module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    resolver = safe_pickle.ALLOWED_GLOBALS.get((module, name))
    if resolver is not None:
      return resolver()
    if module.split('.')[0] == 'torch':
      if self._torch_resolver is None:
        raise ResultsFormatError(
            f'{self._source}: holds torch tensors (an mmaction2 result dump); reading them needs torch '
            '(pip install torch, CPU build is enough) or stgcn_jax.torch_pickle. Alternatively convert the file '
            'where mmaction2 is installed: save [{"pred_score": s.numpy(), "gt_label": int(g)} ...].')
      found = self._torch_resolver((module, name))
      if found is not None:
        return found
    raise safe_pickle.UnsafePickleError(
        f'{self._source}: refused to load the global {module}.{name}: a result dump may only contain numpy '
        'arrays, torch tensors and builtin containers. The file may be malicious; nothing from it was executed.')

  def persistent_load(self, pid: Any) -> Any:
    raise safe_pickle.UnsafePickleError(f'{self._source}: refused a persistent id {pid!r}; result dumps never '
                                        'use them. Nothing from the file was executed.')


def _load_with_tensors(path: str) -> Any:
  backend, resolver = _torch_backend(path)
  with open(path, 'rb') as f:
    try:
      return _TensorDumpUnpickler(f, path, backend, resolver).load()
    except (safe_pickle.UnsafePickleError, ResultsFormatError):
      raise
    except Exception as e:  # torch / pickle raise many types on malformed tensor data
      raise ResultsFormatError(f'{path}: could not rebuild the torch tensors in this dump ({backend}: '
                               f'{type(e).__name__}: {e}); the file is corrupted or from an unsupported '
                               'torch version') from None


def _load_pickle(path: str) -> Any:
  if not os.path.exists(path):
    raise FileNotFoundError(f'results file {path!r} does not exist; check the path given to --preds/--dump')
  if os.path.isdir(path):
    raise ResultsFormatError(f'{path}: is a directory, expected a results .pkl file')
  try:
    return safe_pickle.load_pickle(path)
  except safe_pickle.UnsafePickleError:
    # mmaction2 dumps name torch's tensor rebuild functions: retry with those (and only those) allowed.
    return _load_with_tensors(path)


def _to_numpy(value: Any, path: str, what: str) -> np.ndarray:
  if type(value).__module__.split('.')[0] == 'torch':
    value = value.detach().cpu()
    if str(value.dtype) == 'torch.bfloat16':   # numpy has no bfloat16: widen exactly, as the torch-free reader
      value = value.float()
    value = value.numpy()
  if isinstance(value, (list, tuple, int, float, np.generic, np.ndarray)):
    return np.asarray(value)
  raise ResultsFormatError(f'{path}: {what} is a {type(value).__name__}, expected a tensor or array')


def _field(sample: Mapping, names: tuple[str, ...]) -> Any:
  for name in names:
    if name in sample:
      value = sample[name]
      # mmaction2 1.0 release candidates stored LabelData, which to_dict() turns into {'item': tensor}.
      if isinstance(value, Mapping) and 'item' in value:
        value = value['item']
      return value
  return None


def _from_mmaction2(obj: list, path: str) -> Results:
  scores, labels, frame_dirs = [], [], []
  for i, sample in enumerate(obj):
    if not isinstance(sample, Mapping):
      raise ResultsFormatError(f'{path}: entry {i} is a {type(sample).__name__}; an mmaction2 dump is a list of '
                               "dicts with 'pred_score' and 'gt_label' (bare score arrays from mmaction2 0.x / "
                               'pyskl carry no labels and are not supported)')
    score, label = _field(sample, ('pred_score', 'pred_scores')), _field(sample, ('gt_label', 'gt_labels'))
    if score is None or label is None:
      missing = 'pred_score' if score is None else 'gt_label'
      raise ResultsFormatError(f'{path}: entry {i} has no {missing!r} (keys: {sorted(sample)}); expected '
                               "mmaction2 test results with 'pred_score' and 'gt_label'")
    score = _to_numpy(score, path, f'entry {i} pred_score')
    score = score.astype(np.promote_types(score.dtype, np.float32) if score.dtype.kind == 'f' else np.float32)
    label = _to_numpy(label, path, f'entry {i} gt_label')
    if score.ndim != 1:
      raise ResultsFormatError(f'{path}: entry {i} pred_score has shape {score.shape}, expected (K,)')
    if label.size != 1 or not np.issubdtype(label.dtype, np.integer):
      raise ResultsFormatError(f'{path}: entry {i} gt_label is {label.dtype} {label.shape}, expected one integer '
                               '(multi-label results are not supported)')
    if scores and score.shape != scores[0].shape:
      raise ResultsFormatError(f'{path}: entry {i} has {score.shape[0]} class scores, entry 0 has '
                               f'{scores[0].shape[0]}')
    scores.append(score)
    labels.append(int(label.reshape(())))
    frame_dirs.append(sample.get('frame_dir'))
  if not scores:
    raise ResultsFormatError(f'{path}: the dump holds no samples')
  have = [f is not None for f in frame_dirs]
  if any(have) and not all(have):
    raise ResultsFormatError(f'{path}: frame_dir is given for some samples but not for entry {have.index(False)}')
  frame_dirs = [str(f) for f in frame_dirs] if all(have) else None
  scores, labels = np.stack(scores), np.asarray(labels, np.int64)
  _validate(scores, labels, frame_dirs, None, path)
  return Results(scores, labels, frame_dirs, None, {'source_format': 'mmaction2'}, path, 'mmaction2')


def _from_ours(obj: Mapping, path: str) -> Results:
  if obj.get('format') != FORMAT:
    raise ResultsFormatError(f'{path}: format {obj.get("format")!r} is not {FORMAT!r}; written by a newer or '
                             'different tool')
  missing = [k for k in ('scores', 'labels', 'frame_dirs', 'class_names', 'meta') if k not in obj]
  if missing:
    raise ResultsFormatError(f'{path}: missing keys {missing}; the dump is incomplete')
  scores, labels = np.asarray(obj['scores']), np.asarray(obj['labels'])
  if not np.issubdtype(scores.dtype, np.floating) or not np.issubdtype(labels.dtype, np.integer):
    raise ResultsFormatError(f'{path}: scores must be floats and labels integers, got {scores.dtype} / '
                             f'{labels.dtype}')
  frame_dirs = None if obj['frame_dirs'] is None else list(obj['frame_dirs'])
  class_names = None if obj['class_names'] is None else list(obj['class_names'])
  scores, labels = scores.astype(np.float32, copy=False), labels.astype(np.int64, copy=False)
  _validate(scores, labels, frame_dirs, class_names, path)
  meta = obj['meta'] if isinstance(obj['meta'], dict) else {}
  return Results(scores, labels, frame_dirs, class_names, meta, path, 'stgcn_jax')


def read_results(path: str | os.PathLike) -> Results:
  """Reads a results dump: ours (:data:`FORMAT`) or mmaction2 1.x's (see the module docstring).

  Raises:
    FileNotFoundError: ``path`` does not exist.
    UnsafePickleError: the file names a callable outside the allow-list (nothing from it was executed).
    ResultsFormatError (a ValueError): unreadable file, unknown structure, inconsistent shapes, or torch
      tensors without a safe way to rebuild them.
  """
  path = os.fspath(path)
  obj = _load_pickle(path)
  if isinstance(obj, Mapping) and 'format' in obj:
    return _from_ours(obj, path)
  if isinstance(obj, (list, tuple)):
    return _from_mmaction2(list(obj), path)
  raise ResultsFormatError(f'{path}: holds a {type(obj).__name__}; expected a stgcn_jax results dict '
                           f"(format {FORMAT!r}) or an mmaction2 dump (a list of dicts with 'pred_score')")
