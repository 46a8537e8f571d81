"""Orbax checkpoints: one format for training runs and for converted PyTorch checkpoints.

A checkpoint directory holds numbered steps (``<dir>/<step>/``), each with the items

* ``model``: ``{'params': ..., 'stats': ...}`` — the parameters and the BatchNorm statistics / buffers,
* ``meta``: JSON — ``model_config`` (:class:`stgcn_jax.model.ModelConfig` as a dict), ``layout``,
  ``feat`` (the modality), ``class_names`` where known, the training config, and ``source``,
* ``opt`` (training only): ``{'opt_state': ..., 'step': ..., 'rng': ...}``,
* ``data`` (training only): the Grain iterator state of each process.

``stgcn_jax.test``, ``stgcn_jax.predict``, fine-tuning (``init_from``) and the notebook read ``model`` and
``meta`` only, so a converted checkpoint (no ``opt``/``data``) and a training checkpoint load the same way.
Orbax writes each step into a temporary directory and renames it when complete, so a step directory that
exists is whole; an interrupted save leaves only a temporary directory that is never picked up.
"""

from __future__ import annotations

import json
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any

import jax
import numpy as np
import grain
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm
from flax import nnx

from stgcn_jax.model import ModelConfig, Recognizer

MODEL, META, OPT, DATA = 'model', 'meta', 'opt', 'data'


class CheckpointError(ValueError):
  """A checkpoint directory that cannot be used (absent, incomplete, another architecture...)."""


def _quiet_orphaned_reads() -> None:
  """Drops the tracebacks of array reads orphaned by a failed restore.

  When one read of a restore fails, Orbax's event loop closes while tensorstore still completes the other
  reads; their completion callbacks then fail in ``loop.call_soon_threadsafe`` with ``RuntimeError: Event loop
  is closed``, which Python prints through ``sys.unraisablehook`` as a bare traceback next to our clear error.
  They can fire before the restore's own exception reaches us, so this is installed before every restore
  (once per process); it drops exactly that error raised in ``call_soon_threadsafe`` and passes everything
  else to the previous hook. A restore that succeeds orphans nothing.
  """
  previous = sys.unraisablehook
  if getattr(previous, '_stgcn_quiet', False):
    return

  def hook(unraisable):
    exc = unraisable.exc_value
    if (isinstance(exc, RuntimeError) and str(exc) == 'Event loop is closed'
        and any(frame.name == 'call_soon_threadsafe' for frame in traceback.extract_tb(unraisable.exc_traceback))):
      return
    previous(unraisable)
  hook._stgcn_quiet = True
  sys.unraisablehook = hook


def _short(error: BaseException, limit: int = 400) -> str:
  """The first line of a library error, shortened: the caller's message says what to do."""
  text = f'{type(error).__name__}: {error}'.strip().splitlines()[0]
  return text if len(text) <= limit else text[:limit] + '...'


def manager(directory: str | os.PathLike, *, max_to_keep: int | None = None, best_metric: str | None = None,
            keep_best: int = 1, read_only: bool = False, async_save: bool = True) -> ocp.CheckpointManager:
  """A CheckpointManager over ``directory`` keeping the last ``max_to_keep`` steps (None: all) and, with
  ``best_metric``, also the ``keep_best`` steps with the highest value of that metric."""
  policies = [cm.LatestN(max_to_keep)]
  if best_metric is not None:
    policies.append(cm.BestN(get_metric_fn=lambda metrics: float(metrics[best_metric]), n=keep_best,
                             keep_checkpoints_without_metrics=False))
  options = ocp.CheckpointManagerOptions(
      preservation_policy=cm.AnyPreservationPolicy(policies), enable_async_checkpointing=async_save,
      read_only=read_only, create=not read_only, cleanup_tmp_directories=not read_only)
  return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def save(mngr: ocp.CheckpointManager, step: int, *, params, stats, meta: dict[str, Any], opt: Any = None,
         data: Any = None, metrics: dict[str, float] | None = None, force: bool = False) -> bool:
  """Saves one step (asynchronously when the manager is async). Collective: every process must call it.

  ``data`` is the Grain iterator; each process writes its own iterator state.
  """
  items = {MODEL: ocp.args.StandardSave({'params': params, 'stats': stats}), META: ocp.args.JsonSave(meta)}
  if opt is not None:
    items[OPT] = ocp.args.StandardSave(opt)
  if data is not None:
    items[DATA] = grain.checkpoint.CheckpointSave(data)
  return mngr.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)


