"""Training: ``python -m stgcn_jax.train --config configs/ntu60_2d_joint.py --workdir runs/ntu60_2d_joint``.

The STGCN++ recipe (SPEC §5): SGD Nesterov, lr 0.1 per global batch of 128 scaled linearly with the actual
global batch, weight decay 5e-4 on every parameter, cosine decay to 0 per step over ``num_epochs`` epochs of
the training split repeated ``train_repeat`` times; validation (1 clip) every epoch, the 10-clip test at the
end.

Data parallel over every device of every process: a 1-D ``('data',)`` mesh, replicated state created
already sharded, one jitted train step with the state donated. Each process feeds only its own rows of every
global batch. BatchNorm statistics are per group of ``bn_group_size`` samples (the reference's
un-synchronised BN over 16 samples per GPU), so a run gives the same numbers on 1 device or 8; set
``bn_group_size=0`` for statistics over the whole global batch.

Checkpoints (Orbax, :mod:`stgcn_jax.checkpoint`) go to ``<workdir>/checkpoints``: the model, the optimiser
state and step, and every process's data-iterator state, every epoch (or every ``checkpoint_every_steps``),
keeping the last ``keep_checkpoints`` plus the best by validation top-1. A workdir that already holds a
checkpoint is resumed, and the resumed run sees exactly the batches the interrupted one would have seen.
SIGTERM / SIGINT save a checkpoint at the current step and end the run with :data:`PREEMPTED_EXIT_CODE`.
A NaN or infinite loss stops the run (:class:`NonFiniteLossError`) before anything is saved from it, so the
last checkpoint stays good.

Outputs in the workdir (written by process 0): ``config.json``, ``metrics.jsonl`` (one JSON record per log
step and per evaluation), TensorBoard events in ``tb/``, and after the test ``test_result.pkl`` (see
:mod:`stgcn_jax.results`) with a per-class report and confusion matrix beside it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from stgcn_jax import checkpoint as ckpt_lib
from stgcn_jax import evaluate as eval_lib
from stgcn_jax import sharding as sharding_lib
from stgcn_jax import steps
from stgcn_jax.data import annotations
from stgcn_jax.data import pipeline
from stgcn_jax.data.transforms import FEATS
from stgcn_jax.graph import get_layout
from stgcn_jax.model import ModelConfig, build_model

logger = logging.getLogger('stgcn_jax.train')

PREEMPTED_EXIT_CODE = 75   # EX_TEMPFAIL: the run was stopped by SIGTERM/SIGINT after saving; start it again
NONFINITE_EXIT_CODE = 3
SAVE_FAILED_EXIT_CODE = 74  # EX_IOERR: a checkpoint could not be written (disk full...); the previous one is intact
# Config fields that may change between an interrupted run and its resumption. (Not data.num_workers: the batches
# do not depend on it, but the saved data-iterator state does, so a resumed run keeps its worker count.)
RESUMABLE_CHANGES = ('max_steps', 'log_every_steps', 'eval_every_epochs', 'checkpoint_every_steps',
                     'keep_checkpoints', 'async_checkpointing', 'run_test', 'data.cache_dir', 'eval_batch_size')


class ConfigError(ValueError):
  """A configuration that cannot run; raised before anything is compiled."""


class DataError(ConfigError):
  """An annotation file that cannot be used: corrupt, not an annotation file, or refused by the safe loader."""


class SaveError(OSError):
  """A checkpoint could not be written (disk full, unwritable); the previous checkpoint is intact."""


class NonFiniteLossError(RuntimeError):
  """The training loss became NaN or infinite."""


class Preempted(Exception):
  """The run was stopped by a signal after saving a checkpoint at ``step``."""

  def __init__(self, step: int, signum: int):
    super().__init__(f'stopped by signal {signum} at step {step}; checkpoint saved, run the same command to resume')
    self.step, self.signum = step, signum


# ----------------------------------------------------------------------------------------------------------
# Configuration


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
  d = config.model.to_dict()
  for key in ('inflate_stages', 'down_stages'):
    d[key] = tuple(d[key])
  try:
    return ModelConfig.from_dict(d)
  except (TypeError, ValueError) as e:
    raise ConfigError(f'config.model: {e}') from e


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks what can be checked without data or devices; every message says how to fix it."""
  data = config.data
  if data.feat not in FEATS:
    raise ConfigError(f"config.data.feat={data.feat!r}; use one of {list(FEATS)} (joint, bone, joint motion, "
                      'bone motion)')
  if config.dtype not in ('float32', 'bfloat16', 'float16'):
    raise ConfigError(f"config.dtype={config.dtype!r}; use 'float32' or 'bfloat16'")
  for name in ('batch_size', 'eval_batch_size', 'num_epochs', 'log_every_steps', 'eval_every_epochs'):
    value = config[name]
    if not isinstance(value, int) or value < 1:
      raise ConfigError(f'config.{name}={value!r} must be a positive integer')
  for name in ('clip_len', 'val_clips', 'test_clips', 'train_repeat'):
    if not isinstance(data[name], int) or data[name] < 1:
      raise ConfigError(f'config.data.{name}={data[name]!r} must be a positive integer')
  if config.bn_group_size < 0:
    raise ConfigError(f'config.bn_group_size={config.bn_group_size} must be >= 0 (0: global statistics)')
  if config.optim.base_lr <= 0:
    raise ConfigError(f'config.optim.base_lr={config.optim.base_lr} must be positive')
  mcfg = model_config(config)
  if data.feat in ('b', 'bm'):
    try:
      get_layout(mcfg.layout).bone_pairs
    except ValueError as e:
      raise ConfigError(f'config.data.feat={data.feat!r} needs bones: {e}') from e
  if not data.demo and not Path(data.ann_file).expanduser().is_file():
    raise ConfigError(f'annotation file {data.ann_file!r} (config.data.ann_file) does not exist; download the '
                      'skeleton pickle (see README, "Training on NTU60/120") or pass '
                      '--config.data.ann_file=/path/to/file.pkl')
  if data.demo and data.demo not in ('2d', '3d'):
    raise ConfigError(f"config.data.demo={data.demo!r}; use '2d', '3d' or '' (a real annotation file)")
  if config.init_from and not Path(config.init_from).is_dir():
    raise ConfigError(f'config.init_from={config.init_from!r} is not a checkpoint directory; convert a PyTorch '
                      'checkpoint with convert/from_torch.py first')


