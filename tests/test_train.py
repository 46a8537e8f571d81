"""Training: the recipe's numbers, device-count invariance, multi-process, resume, fine-tuning, bad configs."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from stgcn_jax import checkpoint as ckpt_lib
from stgcn_jax import sharding as sharding_lib
from stgcn_jax import train
from tests.train_utils import tiny_config, write_random_annotations

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def ann_file(tmp_path_factory):
  return write_random_annotations(tmp_path_factory.mktemp('data') / 'tiny_2d.pkl')


def _losses(workdir: Path) -> list[tuple[int, float]]:
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return [(r['step'], r['loss']) for r in records if 'loss' in r]


def _final_params(workdir: Path):
  model, meta = ckpt_lib.load_model(workdir / 'checkpoints')
  return jax.tree.leaves(nnx.state(model)), meta


def test_learning_rate_schedule_and_weight_decay_follow_the_recipe():
  config = tiny_config('unused.pkl')
  # lr 0.1 per 128 samples, scaled linearly (mmaction2 --auto-scale-lr): a global batch of 8 -> 0.00625
  assert train.learning_rate(config, 8) == pytest.approx(0.1 * 8 / 128, rel=1e-12)
  config.optim.auto_scale_lr = False
  assert train.learning_rate(config, 8) == 0.1
  config.optim.auto_scale_lr = True
  optimizer, schedule = train.make_optimizer(config, total_steps=100, global_batch=128)
  # CosineAnnealingLR(eta_min=0) per iteration: 0.1 * (1 + cos(pi t / T)) / 2
  for t, want in [(0, 0.1), (25, 0.1 * (1 + np.cos(np.pi / 4)) / 2), (50, 0.05), (75, 0.1 * (1 - np.cos(np.pi / 4)) / 2),
                  (100, 0.0), (130, 0.0)]:
    assert float(schedule(t)) == pytest.approx(want, rel=1e-6, abs=1e-9)   # float32 on device
  # The NTU recipe's length: float32 keeps its relative accuracy to the last steps, where 1 + cos(πt/T) cancels.
  total = 25056
  long_schedule = train.make_optimizer(config, total_steps=total, global_batch=128)[1]
  for t in [0, 1, 12528, total - 100, total - 10, total - 2, total - 1]:
    want = 0.1 * (1 + np.cos(np.pi * t / total)) / 2
    assert float(long_schedule(t)) == pytest.approx(want, rel=2e-6, abs=0), t
  assert float(long_schedule(total)) == 0.0
  # Two PyTorch SGD(momentum 0.9, nesterov, wd 5e-4) steps, by hand: d = g + wd p; buf = m buf + d; p -= lr (d + m buf)
  p = {'w': jnp.array([1.0, -2.0, 0.5])}
  grads = [jnp.array([0.3, 0.1, -0.2]), jnp.array([-0.1, 0.4, 0.0])]
  opt_state = optimizer.init(p)
  want, buf = np.array(p['w'], np.float64), np.zeros(3)
  for t, g in enumerate(grads):
    upd, opt_state = optimizer.update({'w': g}, opt_state, p)
    p = optax.apply_updates(p, upd)
    lr = 0.1 * (1 + np.cos(np.pi * t / 100)) / 2
    d = np.asarray(g, np.float64) + 5e-4 * want
    buf = 0.9 * buf + d
    want = want - lr * (d + 0.9 * buf)
  np.testing.assert_allclose(p['w'], want, rtol=1e-6)


def test_one_and_eight_devices_give_the_same_run(ann_file, tmp_path):
  assert jax.device_count() >= 8, 'conftest sets 8 fake CPU devices'
  config = tiny_config(ann_file, num_epochs=7, max_steps=20, run_test=False)
  out1 = train.train_and_evaluate(config, tmp_path / 'one', mesh=sharding_lib.make_mesh(1))
  out8 = train.train_and_evaluate(config, tmp_path / 'eight', mesh=sharding_lib.make_mesh(8))
  l1, l8 = _losses(tmp_path / 'one'), _losses(tmp_path / 'eight')
  assert [s for s, _ in l1] == list(range(1, 21)) and [s for s, _ in l8] == list(range(1, 21))
  np.testing.assert_allclose([v for _, v in l8], [v for _, v in l1], rtol=1e-5)
  assert len({round(v, 6) for _, v in l1}) > 5            # the loss moves: the runs really trained
  assert out1['step'] == out8['step'] == 20
  assert out8['val']['top1'] == pytest.approx(out1['val']['top1'])
  # The parameters, one step from a common state: the 1-device run resumed for step 21 on 1 and on 8 devices.
  # Each step agrees to rounding (the per-device sums of the gradients and BN statistics are added in another
  # order), but a 20-step trajectory can amplify that: with write_random_annotations(seed=4) the two runs end
  # 5e-5 apart, and we saw such a difference grow 100-fold within one step (a discrete choice tipping, a ReLU's
  # or a max-pool's). One step from a common state agrees to 0.3% of this tolerance.
  later = tiny_config(ann_file, num_epochs=7, max_steps=21, run_test=False)
  for n in (1, 8):
    shutil.copytree(tmp_path / 'one', tmp_path / f'resumed_on_{n}')
    assert train.train_and_evaluate(later, tmp_path / f'resumed_on_{n}', mesh=sharding_lib.make_mesh(n))['step'] == 21
  p1, _ = _final_params(tmp_path / 'resumed_on_1')
  p8, _ = _final_params(tmp_path / 'resumed_on_8')
  p20, _ = _final_params(tmp_path / 'one')
  assert any(not np.array_equal(a, b) for a, b in zip(p20, p1))   # step 21 changed the parameters
  for a, b in zip(p1, p8):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_resume_after_interruption_matches_uninterrupted_run(ann_file, tmp_path):
  config = tiny_config(ann_file, num_epochs=4, run_test=False, checkpoint_every_steps=2)
  full = tmp_path / 'full'
  train.train_and_evaluate(config, full)
  part = tmp_path / 'part'
  out = train.train_and_evaluate(tiny_config(ann_file, num_epochs=4, run_test=False, checkpoint_every_steps=2,
                                             max_steps=5), part)
  assert out['step'] == 5
  out = train.train_and_evaluate(config, part)      # the same command again resumes at step 5
  assert out['step'] == 12
  assert _losses(part)[-7:] == _losses(full)[-7:]   # steps 6..12, bitwise
  for a, b in zip(_final_params(full)[0], _final_params(part)[0]):
    np.testing.assert_array_equal(a, b)


def test_metrics_records_do_not_depend_on_checkpoints_or_resumption(ann_file, tmp_path, monkeypatch):
  # 3 steps per epoch, 12 steps, a record every 4 steps and at each epoch's end: windows 1-3, 4, 5-6, 7-8, 9,
  # 10-12. Saves inside a window (steps 5 and 10), and a run preempted at step 11 and resumed, log the same
  # records.
  def records(workdir):
    out = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
    for r in out:
      r.pop('samples_per_s', None)
    return out

  common = dict(num_epochs=4, log_every_steps=4, run_test=False)
  train.train_and_evaluate(tiny_config(ann_file, **common), tmp_path / 'plain')
  train.train_and_evaluate(tiny_config(ann_file, **common, checkpoint_every_steps=5), tmp_path / 'saves')
  jit_train_step = train.jit_train_step

  def preempted_in_step_11(*args, **kwargs):
    step_fn, calls = jit_train_step(*args, **kwargs), []

    def step(*a):
      calls.append(1)
      if len(calls) == 11:
        os.kill(os.getpid(), signal.SIGTERM)
      return step_fn(*a)
    return step
  monkeypatch.setattr(train, 'jit_train_step', preempted_in_step_11)
  with pytest.raises(train.Preempted) as stopped:
    train.train_and_evaluate(tiny_config(ann_file, **common), tmp_path / 'resumed')
  assert stopped.value.step == 11
  monkeypatch.setattr(train, 'jit_train_step', jit_train_step)
  train.train_and_evaluate(tiny_config(ann_file, **common), tmp_path / 'resumed')
  train.train_and_evaluate(tiny_config(ann_file, num_epochs=4, log_every_steps=1, run_test=False), tmp_path / 'each')

  plain = records(tmp_path / 'plain')
  assert [r['step'] for r in plain if 'loss' in r] == [3, 4, 6, 8, 9, 12]
  assert records(tmp_path / 'saves') == plain
  assert records(tmp_path / 'resumed') == plain
  # Each record is the mean of its window's steps, and its last learning rate.
  each = {r['step']: r for r in records(tmp_path / 'each') if 'loss' in r}
  last = {r['step']: r for r in plain if 'loss' in r}[12]
  assert last['loss'] == pytest.approx(np.mean([each[s]['loss'] for s in (10, 11, 12)]), rel=1e-12)
  assert last['top1'] == pytest.approx(np.mean([each[s]['top1'] for s in (10, 11, 12)]), rel=1e-12)
  # Accuracies are percentages, training's as validation's: the mean over 1-3 batches of 8 samples, so a multiple
  # of 12.5 / 6.
  for r in plain:
    for key in ('top1', 'val_top1'):
      if key in r:
        assert 0 <= r[key] <= 100, r
    if 'top1' in r:
      assert abs(r['top1'] * 6 / 12.5 - round(r['top1'] * 6 / 12.5)) < 1e-9, r
  assert any(r.get('top1', 0) > 1 for r in plain)
  assert last['lr'] == each[12]['lr'] and last['epoch'] == each[12]['epoch'] == 4


def test_resume_refuses_a_different_config(ann_file, tmp_path):
  train.train_and_evaluate(tiny_config(ann_file, max_steps=2, run_test=False), tmp_path / 'w')
  with pytest.raises(train.ConfigError, match=r'different configuration.*optim.base_lr.*new --workdir'):
    train.train_and_evaluate(tiny_config(ann_file, max_steps=4, run_test=False, **{'optim.base_lr': 0.05}),
                             tmp_path / 'w')
  # The data-iterator state saved with each step is laid out per Grain worker.
  with pytest.raises(train.ConfigError, match=r'different configuration \(data.num_workers: checkpoint 0 vs now 2'):
    train.train_and_evaluate(tiny_config(ann_file, max_steps=4, run_test=False, **{'data.num_workers': 2}),
                             tmp_path / 'w')
  # ... and per process: a step written by 3 processes (their file names) is not resumed by 1, and the error
  # says so, not that the step is damaged.
  data = tmp_path / 'w' / 'checkpoints' / '2' / 'data'
  state = (data / 'process_0-of-1.json').read_text()
  (data / 'process_0-of-1.json').unlink()
  for i in range(3):
    (data / f'process_{i}-of-3.json').write_text(state)
  with pytest.raises(ckpt_lib.CheckpointError, match=r'/2 was written by a run of 3 processes and this run has 1: '
                     r'.*Resume with 3 processes \(--num_processes=3\), or start a new --workdir'):
    train.train_and_evaluate(tiny_config(ann_file, max_steps=4, run_test=False), tmp_path / 'w')


def test_bad_configs_fail_before_compiling(ann_file, tmp_path):
  with pytest.raises(train.ConfigError, match='not divisible by 8 devices; use a multiple of 8'):
    train.train_and_evaluate(tiny_config(ann_file, batch_size=12, bn_group_size=0), tmp_path / 'a')
  with pytest.raises(train.ConfigError, match=r"does not exist.*--config.data.ann_file"):
    train.train_and_evaluate(tiny_config(tmp_path / 'missing.pkl'), tmp_path / 'b')
  with pytest.raises(ValueError, match=r"unknown split 'xview_train'.*xsub_train"):
    train.train_and_evaluate(tiny_config(ann_file, **{'data.train_split': 'xview_train'}), tmp_path / 'c')
  with pytest.raises(train.ConfigError, match=r"feat='x'"):
    train.train_and_evaluate(tiny_config(ann_file, **{'data.feat': 'x'}), tmp_path / 'd')
  with pytest.raises(train.ConfigError, match=r'config.eval_every_epochs=0 must be a positive integer'):
    train.train_and_evaluate(tiny_config(ann_file, eval_every_epochs=0), tmp_path / 'e')
  assert not (tmp_path / 'a' / 'checkpoints').exists()


def _write_custom_skeleton_file(path: Path, num_node: int, dim: str = '2d') -> Path:
  rng = np.random.default_rng(0)
  anns = [{'frame_dir': f's{i}', 'label': i % 2, 'img_shape': (480, 640),
           'keypoint': rng.uniform(0, 400, (1, 20, num_node, 2 if dim == '2d' else 3)).astype(np.float32)}
          for i in range(12)]
  if dim == '2d':
    for a in anns:
      a['keypoint_score'] = rng.uniform(0.5, 1, a['keypoint'].shape[:-1]).astype(np.float32)
  split = {'train': [f's{i}' for i in range(8)], 'val': ['s8', 's9'], 'test': ['s10', 's11', 's10'],
           'empty': []}
  path.write_bytes(pickle.dumps({'split': split, 'annotations': anns + [dict(anns[10], label=0)]}))
  return path


def test_custom_layout_given_in_the_config(tmp_path):
  # A user-defined skeleton (README, "Custom datasets and skeleton layouts") whose edges form a cycle: joint
  # features need no bones, so it trains; bone features are refused before anything is compiled.
  path = _write_custom_skeleton_file(tmp_path / 'ring.pkl', 5)
  config = tiny_config(path, num_epochs=1, run_test=False, batch_size=8, bn_group_size=0,
                       **{'model.num_classes': 2, 'data.train_split': 'train', 'data.val_split': 'val'})
  config.model.layout = dict(num_node=5, inward=[(1, 0), (2, 1), (3, 2), (4, 3), (0, 4)], center=0)
  out = train.train_and_evaluate(config, tmp_path / 'j')
  assert out['step'] == 1 and np.isfinite(_losses(tmp_path / 'j')[0][1])
  model, meta = ckpt_lib.load_model(tmp_path / 'j' / 'checkpoints')
  assert model.config.layout.num_node == 5 and model.config.layout.inward[-1] == (0, 4)
  config.data.feat = 'bm'
  with pytest.raises(train.ConfigError, match=r"feat='bm' needs bones: .*do not form a tree.*bones="):
    train.train_and_evaluate(config, tmp_path / 'bm')
  assert not (tmp_path / 'bm').exists() or not (tmp_path / 'bm' / 'checkpoints').exists()


def test_3d_custom_layout_needs_its_alignment_joints(tmp_path):
  path = _write_custom_skeleton_file(tmp_path / 'a3d.pkl', 5, dim='3d')
  config = tiny_config(path, num_epochs=1, run_test=False, batch_size=8, bn_group_size=0,
                       **{'model.num_classes': 2, 'data.train_split': 'train', 'data.val_split': 'val'})
  config.model.layout = dict(num_node=5, inward=[(1, 0), (2, 1), (3, 2), (4, 3)], center=0)
  with pytest.raises(train.ConfigError, match=r'3D data of .*a3d.pkl: .*xaxis=\(8, 4\) by default.*xaxis=\(\)'):
    train.train_and_evaluate(config, tmp_path / 'w')
  config.model.layout = dict(config.model.layout, zaxis=(0, 1), xaxis=())
  assert train.train_and_evaluate(config, tmp_path / 'w')['step'] == 1


def test_evaluation_splits_are_checked_before_training(tmp_path):
  path = _write_custom_skeleton_file(tmp_path / 'a.pkl', 17)
  kw = {'model.num_classes': 2, 'data.train_split': 'train', 'data.val_split': 'val'}
  cases = [({'data.val_split': 'empty'}, r"config.data.val_split='empty' of .*a.pkl has no samples"),
           ({'data.test_split': 'tset'}, r"unknown split 'tset'"),
           ({'data.test_split': 'test'}, r"config.data.test_split: .*split 'test' has 1 repeated frame_dir\(s\): "
                                         r"'s10' names annotations \[10, 12\]")]
  for i, (override, message) in enumerate(cases):
    with pytest.raises(train.DataError, match=message):
      train.train_and_evaluate(tiny_config(path, **{**kw, **override}), tmp_path / str(i))
    assert not (tmp_path / str(i) / 'checkpoints').exists()


def test_checkpoint_of_a_multi_device_run_loads_on_one_device(tmp_path):
  # Saved from 8 devices with the state replicated, as training saves it; loaded by a process with one device
  # (train on 8 GPUs, test or fine-tune on 1).
  from stgcn_jax import steps
  from stgcn_jax.model import ModelConfig, build_model
  cfg = ModelConfig(num_classes=3, num_stages=2, base_channels=8, inflate_stages=(), down_stages=())
  _, params, stats = steps.split_model(build_model(cfg, seed=1))
  mesh = sharding_lib.make_mesh(8)
  params_8, stats_8 = sharding_lib.replicate((params, stats), mesh)
  assert len(jax.tree.leaves(params_8)[0].sharding.device_set) == 8
  mngr = ckpt_lib.manager(tmp_path / 'ck', async_save=False)
  ckpt_lib.save(mngr, 0, params=params_8, stats=stats_8, meta={'model_config': cfg.to_dict()})
  mngr.wait_until_finished()
  mngr.close()
  np.savez(tmp_path / 'want.npz', *[np.asarray(x) for x in jax.tree.leaves((params, stats))])
  code = ('import sys, jax, numpy as np; from stgcn_jax import checkpoint as c; from flax import nnx\n'
          'model, _ = c.load_model(sys.argv[1]); want = np.load(sys.argv[2])\n'
          'got = jax.tree.leaves((nnx.state(model, nnx.Param), nnx.state(model, ...).filter(nnx.Not(nnx.Param))))\n'
          'assert jax.device_count() == 1 and len(got) == len(want.files)\n'
          'print(all(np.array_equal(g, want[f"arr_{i}"]) for i, g in enumerate(got)))')
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=1', 'JAX_PLATFORMS': 'cpu'}
  out = subprocess.run([sys.executable, '-c', code, str(tmp_path / 'ck'), str(tmp_path / 'want.npz')], env=env,
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert out.returncode == 0 and out.stdout.strip() == 'True', out.stderr[-2000:]


def test_cli_rejects_unknown_config_field(tmp_path):
  env = dict(os.environ, STGCN_JAX_HOST_MALLOC='system')

  def run(*args, module='stgcn_jax.train'):
    out = subprocess.run([sys.executable, '-m', module, *args], capture_output=True, text=True, cwd=tmp_path,
                         timeout=300, env=env)
    assert out.returncode == 2 and 'Traceback' not in out.stderr, out.stderr[-3000:]
    return out.stderr

  base = str(ROOT / 'configs' / 'base.py')
  workdir = f'--workdir={tmp_path / "w"}'
  assert ("error: --config.optim.lr: the config has no field 'lr'; configs are locked"
          in run('--config', base, workdir, '--config.optim.lr=0.1'))
  assert "error: --config.nosuch: the config has no field 'nosuch'" in run('--config', base, workdir,
                                                                          '--config.nosuch=1')
  assert 'error: flag --config.batch_size=abc: invalid literal' in run('--config', base, workdir,
                                                                       '--config.batch_size=abc')
  assert (f'error: --config {tmp_path / "missing.py"}: no such config file'
          in run('--config', str(tmp_path / 'missing.py'), workdir))
  (tmp_path / 'broken.py').write_text('def get_config(:\n')
  assert (f'error: --config={tmp_path / "broken.py"}: the config file or an override failed (SyntaxError: '
          in run(f'--config={tmp_path / "broken.py"}', workdir))
  assert not (tmp_path / 'w').exists()
  assert (f'error: --config {tmp_path / "missing.py"}: no such config file'
          in run('--checkpoint', str(tmp_path), '--config', str(tmp_path / 'missing.py'), module='stgcn_jax.test'))


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(ann_file, tmp_path):
  config = tiny_config(ann_file, num_epochs=4, run_test=False, checkpoint_every_steps=1, **{'optim.base_lr': 1e30})
  with pytest.raises(train.NonFiniteLossError, match=r'became non-finite .* at step (\d+) \(window of steps'):
    train.train_and_evaluate(config, tmp_path)
  mngr = ckpt_lib.manager(tmp_path / 'checkpoints', read_only=True, async_save=False)
  for step in mngr.all_steps():
    model, _ = ckpt_lib.load_model(tmp_path / 'checkpoints', step)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(nnx.state(model)))


def test_init_from_converted_checkpoint_first_loss_equals_golden(fixtures_dir, tmp_path):
  from stgcn_jax import convert
  from stgcn_jax.torch_pickle import load_state_dict as read_pth
  sd = read_pth(fixtures_dir / 'stgcnpp_ntu60_2d_ref.pth')
  sd = sd[0] if isinstance(sd, tuple) else sd
  model = convert.model_from_state_dict(sd, layout='coco')
  ckpt_lib.write_model(tmp_path / 'converted', model, {'layout': 'coco', 'feat': 'j'})
  g = np.load(fixtures_dir / 'stgcnpp_ntu60_2d_ref_train.npz')
  config = tiny_config('unused.pkl', init_from=str(tmp_path / 'converted'))
  config.model.update(model.config.to_dict() | {'inflate_stages': (5, 8), 'down_stages': (5, 8)})
  mesh = sharding_lib.make_mesh(4)
  optimizer, schedule = train.make_optimizer(config, total_steps=100, global_batch=4)
  graphdef, state, shardings = train.create_train_state(config, train.model_config(config), mesh, optimizer)
  step = train.jit_train_step(graphdef, optimizer, schedule, mesh, shardings, groups=1)
  batch = sharding_lib.global_batch({'keypoint': g['input'], 'label': g['label'].astype(np.int32)}, mesh)
  _, metrics = step(state, batch, jax.random.key(0))
  np.testing.assert_allclose(float(metrics['loss']), float(g['loss']), rtol=1e-5)
  # A new head when the class count differs: everything else is the checkpoint's.
  config.model.num_classes = 7
  _, params, stats = train.initial_model_state(config, train.model_config(config))
  assert params['cls_head']['fc']['kernel'][...].shape == (256, 7)
  np.testing.assert_array_equal(params['backbone']['data_bn']['scale'][...], sd['backbone.data_bn.weight'])


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process_with_eight_devices(ann_file, tmp_path):
  config_args = dict(num_epochs=3, run_test=False)
  ref = tmp_path / 'single'
  train.train_and_evaluate(tiny_config(ann_file, **config_args), ref, mesh=sharding_lib.make_mesh(8))
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4', JAX_PLATFORMS='cpu',
             PYTHONPATH=str(ROOT))
  workdir = tmp_path / 'multi'
  procs = [subprocess.Popen([sys.executable, str(ROOT / 'tests' / 'multiprocess_train.py'), f'127.0.0.1:{port}', '2',
                             str(i), str(ann_file), str(workdir), json.dumps(config_args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  np.testing.assert_allclose([v for _, v in _losses(workdir)], [v for _, v in _losses(ref)], rtol=1e-5)
  assert [s for s, _ in _losses(workdir)] == [s for s, _ in _losses(ref)]


def test_partial_multi_process_flags_are_refused(monkeypatch, tmp_path):
  for var in sharding_lib.CLUSTER_VARS + ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'):
    monkeypatch.delenv(var, raising=False)
  called = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kw: called.append(kw))
  cases = [((None, 2, 1), r'^--num_processes=2 --process_id=1 also needs --coordinator_address: '),
           (('127.0.0.1:1234', None, None), r'^--coordinator_address=127.0.0.1:1234 also needs --num_processes and '
                                            r'--process_id: '),
           ((None, None, 3), r'^--process_id=3 also needs --coordinator_address and --num_processes'),
           (('127.0.0.1:1234', 2, 2), r'--process_id=2 must be at least 0 and below --num_processes=2'),
           (('127.0.0.1:1234', 0, 0), r'--num_processes=0 must be at least 1'),
           (('localhost', 2, 0), r"--coordinator_address='localhost' must be HOST:PORT")]
  for args, message in cases:
    with pytest.raises(ValueError, match=message):
      sharding_lib.maybe_initialize_distributed(*args)
  monkeypatch.setenv('JAX_COORDINATOR_ADDRESS', '127.0.0.1:1234')
  with pytest.raises(ValueError, match=r'^JAX_COORDINATOR_ADDRESS=127.0.0.1:1234 also needs --num_processes'):
    sharding_lib.maybe_initialize_distributed()
  assert called == []
  # A single process, or all three (here from flags and variables together), go through.
  monkeypatch.delenv('JAX_COORDINATOR_ADDRESS')
  sharding_lib.maybe_initialize_distributed(None, 1, 0)
  sharding_lib.maybe_initialize_distributed()
  assert called == []
  monkeypatch.setenv('JAX_PROCESS_ID', '1')
  sharding_lib.maybe_initialize_distributed('127.0.0.1:1234', 2)
  assert called == [dict(coordinator_address='127.0.0.1:1234', num_processes=2, process_id=1)]
  # In a cluster environment jax.distributed.initialize() fills in what the flags leave out.
  monkeypatch.delenv('JAX_PROCESS_ID')
  monkeypatch.setenv('SLURM_NTASKS', '2')
  sharding_lib.maybe_initialize_distributed(None, None, None)
  assert called[-1] == dict(coordinator_address=None, num_processes=None, process_id=None)

  # On the command line: status 2 and the message, before anything is written.
  monkeypatch.delenv('SLURM_NTASKS')
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu', STGCN_JAX_HOST_MALLOC='system')
  out = subprocess.run([sys.executable, '-m', 'stgcn_jax.train', '--config', str(ROOT / 'configs' / 'demo.py'),
                        f'--workdir={tmp_path / "w"}', '--num_processes=2', '--process_id=1'],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
  assert out.returncode == 2 and 'Traceback' not in out.stderr, out.stderr[-3000:]
  assert 'error: --num_processes=2 --process_id=1 also needs --coordinator_address' in out.stderr
  assert not (tmp_path / 'w').exists()


def test_train_step_traces_once_and_bfloat16_keeps_float32_state(ann_file):
  mesh = sharding_lib.make_mesh(2)
  losses = {}
  for dtype in ('float32', 'bfloat16'):
    config = tiny_config(ann_file, dtype=dtype)
    mcfg = train.model_config(config)
    optimizer, schedule = train.make_optimizer(config, total_steps=10, global_batch=8)
    graphdef, state, shardings = train.create_train_state(config, mcfg, mesh, optimizer)
    step = train.jit_train_step(graphdef, optimizer, schedule, mesh, shardings, groups=train.bn_groups(config))
    rng = np.random.default_rng(0)
    batch = {'keypoint': rng.normal(size=(8, 1, 2, 16, 17, 3)).astype(np.float32),
             'label': np.arange(8, dtype=np.int32) % 4}
    out = []
    for _ in range(3):
      state, metrics = step(state, sharding_lib.global_batch(batch, mesh), jax.random.key(0))
      out.append(float(metrics['loss']))
    assert step._cache_size() == 1                       # one compilation for every step
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    assert all(x.dtype in (jnp.float32, jnp.int32) for x in jax.tree.leaves(state.stats))
    assert int(state.step) == 3
    losses[dtype] = out
  # bfloat16 compute follows the float32 run closely (loss in float32 from bfloat16 logits)
  np.testing.assert_allclose(losses['bfloat16'], losses['float32'], rtol=2e-2)