def check_data_processes(directory: str | os.PathLike, step: int) -> None:
  """Refuses to resume ``<directory>/<step>`` in a run of another process count than the one that wrote it.

  Each process saves its own data-iterator state (``data/process_<i>-of-<n>.json``, Grain's layout), and each
  reads back the file of its index among as many processes: a run with another count finds none to read.
  """
  data = Path(directory) / str(step) / DATA
  if not data.is_dir():
    return
  counts = sorted({int(m.group(1)) for m in (re.fullmatch(r'process_\d+-of-(\d+)\.json', p.name)
                                             for p in data.iterdir()) if m})
  now = jax.process_count()
  if counts and now not in counts:
    saved = ' or '.join(str(c) for c in counts)
    raise CheckpointError(
        f'{Path(directory) / str(step)} was written by a run of {saved} process{"es" if counts != [1] else ""} '
        f'and this run has {now}: the saved data-iterator state is per process and cannot be resumed with another '
        f'count. Resume with {saved} process{"es" if counts != [1] else ""} (--num_processes={counts[0]}), or '
        'start a new --workdir (--config.init_from can start it from this checkpoint\'s weights)')


def restore_training(mngr: ocp.CheckpointManager, step: int, state, iterator):
  """Restores a training checkpoint into ``state`` (its structure and shardings) and ``iterator`` (in place).

  Returns ``(state, iterator)``; ``state`` is a :class:`stgcn_jax.steps.TrainState` placed like the given one.
  """
  like = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
  args = {MODEL: ocp.args.StandardRestore({'params': like(state.params), 'stats': like(state.stats)}),
          OPT: ocp.args.StandardRestore({'step': like(state.step), 'opt_state': like(state.opt_state)}),
          DATA: grain.checkpoint.CheckpointRestore(iterator)}
  check_data_processes(mngr.directory, step)
  _quiet_orphaned_reads()
  try:
    out = mngr.restore(step, args=ocp.args.Composite(**args))
  except Exception as e:   # tensorstore / JSON / Grain errors of every kind: the step cannot be used
    raise CheckpointError(f'{Path(mngr.directory) / str(step)} cannot be restored into this run: it is corrupt '
                          f'(damaged or truncated files) or from another architecture or optimiser '
                          f'({_short(e)}). Delete that step directory to resume from the previous '
                          'step, or use a new --workdir') from e
  model, opt = out[MODEL], out[OPT]
  return type(state)(opt['step'], model['params'], model['stats'], opt['opt_state']), out[DATA]


def read_meta(directory: str | os.PathLike, step: int | None = None) -> tuple[int, dict[str, Any]]:
  """``(step, meta)`` of the latest (or the given) step in a checkpoint directory."""
  directory = Path(directory)
  if directory.is_file():
    raise CheckpointError(
        f'{directory} is a file, not a checkpoint directory; a PyTorch checkpoint (.pth) is converted first: '
        f'python convert/from_torch.py {directory} --out DIR, then give DIR')
  if not directory.is_dir():
    raise CheckpointError(f'{directory}: no such checkpoint directory')
  mngr = manager(directory, read_only=True, async_save=False)
  steps = mngr.all_steps()
  if not steps:
    inner = directory / 'checkpoints'
    if inner.is_dir():
      raise CheckpointError(f'{directory} is a training workdir; its checkpoints are in {inner}: give that folder')
    raise CheckpointError(f'{directory}: holds no complete checkpoint step (expected <dir>/<step>/model and meta); '
                          'convert a PyTorch checkpoint with convert/from_torch.py or train first')
  step = max(steps) if step is None else step
  if step not in steps:
    raise CheckpointError(f'{directory}: no step {step}; available steps {sorted(steps)}')
  try:
    meta = mngr.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]
  except Exception as e:   # a damaged or truncated meta file (JSON errors, missing item)
    raise CheckpointError(f'{directory / str(step)}: its metadata (meta/metadata) cannot be read, the checkpoint '
                          f'is corrupt ({_short(e)}); delete that step directory or use another checkpoint') from e
  if not isinstance(meta, dict):
    raise CheckpointError(f'{directory / str(step)}: its metadata is a {type(meta).__name__}, expected a JSON '
                          'object; not a stgcn_jax checkpoint')
  return step, meta


