"""Reliability: SIGKILL at random points, SIGTERM, full disks, corrupt or foreign inputs and checkpoints.

The fault tests run the real training CLI in subprocesses (tests/reliability_worker.py) on one CPU device,
with a persistent compilation cache shared by every run of the module: the uninterrupted reference run
compiles, and each restart loads the compiled steps. The reference run and every interrupted run use the same
program on the same device, so the resumed runs must reproduce it bitwise: every logged loss, the validation
results and the final parameters.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from stgcn_jax import checkpoint as ckpt_lib
from stgcn_jax import train
from stgcn_jax.model import ModelConfig, build_model
from tests.train_utils import tiny_config, write_random_annotations

ROOT = Path(__file__).resolve().parents[1]
NUM_KILLS = int(os.environ.get('STGCN_NUM_KILLS', '10'))
EPOCHS = 8             # 3 steps per epoch: 24 steps, enough for NUM_KILLS kills that each advance 0-3 steps
RUN = dict(num_epochs=EPOCHS, run_test=False, checkpoint_every_steps=1, async_checkpointing=True)
RESUMED = re.compile(r'resumed from \S+ at step (\d+)')


class Harness:
  """Writes the config files and runs the training CLI (through the worker) with a shared compile cache."""

  def __init__(self, root: Path):
    self.root = root
    self.ann_file = write_random_annotations(root / 'tiny_2d.pkl')
    self.cache = root / 'jax_cache'
    self.env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=1',
                    PYTHONPATH=str(ROOT), JAX_COMPILATION_CACHE_DIR=str(self.cache),
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0', JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0',
                    TQDM_DISABLE='1')
    self.configs = {}

  def config_file(self, **overrides) -> Path:
    key = json.dumps({**RUN, **overrides}, sort_keys=True)
    if key not in self.configs:
      path = self.root / 'configs' / f'run{len(self.configs)}.py'
      path.parent.mkdir(exist_ok=True)
      path.write_text('from tests.train_utils import tiny_config\n\n\ndef get_config():\n'
                      f'  return tiny_config({str(self.ann_file)!r}, **{ {**RUN, **overrides}!r})\n')
      self.configs[key] = path
    return self.configs[key]

  def command(self, workdir: Path, worker_args=(), **overrides) -> list[str]:
    return [sys.executable, str(ROOT / 'tests' / 'reliability_worker.py'), *worker_args, '--',
            '--config', str(self.config_file(**overrides)), '--workdir', str(workdir)]

  def start(self, workdir: Path, log: Path, worker_args=(), **overrides) -> subprocess.Popen:
    with open(log, 'w') as f:
      return subprocess.Popen(self.command(workdir, worker_args, **overrides), env=self.env, cwd=self.root,
                              stdout=f, stderr=subprocess.STDOUT)

  def run(self, workdir: Path, worker_args=(), timeout=600, **overrides) -> subprocess.CompletedProcess:
    return subprocess.run(self.command(workdir, worker_args, **overrides), env=self.env, cwd=self.root,
                          capture_output=True, text=True, timeout=timeout)


def _complete_steps(ckpt_dir: Path) -> list[int]:
  return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()) if ckpt_dir.is_dir() else []


def _tmp_dirs(ckpt_dir: Path) -> list[str]:
  return sorted(p.name for p in ckpt_dir.iterdir() if 'tmp' in p.name) if ckpt_dir.is_dir() else []


def _records(workdir: Path) -> list[dict]:
  return [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]


def _params(workdir: Path, step: int | None = None) -> list[np.ndarray]:
  model, _ = ckpt_lib.load_model(workdir / 'checkpoints', step)
  return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model))]


def _no_traceback(text: str) -> None:
  assert 'Traceback' not in text, text[-3000:]


@pytest.fixture(scope='module')
def harness(tmp_path_factory):
  """The harness and an uninterrupted reference run (which fills the compilation cache)."""
  h = Harness(tmp_path_factory.mktemp('reliability'))
  h.reference = h.root / 'reference'
  log = h.root / 'reference.log'
  proc = h.start(h.reference, log)
  appeared, seen = [], set()
  while proc.poll() is None:                  # times between checkpoints: the scale of the kill delays
    new = set(_complete_steps(h.reference / 'checkpoints')) - seen
    if new:
      appeared.append(time.monotonic())
      seen |= new
    time.sleep(0.01)
  assert proc.returncode == 0, log.read_text()[-3000:]
  gaps = np.diff(appeared[1:])
  h.step_seconds = float(np.median(gaps)) if len(gaps) else 0.5
  h.records = _records(h.reference)
  assert [r['step'] for r in h.records if 'loss' in r] == list(range(1, 3 * EPOCHS + 1))
  assert len({r['loss'] for r in h.records if 'loss' in r}) > 10        # it trained: the losses move
  h.params = _params(h.reference)
  return h


def _assert_same_as_reference(h: Harness, workdir: Path, until_step: int | None = None) -> None:
  """Every metrics record bitwise equal to the reference's (up to ``until_step``), each step once; without
  ``until_step`` also the final parameters."""
  records = _records(workdir)
  reference = [r for r in h.records if until_step is None or r['step'] <= until_step]
  assert [r['step'] for r in records] == [r['step'] for r in reference]     # no duplicates, nothing missing
  untimed = lambda rs: [{k: v for k, v in r.items() if k != 'samples_per_s'} for r in rs]
  assert untimed(records) == untimed(reference)             # losses, learning rates, validation: bitwise
  if until_step is None:
    for a, b in zip(_params(workdir), h.params, strict=True):
      np.testing.assert_array_equal(a, b)
  assert _tmp_dirs(workdir / 'checkpoints') == []


# ----------------------------------------------------------------------------------------------------------
# Crash safety


def test_sigkill_at_random_points_resumes_from_the_last_complete_checkpoint(harness, tmp_path):
  """NUM_KILLS SIGKILLs at random times (during steps and asynchronous saves); then the run completes and
  equals the uninterrupted one bitwise. A fabricated partial checkpoint (Orbax temporary directory of a later
  step) is ignored and removed."""
  h = harness
  seed = int(os.environ.get('STGCN_KILL_SEED', time.time_ns() % 2**32))
  rng = random.Random(seed)
  workdir = tmp_path / 'killed'
  ckpt_dir = workdir / 'checkpoints'
  kills = []                                   # (resume step expected next, step dirs, temporary dirs at the kill)
  fabricated = None
  for i in range(NUM_KILLS + 1):
    log = tmp_path / f'run{i}.log'
    proc = h.start(workdir, log)
    start_steps = _complete_steps(ckpt_dir)
    text = lambda: log.read_text()
    early = 0 < i < NUM_KILLS and rng.random() < 0.3   # killed while it starts: restoring, first step
    deadline = time.monotonic() + 600
    while proc.poll() is None and (('steps/epoch' not in text()) if early else
                                   _complete_steps(ckpt_dir)[-1:] == start_steps[-1:]):
      assert time.monotonic() < deadline, text()[-3000:]
      time.sleep(0.005)
    if i == NUM_KILLS:
      assert proc.wait(timeout=600) == 0, text()[-3000:]
    else:
      assert proc.poll() is None, f'seed {seed}: run {i} ended before its kill:\n{text()[-3000:]}'
      time.sleep(rng.uniform(0, 3.0 if early else 1.2 * h.step_seconds))   # in a step, a save or the start
      proc.send_signal(signal.SIGKILL)
      assert proc.wait(timeout=60) == -signal.SIGKILL, text()[-3000:]
      kills.append((max(_complete_steps(ckpt_dir), default=None), _complete_steps(ckpt_dir), _tmp_dirs(ckpt_dir),
                    early))
    if i > 0:                                  # the run resumed from the last complete step before its start
      resumed = [int(m) for m in RESUMED.findall(text())]
      expected = [] if kills[i - 1][0] is None else [kills[i - 1][0]]
      if early and i < NUM_KILLS:              # it may have been killed before it got that far
        assert resumed in ([], expected), (seed, i, kills, text()[-3000:])
      else:
        assert resumed == expected, (seed, i, kills, text()[-3000:])
    if fabricated is not None:
      assert not fabricated.exists()           # removed at the start, never read
      fabricated = None
    if i == 2 and kills[-1][0] is not None:    # a partial later step, as a kill in the middle of a save leaves
      last = kills[-1][0]
      fabricated = ckpt_dir / f'{last + 1}.orbax-checkpoint-tmp'
      shutil.rmtree(fabricated, ignore_errors=True)
      shutil.copytree(ckpt_dir / str(last), fabricated)
      for marker in fabricated.rglob('commit_success.txt'):
        marker.unlink()
      (fabricated / 'model' / 'manifest.ocdbt').write_bytes(b'partial')
  assert len(kills) == NUM_KILLS
  print(f'seed {seed}: {NUM_KILLS} kills, last complete step at each: {[k[0] for k in kills]}; '
        f'{sum(bool(k[2]) for k in kills)} in the middle of a save, {sum(k[3] for k in kills)} while starting')
  _assert_same_as_reference(h, workdir)


# ----------------------------------------------------------------------------------------------------------
# Preemption


def test_sigterm_saves_exits_75_and_more_sigterms_during_the_save_do_no_harm(harness, tmp_path):
  """SIGTERM in step 5 (not an epoch end: checkpoints every epoch here), two more while the forced checkpoint
  of step 5 is written; the run exits 75 with that checkpoint complete and resumes to the reference."""
  h = harness
  workdir = tmp_path / 'term'
  out = h.run(workdir, ['--term-at-step', '5'], checkpoint_every_steps=0)
  assert out.returncode == train.PREEMPTED_EXIT_CODE, out.stderr[-3000:]
  assert 'stopped by signal 15 at step 5; checkpoint saved' in out.stderr
  assert 'two more SIGTERMs sent while saving step 5' in out.stderr
  assert 'signal 15 again: the checkpoint is being saved' in out.stderr
  _no_traceback(out.stderr)
  assert _complete_steps(workdir / 'checkpoints') == [3, 5] and _tmp_dirs(workdir / 'checkpoints') == []
  out = h.run(workdir, max_steps=9)                         # resumed (every-step checkpoints now), 4 more steps
  assert out.returncode == 0, out.stderr[-3000:]
  assert RESUMED.findall(out.stderr) == ['5']
  _assert_same_as_reference(h, workdir, until_step=9)


def test_sigterm_right_after_a_scheduled_checkpoint_keeps_that_checkpoint(harness, tmp_path):
  workdir = tmp_path / 'term_saved'
  out = harness.run(workdir, ['--term-at-step', '2'], max_steps=4)
  assert out.returncode == train.PREEMPTED_EXIT_CODE, out.stderr[-3000:]
  assert 'stopped by signal 15 at step 2' in out.stderr
  assert _complete_steps(workdir / 'checkpoints') == [1, 2] and _tmp_dirs(workdir / 'checkpoints') == []
  assert [r['step'] for r in _records(workdir)] == [1, 2]
  _no_traceback(out.stderr)


# ----------------------------------------------------------------------------------------------------------
# Full disk, unwritable workdir


def test_disk_full_at_save_time_keeps_the_previous_checkpoint(harness, tmp_path):
  h = harness
  workdir = tmp_path / 'full'
  out = h.run(workdir, ['--enospc-at-step', '4'])
  assert out.returncode == train.SAVE_FAILED_EXIT_CODE, out.stderr[-3000:]
  assert ('could not save the checkpoint of step 4' in out.stderr and 'No space left on device' in out.stderr
          and 'the previous checkpoint (step 3) is intact' in out.stderr and 'Free disk space' in out.stderr)
  _no_traceback(out.stderr)
  ckpt_dir = workdir / 'checkpoints'
  assert max(_complete_steps(ckpt_dir)) == 3 and _tmp_dirs(ckpt_dir) == []
  out = h.run(workdir, max_steps=6)                         # space freed: the same command resumes
  assert out.returncode == 0, out.stderr[-3000:]
  assert RESUMED.findall(out.stderr) == ['3']
  _assert_same_as_reference(h, workdir, until_step=6)


def test_unwritable_workdir_is_detected_before_anything_runs(tmp_path, monkeypatch):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a directory')
  with pytest.raises(train.ConfigError, match=r"workdir '.*a_file/run' is not writable.*choose another --workdir"):
    train.train_and_evaluate(tiny_config(write_random_annotations(tmp_path / 'a.pkl')), blocker / 'run')
  if os.geteuid() != 0:                      # root writes into read-only directories: simulated below instead
    ro = tmp_path / 'ro'
    ro.mkdir()
    ro.chmod(0o500)
    try:
      with pytest.raises(train.ConfigError, match='is not writable'):
        train.probe_writable(ro)
    finally:
      ro.chmod(0o700)

  def full(fd):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  monkeypatch.setattr(os, 'fsync', full)
  with pytest.raises(train.ConfigError, match=r"is not writable \(No space left on device\); free some space"):
    train.probe_writable(tmp_path / 'full')
  assert not list((tmp_path / 'full').iterdir())            # the probe file does not stay behind either

  def read_only(path, *args, **kwargs):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS))
  monkeypatch.undo()
  monkeypatch.setattr('builtins.open', read_only)
  with pytest.raises(train.ConfigError, match=r'Read-only file system'):
    train.probe_writable(tmp_path / 'ro2')


# ----------------------------------------------------------------------------------------------------------
# Corrupt or foreign inputs


def _evil_pickle(marker: Path) -> bytes:
  class Payload:
    def __reduce__(self):
      return (os.system, (f'touch {marker}',))
  return pickle.dumps({'split': {'xsub_train': ['s0']}, 'annotations': [Payload()]})


@pytest.mark.parametrize('case', ['truncated', 'garbled', 'empty', 'not_annotations', 'executes_code', 'nan'])
def test_bad_annotation_file_stops_training_with_an_error_naming_it(harness, tmp_path, case):
  good = harness.ann_file.read_bytes()
  path = tmp_path / f'{case}.pkl'
  marker = tmp_path / 'pwned'
  if case == 'nan':
    data = pickle.loads(good)
    data['annotations'][2]['keypoint'][0, 3, 5, 1] = np.inf
    content = pickle.dumps(data)
  else:
    content = {'truncated': good[:len(good) // 3], 'garbled': bytes(np.random.default_rng(0).integers(0, 256, 4096,
                                                                                                        np.uint8)),
               'empty': b'', 'not_annotations': pickle.dumps({'weights': np.zeros(3)}),
               'executes_code': _evil_pickle(marker)}[case]
  path.write_bytes(content)
  with pytest.raises(train.DataError) as info:
    train.train_and_evaluate(tiny_config(path), tmp_path / 'w')
  message = str(info.value)
  assert str(path) in message, message
  assert not marker.exists()
  expected = {'truncated': 'pickle', 'garbled': 'pickle', 'empty': 'pickle', 'not_annotations': 'mmaction2/pyskl format',
              'executes_code': 'may be malicious', 'nan': 'NaN/Inf'}[case]
  assert expected in message, message
  assert not (tmp_path / 'w' / 'checkpoints').exists() or not _complete_steps(tmp_path / 'w' / 'checkpoints')


def test_cli_corrupt_annotation_file_exits_2_naming_it_without_a_traceback(harness, tmp_path):
  bad = tmp_path / 'broken.pkl'
  bad.write_bytes(harness.ann_file.read_bytes()[:1000])
  config = tmp_path / 'cfg.py'
  config.write_text(f'from tests.train_utils import tiny_config\n\n\ndef get_config():\n'
                    f'  return tiny_config({str(bad)!r})\n')
  out = subprocess.run([sys.executable, '-m', 'stgcn_jax.train', '--config', str(config), '--workdir',
                        str(tmp_path / 'w')], env=harness.env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2, out.stderr[-3000:]
  assert re.search(rf'error: .*{re.escape(str(bad))}', out.stderr), out.stderr[-3000:]
  _no_traceback(out.stderr)


def test_cli_refuses_a_workdir_of_another_config_and_suggests_a_new_workdir(harness, tmp_path):
  workdir = tmp_path / 'copy'
  shutil.copytree(harness.reference, workdir)
  before = sorted(str(p.relative_to(workdir)) for p in workdir.rglob('*'))
  out = harness.run(workdir, **{'optim.base_lr': 0.05, 'model.base_channels': 16})
  assert out.returncode == 2, out.stderr[-3000:]
  assert 'holds a checkpoint of a different configuration' in out.stderr
  assert 'optim.base_lr: checkpoint 0.1 vs now 0.05' in out.stderr and 'model.base_channels' in out.stderr
  assert 'Use a new --workdir' in out.stderr
  _no_traceback(out.stderr)
  assert sorted(str(p.relative_to(workdir)) for p in workdir.rglob('*')) == before    # nothing touched


def test_cli_corrupt_checkpoint_in_the_workdir_is_a_clear_error(harness, tmp_path):
  workdir = tmp_path / 'copy'
  shutil.copytree(harness.reference, workdir)
  last = workdir / 'checkpoints' / str(max(_complete_steps(workdir / 'checkpoints')))
  for f in (last / 'opt').rglob('*'):
    if f.is_file() and f.parent.name == 'd':
      f.write_bytes(f.read_bytes()[:len(f.read_bytes()) // 2])     # truncated array data
  out = harness.run(workdir)
  assert out.returncode == 2, out.stderr[-3000:]
  assert f'{last} cannot be restored into this run: it is corrupt' in out.stderr
  assert 'Delete that step directory to resume from the previous step' in out.stderr
  _no_traceback(out.stderr)


@pytest.mark.parametrize('target', ['model/d', 'model/manifest.ocdbt', 'model/_METADATA', 'meta/metadata',
                                    'model/ocdbt.process_0/d'])
def test_corrupt_checkpoint_files_raise_checkpoint_error(harness, tmp_path, target):
  ckpt_dir = tmp_path / 'ckpt'
  shutil.copytree(harness.reference / 'checkpoints', ckpt_dir)
  step = max(_complete_steps(ckpt_dir))
  path = ckpt_dir / str(step) / target
  files = [f for f in path.rglob('*') if f.is_file()] if path.is_dir() else [path]
  assert files
  # Orbax may have merged the per-process store into model/d when it finalised the step; its files are then no
  # longer referenced, and truncating them must change nothing: the load gives the intact arrays.
  may_be_unreferenced = target == 'model/ocdbt.process_0/d'
  if may_be_unreferenced:
    shutil.copytree(ckpt_dir, tmp_path / 'intact')   # a separate copy: nothing read from it is cached for ckpt_dir
    intact, _ = ckpt_lib.load_model(tmp_path / 'intact')
  for f in files:
    data = f.read_bytes()
    f.write_bytes(data[:len(data) // 2])
  if may_be_unreferenced:
    try:
      loaded, _ = ckpt_lib.load_model(ckpt_dir)
    except ckpt_lib.CheckpointError as e:
      assert re.search(rf'{re.escape(str(ckpt_dir))}.*corrupt', str(e)) and len(str(e)) < 1500, str(e)
    else:
      for a, b in zip(jax.tree.leaves(nnx.state(loaded)), jax.tree.leaves(nnx.state(intact)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    return
  with pytest.raises(ckpt_lib.CheckpointError, match=rf'{re.escape(str(ckpt_dir))}.*corrupt') as info:
    ckpt_lib.load_model(ckpt_dir)
  assert len(str(info.value)) < 1500


def test_checkpoint_of_another_architecture(harness, tmp_path):
  # Metadata that claims another architecture than the arrays hold.
  ckpt_dir = tmp_path / 'lying'
  shutil.copytree(harness.reference / 'checkpoints', ckpt_dir)
  step = max(_complete_steps(ckpt_dir))
  meta_file = ckpt_dir / str(step) / 'meta' / 'metadata'
  meta = json.loads(meta_file.read_text())
  meta['model_config']['base_channels'] = 16
  meta_file.write_text(json.dumps(meta))
  with pytest.raises(ckpt_lib.CheckpointError, match='does not fit the expected architecture'):
    ckpt_lib.load_model(ckpt_dir)
  # init_from a checkpoint of another layout: refused, naming the field, before anything is compiled.
  cfg = ModelConfig(num_classes=4, layout='nturgb+d', base_channels=8, num_stages=4, inflate_stages=(3,),
                    down_stages=(3,))
  ckpt_lib.write_model(tmp_path / 'ntu', build_model(cfg, seed=0), {'layout': 'nturgb+d', 'feat': 'j'})
  config = tiny_config(harness.ann_file, init_from=str(tmp_path / 'ntu'))
  with pytest.raises(train.ConfigError, match=r"architecture differs from config.model in layout \(checkpoint "
                                              r"'nturgb\+d', config 'coco'\)"):
    train.initial_model_state(config, train.model_config(config))
  # A directory that is no checkpoint at all.
  (tmp_path / 'empty').mkdir()
  with pytest.raises(ckpt_lib.CheckpointError, match='holds no complete checkpoint step'):
    ckpt_lib.load_model(tmp_path / 'empty')


def test_partial_checkpoint_directories_are_never_picked_up(harness, tmp_path):
  ckpt_dir = tmp_path / 'ckpt'
  shutil.copytree(harness.reference / 'checkpoints', ckpt_dir)
  last = max(_complete_steps(ckpt_dir))
  for name in (f'{last + 1}.orbax-checkpoint-tmp', f'{last + 2}.orbax-checkpoint-tmp-1795747626'):
    partial = shutil.copytree(ckpt_dir / str(last), ckpt_dir / name)
    (partial / 'commit_success.txt').unlink()
    shutil.rmtree(partial / 'opt')
  step, _ = ckpt_lib.read_meta(ckpt_dir)
  assert step == last
  mngr = ckpt_lib.manager(ckpt_dir, read_only=True, async_save=False)
  assert mngr.latest_step() == last and last + 1 not in mngr.all_steps()
  model, _ = ckpt_lib.load_model(ckpt_dir)
  for a, b in zip(jax.tree.leaves(nnx.state(model)), harness.params, strict=True):
    np.testing.assert_array_equal(np.asarray(a), b)


def test_metrics_log_of_a_killed_run_is_repaired_on_resume(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  lines = [json.dumps({'step': s, 'loss': 1.0 / s}) for s in (1, 2, 3)] + [json.dumps({'step': 3, 'val_top1': 5.0})]
  path.write_text('\n'.join(lines + [json.dumps({'step': 4, 'loss': 0.2})]) + '\n{"step": 5, "lo')
  train._repair_metrics(path, 3)
  assert path.read_text() == '\n'.join(lines) + '\n'
  train._repair_metrics(path, 0)                            # no checkpoint: the run starts again from step 0
  assert path.read_text() == ''


def test_reads_orphaned_by_a_failed_restore_print_nothing(monkeypatch):
  """The closed-loop error of a read whose restore already failed is dropped; anything else is reported."""
  seen = []
  monkeypatch.setattr(sys, 'unraisablehook', seen.append)
  ckpt_lib._quiet_orphaned_reads()
  hook = sys.unraisablehook
  ckpt_lib._quiet_orphaned_reads()                      # once per process: not wrapped twice
  assert sys.unraisablehook is hook

  def unraisable(exc):
    return types.SimpleNamespace(exc_type=type(exc), exc_value=exc, exc_traceback=exc.__traceback__,
                                 err_msg=None, object=None)

  loop = asyncio.new_event_loop()
  loop.close()
  with pytest.raises(RuntimeError, match='Event loop is closed') as orphan:
    loop.call_soon_threadsafe(print)                    # what a late tensorstore completion callback does
  hook(unraisable(orphan.value))
  assert seen == []
  with pytest.raises(RuntimeError) as elsewhere:
    raise RuntimeError('Event loop is closed')          # same message, not from call_soon_threadsafe
  other = ValueError('a different failure')
  hook(unraisable(elsewhere.value))
  hook(unraisable(other))
  assert [u.exc_value for u in seen] == [elsewhere.value, other]