def _flatten(d: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = list(v) if isinstance(v, tuple) else v
  return out


def config_to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return json.loads(config.to_json_best_effort())


def check_resume_compatible(saved: dict[str, Any], config: ml_collections.ConfigDict, workdir: Path) -> None:
  """Refuses to resume a workdir whose checkpoint came from a different configuration."""
  old, new = _flatten(saved), _flatten(config_to_dict(config))
  diff = [k for k in sorted(set(old) | set(new)) if k not in RESUMABLE_CHANGES and old.get(k) != new.get(k)]
  if diff:
    shown = '; '.join(f'{k}: checkpoint {old.get(k)!r} vs now {new.get(k)!r}' for k in diff[:8])
    raise ConfigError(f'{workdir} holds a checkpoint of a different configuration ({shown}); resuming it would '
                      'mix two runs. Use a new --workdir, or restore the original settings to resume')


# ----------------------------------------------------------------------------------------------------------
# State


def learning_rate(config: ml_collections.ConfigDict, global_batch: int) -> float:
  if config.optim.auto_scale_lr:
    return steps.scaled_lr(config.optim.base_lr, global_batch, config.optim.reference_batch)
  return config.optim.base_lr


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int, global_batch: int):
  """``(optimizer, schedule)`` of the recipe for a run of ``total_steps`` steps."""
  schedule = steps.cosine_schedule(learning_rate(config, global_batch), total_steps)
  optimizer = steps.make_optimizer(schedule, momentum=config.optim.momentum, nesterov=config.optim.nesterov,
                                   weight_decay=config.optim.weight_decay)
  return optimizer, schedule


def _global_array(x: np.ndarray, sharding) -> jax.Array:
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def initial_model_state(config: ml_collections.ConfigDict, mcfg: ModelConfig):
  """``(graphdef, params, stats)`` on the host: freshly initialised, or loaded from ``config.init_from``."""
  model = build_model(mcfg, seed=config.seed, dtype=config.dtype, param_dtype='float32')
  if config.init_from:
    src, _ = ckpt_lib.load_model(config.init_from)
    src_cfg, ours = src.config.to_dict(), mcfg.to_dict()
    differs = [k for k in ours if k not in ('num_classes', 'head_dropout', 'tcn_dropout') and ours[k] != src_cfg[k]]
    if differs:
      raise ConfigError(f'config.init_from={config.init_from!r}: its architecture differs from config.model in '
                        + ', '.join(f'{k} (checkpoint {src_cfg[k]!r}, config {ours[k]!r})' for k in differs)
                        + "; set those config.model fields to the checkpoint's values")
    if src_cfg['num_classes'] != mcfg.num_classes:
      logger.info('init_from: %d classes in the checkpoint, %d here: the classification head is re-initialised',
                  src_cfg['num_classes'], mcfg.num_classes)
      src.cls_head = model.cls_head
    nnx.update(model, nnx.state(src))
  return steps.split_model(model)