def abstract_model_state(cfg: ModelConfig, *, dtype='float32', param_dtype='float32'):
  """``(graphdef, params, stats)`` with ShapeDtypeStruct leaves, without allocating the model."""
  model = nnx.eval_shape(lambda: Recognizer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
  return nnx.split(model, nnx.Param, ...)


def restore_model_state(mngr: ocp.CheckpointManager, step: int, params_like, stats_like, *, source: str = ''):
  """Restores the ``model`` item into the structure (and shardings, when given) of ``params_like``/``stats_like``."""
  target = {'params': params_like, 'stats': stats_like}
  _quiet_orphaned_reads()
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(**{MODEL: ocp.args.StandardRestore(target)}))[MODEL]
  except Exception as e:   # tensorstore raises plain Exception for damaged data files
    raise CheckpointError(f'{source or mngr.directory} step {step}: the saved model cannot be read: it is corrupt '
                          f'(damaged or truncated files) or does not fit the expected architecture '
                          f'({_short(e)})') from e
  return restored['params'], restored['stats']


def load_model(directory: str | os.PathLike, step: int | None = None, *, dtype: str = 'float32') -> tuple[Recognizer, dict]:
  """Loads a model for inference: ``(model, meta)`` from a training or a converted checkpoint directory."""
  step, meta = read_meta(directory, step)
  if 'model_config' not in meta:
    raise CheckpointError(f'{directory}: step {step} has no model_config in its metadata; not a stgcn_jax checkpoint')
  try:
    cfg = ModelConfig.from_dict(meta['model_config'])
  except (TypeError, ValueError, KeyError, AttributeError) as e:
    raise CheckpointError(f'{directory}: step {step} has an invalid model_config in its metadata ({_short(e)}); '
                          'not a stgcn_jax checkpoint or a damaged one') from e
  graphdef, params, stats = abstract_model_state(cfg, dtype=dtype)
  # Onto this process's first device: without a target sharding Orbax would place the arrays on the devices they
  # were saved from, which a host with fewer devices (training on 8 GPUs, testing on 1) does not have.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  params, stats = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), (params, stats))
  mngr = manager(directory, read_only=True, async_save=False)
  params, stats = restore_model_state(mngr, step, params, stats, source=str(directory))
  model = nnx.merge(graphdef, jax.tree.map(np.asarray, params), jax.tree.map(np.asarray, stats))
  return model, meta


def write_model(directory: str | os.PathLike, model: Recognizer, meta: dict[str, Any], *, step: int = 0) -> Path:
  """Writes an inference checkpoint (``model`` + ``meta``) for one model, e.g. a converted PyTorch one.

  The directory must not exist yet; it appears only when complete (written beside it, then renamed).
  """
  directory = Path(directory).absolute()
  if directory.exists():
    raise CheckpointError(f'{directory} already exists; choose a new --out directory or remove it first')
  tmp = directory.with_name(directory.name + '.tmp-incomplete')
  if tmp.exists():
    import shutil
    shutil.rmtree(tmp)
  _, params, stats = nnx.split(model, nnx.Param, ...)
  meta = {'model_config': model.config.to_dict(), **meta}
  json.dumps(meta)  # fails early on metadata that is not JSON
  mngr = manager(tmp, async_save=False)
  save(mngr, step, params=params, stats=stats, meta=meta)
  mngr.wait_until_finished()
  mngr.close()
  os.replace(tmp, directory)
  return directory