def create_train_state(config: ml_collections.ConfigDict, mcfg: ModelConfig, mesh, optimizer):
  """``(graphdef, state, state_sharding)``: the TrainState placed replicated over the mesh."""
  graphdef, params, stats = initial_model_state(config, mcfg)
  rep = sharding_lib.replicated(mesh)
  params = jax.tree.map(lambda x: _global_array(x, rep), params)
  stats = jax.tree.map(lambda x: _global_array(x, rep), stats)
  state = jax.jit(lambda p, s: steps.init_train_state(p, s, optimizer), out_shardings=rep)(params, stats)
  return graphdef, state, jax.tree.map(lambda _: rep, state)


def bn_groups(config: ml_collections.ConfigDict) -> int:
  return config.batch_size // config.bn_group_size if config.bn_group_size else 1


def jit_train_step(graphdef, optimizer, schedule, mesh, state_sharding, groups: int):
  step = steps.make_train_step(graphdef, optimizer, bn_groups=groups, lr_schedule=schedule)
  rep, data = sharding_lib.replicated(mesh), sharding_lib.batch_sharding(mesh)
  return jax.jit(step, in_shardings=(state_sharding, data, rep), out_shardings=(state_sharding, rep),
                 donate_argnums=0)


# ----------------------------------------------------------------------------------------------------------
# Outputs


class MetricWriter:
  """JSON lines + TensorBoard in the workdir, on process 0 only."""

  def __init__(self, workdir: Path, enabled: bool):
    self.enabled = enabled
    self._tb = None
    if enabled:
      self._jsonl = open(workdir / 'metrics.jsonl', 'a', encoding='utf-8')
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(str(workdir / 'tb'))
      except ImportError:       # TensorBoard output is optional
        logger.warning('tensorboardX is not installed; metrics go to metrics.jsonl only')

  def write(self, step: int, record: dict[str, Any]) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({'step': step, **record}) + '\n')
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in record.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
          self._tb.add_scalar(k, v, step)
      self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      if self._tb is not None:
        self._tb.close()


def write_probe(directory: Path) -> None:
  """Creates ``directory`` if needed and writes, syncs and removes 64 KiB in it: raises ``OSError`` when it
  cannot be written (read-only, not a directory, disk full)."""
  probe = directory / f'.write-probe-{os.getpid()}'
  try:
    directory.mkdir(parents=True, exist_ok=True)
    with open(probe, 'wb') as f:
      f.write(b'\0' * 65536)
      f.flush()
      os.fsync(f.fileno())
  finally:
    try:
      probe.unlink()
    except OSError:            # never created (or the directory is gone): nothing to remove
      pass


def probe_writable(directory: Path) -> None:
  """Fails early, with the reason, when the workdir cannot be written (read-only, disk full)."""
  try:
    write_probe(directory)
  except OSError as e:
    raise ConfigError(f'workdir {str(directory)!r} is not writable ({e.strerror or e}); free some space or choose '
                      'another --workdir') from e


class _SignalFlag:
  """Records SIGTERM/SIGINT; the loop saves and stops at the next step boundary."""

  def __init__(self):
    self.signum = 0
    self._old = {}

  def __enter__(self):
    if _is_main_thread():
      for s in (signal.SIGTERM, signal.SIGINT):
        self._old[s] = signal.signal(s, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.signum:
      logger.warning('signal %d again: the checkpoint is being saved, the run stops as soon as it is complete', signum)
      return
    self.signum = signum

  def __exit__(self, *exc):
    for s, old in self._old.items():
      signal.signal(s, old)


class _FinishSavesOnError:
  """On an exception out of the loop, lets an asynchronous save still in flight complete, so the last good
  checkpoint is on disk (not left as a temporary directory) when the process exits."""

  def __init__(self, mngr):
    self._mngr = mngr

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    if exc_type is not None:
      try:
        self._mngr.wait_until_finished()
      except Exception as e:   # the original error is the one to report
        logger.warning('a pending checkpoint save failed too: %s', e)
    return False


def _is_main_thread() -> bool:
  import threading
  return threading.current_thread() is threading.main_thread()


def _agree(flag: int) -> int:
  """The largest value of ``flag`` over processes (every process stops at the same step)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return int(np.max(multihost_utils.process_allgather(np.int32(flag))))


# ----------------------------------------------------------------------------------------------------------
# The run


def load_data(config: ml_collections.ConfigDict, mcfg: ModelConfig, split: str):
  """The split as a SkeletonDataset; a file that cannot be used raises :class:`DataError` naming it."""
  ann = config.data.ann_file
  try:
    return annotations.load_annotations(ann, split=split, layout=mcfg.layout, num_classes=mcfg.num_classes,
                                        cache_dir=config.data.cache_dir or None)
  except (ValueError, OSError) as e:   # the loader's messages name the file, the sample and the fix
    raise DataError(str(e) if str(ann) in str(e) else f'annotation file {ann!r}: {e}') from e


def load_eval_data(config: ml_collections.ConfigDict, mcfg: ModelConfig, field: str):
  """The split ``config.data.<field>`` (``val_split`` / ``test_split``); :class:`DataError` if it has no samples."""
  ds = load_data(config, mcfg, config.data[field])
  if not len(ds):
    raise DataError(f'config.data.{field}={ds.split!r} of {ds.source} has no samples to evaluate ('
                    f'{len(ds.skipped)} skipped as empty); name a split with samples')
  return ds


def _repair_metrics(path: Path, last_step: int) -> None:
  """Drops from ``metrics.jsonl`` what a killed run left behind: a partly written last line and the records
  of steps after ``last_step`` (the checkpoint the run resumes from), which the resumed run writes again."""
  if not path.exists():
    return
  kept, changed = [], False
  for line in path.read_text(encoding='utf-8', errors='replace').splitlines(keepends=True):
    try:
      record = json.loads(line) if line.endswith('\n') else None
    except ValueError:
      record = None
    if isinstance(record, dict) and isinstance(record.get('step'), int) and record['step'] <= last_step:
      kept.append(line)
    else:
      changed = changed or bool(line.strip())
  if changed:
    tmp = path.with_name(path.name + '.tmp')
    tmp.write_text(''.join(kept), encoding='utf-8')
    os.replace(tmp, path)


def _prepare_demo(config: ml_collections.ConfigDict) -> None:
  if not config.data.demo:
    return
  from stgcn_jax.data import synthetic
  if jax.process_index() == 0:
    synthetic.ensure_demo_dataset(config.data.ann_file, config.data.demo)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices('demo dataset')


# The checkpoint's ``meta`` key holding the metrics of the steps after the last metrics record (a resumed run
# logs them in its first record, as an uninterrupted run would).
METRICS_WINDOW = 'metrics_window'


def _meta(config, mcfg: ModelConfig, class_names) -> dict[str, Any]:
  return {'model_config': mcfg.to_dict(), 'source': 'stgcn_jax.train', 'feat': config.data.feat,
          'layout': mcfg.to_dict()['layout'],
          'class_names': class_names, 'config': config_to_dict(config)}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
                       mesh: jax.sharding.Mesh | None = None) -> dict[str, Any]:
  """Trains (or resumes) the run in ``workdir``; returns the last validation and the test metrics.

  ``mesh`` defaults to a 1-D mesh over every device of every process.

  Raises:
    ConfigError before any compilation for a configuration that cannot run; NonFiniteLossError;
    Preempted after saving when SIGTERM/SIGINT arrived.
  """
  validate_config(config)
  started = time.perf_counter()
  workdir = Path(workdir).absolute()
  is_main = jax.process_index() == 0
  if is_main:
    probe_writable(workdir)
  _prepare_demo(config)
  mcfg = model_config(config)
  mesh = sharding_lib.make_mesh() if mesh is None else mesh
  try:
    sharding_lib.check_batch_size(config.batch_size, mesh, bn_group_size=config.bn_group_size)
  except ValueError as e:
    raise ConfigError(f'{e} (config.batch_size / config.bn_group_size)') from e

  train_ds = load_data(config, mcfg, config.data.train_split)
  if not train_ds.is_2d:
    try:
      get_layout(mcfg.layout).align_3d()
    except ValueError as e:
      raise ConfigError(f'config.model.layout for the 3D data of {train_ds.source}: {e}') from e
  val_ds = load_eval_data(config, mcfg, 'val_split')
  test_ds = None
  if config.run_test:   # checked now, not after training: the split must exist, and name each sample once
    test_ds = val_ds if config.data.test_split == config.data.val_split else load_eval_data(config, mcfg, 'test_split')
    try:
      test_ds.check_unique_frame_dirs()
    except ValueError as e:
      raise DataError(f'config.data.test_split: {e}') from e
  try:
    steps_per_epoch = pipeline.steps_per_epoch(len(train_ds), config.data.train_repeat, config.batch_size)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  total_steps = config.num_epochs * steps_per_epoch
  stop_step = total_steps if config.max_steps < 0 else min(config.max_steps, total_steps)
  lr = learning_rate(config, config.batch_size)
  logger.info('%d training samples x %d repeats, global batch %d on %d devices (%d processes): %d steps/epoch, '
              '%d steps; lr %.4g (base %.4g per %d, auto_scale_lr=%s); BatchNorm %s', len(train_ds),
              config.data.train_repeat, config.batch_size, mesh.devices.size, jax.process_count(), steps_per_epoch,
              total_steps, lr, config.optim.base_lr, config.optim.reference_batch, config.optim.auto_scale_lr,
              f'per group of {config.bn_group_size}' if config.bn_group_size else 'over the global batch')

  ckpt_dir = workdir / 'checkpoints'
  mngr = ckpt_lib.manager(ckpt_dir, max_to_keep=config.keep_checkpoints, best_metric='val_top1',
                          async_save=config.async_checkpointing)
  latest = mngr.latest_step()
  open_window: list[dict[str, Any]] = []
  if latest is not None:
    _, meta = ckpt_lib.read_meta(ckpt_dir, latest)
    check_resume_compatible(meta.get('config', {}), config, workdir)
    ckpt_lib.check_data_processes(ckpt_dir, latest)
    open_window = meta.get(METRICS_WINDOW) or []

  optimizer, schedule = make_optimizer(config, total_steps, config.batch_size)
  graphdef, state, state_sharding = create_train_state(config, mcfg, mesh, optimizer)
  iterator = pipeline.make_train_iterator(
      train_ds, feat=config.data.feat, layout=mcfg.layout, clip_len=config.data.clip_len,
      global_batch_size=config.batch_size, seed=config.seed, repeat=config.data.train_repeat,
      shard_index=jax.process_index(), shard_count=jax.process_count(), num_workers=config.data.num_workers,
      num_person=mcfg.num_person)
  if latest is not None:
    state, iterator = ckpt_lib.restore_training(mngr, latest, state, iterator)
    logger.info('resumed from %s at step %d', ckpt_dir, latest)

  from stgcn_jax import labels as labels_lib
  class_names = labels_lib.class_names(mcfg.num_classes)
  meta = _meta(config, mcfg, class_names)
  if is_main:
    (workdir / 'config.json').write_text(json.dumps(config_to_dict(config), indent=1, sort_keys=True))
    _repair_metrics(workdir / 'metrics.jsonl', latest or 0)
  writer = MetricWriter(workdir, is_main)
  train_step = jit_train_step(graphdef, optimizer, schedule, mesh, state_sharding, bn_groups(config))
  evaluator = eval_lib.Evaluator(graphdef, mesh)
  rng = jax.random.key(config.seed)

  def evaluate(split_ds, num_clips):
    scores = evaluator.predict(state.params, state.stats, split_ds, feat=config.data.feat, layout=mcfg.layout,
                               clip_len=config.data.clip_len, num_clips=num_clips,
                               batch_size=config.eval_batch_size, num_workers=config.data.num_workers,
                               num_person=mcfg.num_person)
    return scores, eval_lib.summarize(scores, split_ds.labels)

  saved_step = latest

  def save_failed(step, e):
    try:                       # an earlier asynchronous save may still be completing: it is the intact one
      mngr.wait_until_finished()
    except Exception:          # the error being reported is the one that matters
      pass
    intact = [s for s in mngr.all_steps() if s != step]
    error = SaveError(f'could not save the checkpoint of step {step} in {ckpt_dir}: {e.strerror or e}; the previous '
                      f'checkpoint (step {max(intact) if intact else None}) is intact. Free disk space and run the '
                      'same command to resume')
    error.errno = e.errno
    return error

  def save(step, metrics=None, force=False):
    nonlocal saved_step
    if step == saved_step:     # e.g. a signal right after a scheduled save: that checkpoint is the one
      return
    fetch_pending()            # nothing from a non-finite step is saved
    # The steps logged since the last metrics record go with the checkpoint, so that a run resumed from it logs
    # the same record at the next log step as a run that never stopped.
    window = [{'step': s, **m} for s, m in pending]
    try:
      ckpt_lib.save(mngr, step, params=state.params, stats=state.stats, meta={**meta, METRICS_WINDOW: window},
                    opt={'step': state.step, 'opt_state': state.opt_state}, data=iterator, metrics=metrics,
                    force=force)
    except OSError as e:       # also a failed earlier asynchronous save, reported here
      raise save_failed(step, e) from e
    saved_step = step

  def wait_for_saves():
    try:
      mngr.wait_until_finished()
    except OSError as e:
      raise save_failed(saved_step, e) from e

  step = int(jax.device_get(state.step))
  results: dict[str, Any] = {}
  # The steps since the last metrics record: (step index, metrics), on the device until fetched. A resumed run
  # starts with those the checkpoint kept (host floats).
  pending: list[tuple[int, dict[str, Any]]] = [
      (int(r['step']), {k: float(v) for k, v in r.items() if k != 'step'}) for r in open_window]
  bar = _progress(is_main, stop_step, step)
  t_window, n_window = time.perf_counter(), 0

  def fetch_pending():
    """Fetches the pending steps' metrics to the host (as floats, kept pending); raises on a non-finite loss."""
    if not pending:
      return
    fetched = jax.device_get([m for _, m in pending])
    first = pending[0][0]
    for (s, _), m in zip(pending, fetched):
      if not (math.isfinite(float(m['loss'])) and math.isfinite(float(m['param_norm']))):
        what = 'loss' if not math.isfinite(float(m['loss'])) else 'parameter update'
        raise NonFiniteLossError(
            f'the training {what} became non-finite (loss {float(m["loss"])}) at step {s + 1} (window of steps '
            f'{first + 1}..{pending[-1][0] + 1}); the last checkpoint (step {mngr.latest_step()}) is intact. Lower '
            'config.optim.base_lr, check the input data for extreme values, or use config.dtype=float32')
    pending[:] = [(s, {k: float(v) for k, v in m.items()}) for (s, _), m in zip(pending, fetched)]

  def flush_metrics():
    """The metrics record of the steps since the last one (means, in float64; the last learning rate; the
    samples/s of this process's steps, not counting evaluations and saves); raises on a non-finite loss."""
    nonlocal t_window, n_window
    if not pending:
      return None
    fetch_pending()
    fetched = [m for _, m in pending]
    last = pending[-1][0]
    pending.clear()
    elapsed = time.perf_counter() - t_window
    record = {k: float(np.mean(np.array([m[k] for m in fetched], np.float64))) for k in fetched[0]}
    record['top1'] *= 100            # percent, as val_top1 / test_top1
    record['lr'] = fetched[-1]['lr']
    record['samples_per_s'] = n_window * config.batch_size / max(elapsed, 1e-9)
    record['epoch'] = last / steps_per_epoch + 1 / steps_per_epoch
    t_window, n_window = time.perf_counter(), 0
    return record

  @contextlib.contextmanager
  def paused():
    """Leaves the time spent inside (evaluations, saves) out of the window's samples/s."""
    nonlocal t_window
    start = time.perf_counter()
    try:
      yield
    finally:
      t_window += time.perf_counter() - start

  with _SignalFlag() as signals, _FinishSavesOnError(mngr):
    while step < stop_step:
      batch = sharding_lib.global_batch(next(iterator), mesh)
      state, metrics = train_step(state, batch, rng)
      pending.append((step, metrics))
      step += 1
      n_window += 1
      bar.update(1)
      end_of_epoch = step % steps_per_epoch == 0
      if step % config.log_every_steps == 0 or end_of_epoch or step == stop_step:
        record = flush_metrics()
        writer.write(step, record)
        bar.set_postfix(loss=f'{record["loss"]:.4f}', lr=f'{record["lr"]:.4g}',
                        samples_s=f'{record["samples_per_s"]:.1f}')
      epoch = step // steps_per_epoch
      eval_now = end_of_epoch and (epoch % config.eval_every_epochs == 0 or step == total_steps)
      save_now = (end_of_epoch if not config.checkpoint_every_steps else step % config.checkpoint_every_steps == 0)
      metrics_for_ckpt = None
      if eval_now:
        fetch_pending()
        with paused():
          _, val = evaluate(val_ds, config.data.val_clips)
        results['val'] = val
        writer.write(step, {f'val_{k}': v for k, v in val.items()} | {'epoch': epoch})
        logger.info('epoch %d step %d: val %s', epoch, step, _fmt(val))
        metrics_for_ckpt = {'val_top1': val['top1']}
      if save_now or eval_now or step == stop_step:
        with paused():
          save(step, metrics_for_ckpt)
      check_signal = jax.process_count() == 1 or step % config.log_every_steps == 0 or save_now
      if check_signal and _agree(signals.signum) and step < stop_step:
        save(step, force=True)
        wait_for_saves()
        bar.close()
        writer.close()
        raise Preempted(step, signals.signum or signal.SIGTERM)
    flush_metrics()
    wait_for_saves()
  bar.close()

  if config.run_test and step == total_steps:
    scores, test = evaluate(test_ds, config.data.test_clips)
    results['test'] = test
    writer.write(step, {f'test_{k}': v for k, v in test.items()})
    logger.info('test (%d clips): %s', config.data.test_clips, _fmt(test))
    if is_main:
      results['outputs'] = eval_lib.write_outputs(workdir / 'test_result.pkl', scores, test_ds, class_names,
                                                  meta)
  writer.close()
  mngr.close()
  if is_main:
    from stgcn_jax import report
    results.setdefault('outputs', {})['curves'] = report.plot_training_curves(workdir / 'metrics.jsonl',
                                                                              workdir / 'training_curves.png')
    results['outputs'].update(checkpoints=str(ckpt_dir), metrics=str(workdir / 'metrics.jsonl'),
                              tensorboard=str(workdir / 'tb'))
  results['step'] = step
  results['workdir'] = str(workdir)
  results['seconds'] = time.perf_counter() - started
  return results


def _fmt(metrics: dict[str, float]) -> str:
  return ', '.join(f'{k} {v:.2f}' for k, v in metrics.items())


def _progress(enabled: bool, total: int, initial: int):
  try:
    from tqdm.auto import tqdm
  except ImportError:
    tqdm = None
  if enabled and tqdm is not None:
    return tqdm(total=total, initial=initial, desc='train', unit='step', dynamic_ncols=True)
  return _NoBar()


class _NoBar:
  def update(self, n): pass
  def set_postfix(self, **kw): pass
  def close(self): pass


# ----------------------------------------------------------------------------------------------------------
# Command line


def main(argv=None) -> int:
  from absl import flags
  from ml_collections import config_flags

  from stgcn_jax import cli

  flags.DEFINE_string('workdir', None, 'Output directory (checkpoints, metrics, config); resumed when it holds a '
                      'checkpoint.', required=True)
  cli.define_distributed_flags(flags)
  config_flags.DEFINE_config_file('config', None, 'Training config file (configs/*.py).', lock_config=True)

  def body(FLAGS) -> int:
    if FLAGS.config is None:
      return cli.fail('--config is required, e.g. --config configs/ntu60_2d_joint.py')
    try:
      out = train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except (ConfigError, ckpt_lib.CheckpointError) as e:
      return cli.fail(e)
    except SaveError as e:
      return cli.fail(e, SAVE_FAILED_EXIT_CODE)
    except NonFiniteLossError as e:
      return cli.fail(e, NONFINITE_EXIT_CODE)
    except Preempted as e:
      print(str(e), file=sys.stderr)
      return PREEMPTED_EXIT_CODE
    if jax.process_index() == 0:
      _print_summary(out)
    return 0

  return cli.run(body, argv)


def _print_summary(out: dict[str, Any]) -> None:
  print(f'finished at step {out["step"]} in {out["seconds"]:.1f} s; workdir {out["workdir"]}')
  if 'val' in out:
    print(f'val:  {_fmt(out["val"])}')
  if 'test' in out:
    print(f'test: {_fmt(out["test"])}')
  for name, path in out.get('outputs', {}).items():
    print(f'  {name}: {path}')


if __name__ == '__main__':
  from stgcn_jax import cli
  cli.relaunch_with_tcmalloc()
  sys.exit(main())
