"""The test protocol end to end: converted golden checkpoint + annotation file -> scores, sharded, CLI, dump."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from configs import base
from stgcn_jax import checkpoint as ckpt_lib
from stgcn_jax import convert
from stgcn_jax import evaluate as eval_lib
from stgcn_jax import hostmem
from stgcn_jax import results as results_lib
from stgcn_jax import sharding as sharding_lib

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def converted(fixtures_dir, tmp_path_factory):
  out = tmp_path_factory.mktemp('ckpt') / 'j2d'
  convert.convert_checkpoint(fixtures_dir / 'stgcnpp_ntu60_2d_ref.pth', out, layout='coco', feat='j')
  return out


@pytest.fixture(scope='module')
def ann_file(fixtures_dir, tmp_path_factory):
  dst = tmp_path_factory.mktemp('data') / 'ntu60_2d_synth.pkl'
  shutil.copy(fixtures_dir / 'ntu60_2d_synth.pkl', dst)
  return dst


def _config(ann_file, **data):
  config = base.get_config()
  config.data.update(dict(ann_file=str(ann_file), test_split='xsub_val', num_workers=0,
                          cache_dir=str(Path(ann_file).parent / 'cache'), **data))
  config.eval_batch_size = 8
  return config


def test_scores_equal_reference_model_on_golden_pipeline_outputs(fixtures_dir, converted, ann_file):
  # The pipeline goldens are mmaction2's test inputs; the model is the converted mmaction2 checkpoint.
  result = eval_lib.evaluate_checkpoint(converted, _config(ann_file), mesh=sharding_lib.make_mesh(8))
  golden = np.load(fixtures_dir / 'pipeline_2d_synth.npz')
  model, _ = ckpt_lib.load_model(converted)
  names = [str(f) for f in result.dataset.frame_dirs]
  assert len(names) == 4 and result.scores.shape == (4, 60)       # 4 val samples in 1 padded batch of 8
  x = np.stack([golden[f'test/j/{name}'] for name in names])          # (4, 10, 2, 100, 17, 3)
  _, want = model.predict_clips(x)
  np.testing.assert_allclose(result.scores, np.asarray(want), atol=1e-6)
  np.testing.assert_allclose(result.scores.sum(1), 1, rtol=1e-5)
  pred = result.scores.argmax(1)
  assert result.metrics['top1'] == pytest.approx(100 * np.mean(pred == result.dataset.labels))


@pytest.mark.parametrize('num_devices,batch', [(8, 8), (8, 16), (2, 2)])
def test_every_sample_once_with_partial_batches(converted, ann_file, num_devices, batch):
  config = _config(ann_file, clip_len=20, test_clips=2)
  config.data.test_split = 'xsub_train'
  model, _ = ckpt_lib.load_model(converted)
  from stgcn_jax import steps
  graphdef, params, stats = steps.split_model(model)
  from stgcn_jax.data.annotations import load_annotations
  ds = load_annotations(ann_file, None, layout='coco', use_cache=False)          # all 7 samples
  mesh = sharding_lib.make_mesh(num_devices)
  evaluator = eval_lib.Evaluator(graphdef, mesh)
  scores = evaluator.predict(*sharding_lib.replicate((params, stats), mesh), ds, feat='j', layout='coco',
                             clip_len=20, num_clips=2, batch_size=batch)
  one = eval_lib.Evaluator(graphdef, sharding_lib.make_mesh(1)).predict(
      params, stats, ds, feat='j', layout='coco', clip_len=20, num_clips=2, batch_size=7)
  np.testing.assert_allclose(scores, one, atol=1e-6)
  assert np.all(scores.sum(1) > 0.99)          # every row filled, none left at zero


def test_two_processes_on_an_interleaved_mesh_score_each_sample_as_one_device(tmp_path):
  # 2 processes x 2 devices, the mesh ordered (p0 d0, p1 d0, p0 d1, p1 d1): each global batch's rows are not
  # process-major, and the sample indices must be gathered in the scores' order.
  from tests import multiprocess_eval
  from tests.train_utils import write_random_annotations
  ann_file = write_random_annotations(tmp_path / 'tiny_2d.pkl')          # 11 validation samples
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2', JAX_PLATFORMS='cpu',
             PYTHONPATH=str(ROOT))
  out = tmp_path / 'scores.npz'
  procs = [subprocess.Popen([sys.executable, str(ROOT / 'tests' / 'multiprocess_eval.py'), f'127.0.0.1:{port}', '2',
                             str(i), str(ann_file), str(out)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = [p.communicate(timeout=300)[0] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  scores = np.load(out)['scores']
  graphdef, params, stats, dataset, mcfg = multiprocess_eval.model_state(ann_file)
  want = eval_lib.Evaluator(graphdef, sharding_lib.make_mesh(1)).predict(
      params, stats, dataset, feat='j', layout=mcfg.layout, clip_len=16, num_clips=1, batch_size=11,
      num_person=mcfg.num_person)
  assert scores.shape == want.shape == (11, 4)
  gaps = np.abs(want[:, None] - want[None]).max(-1) + np.eye(11)
  assert gaps.min() > 1e-4             # every two samples' scores differ by far more than the tolerance below
  np.testing.assert_allclose(scores, want, atol=1e-6)


def test_eval_batch_is_rounded_up_to_the_device_count(tmp_path):
  # A checkpoint's eval_batch_size need not divide the devices it is tested on: the batch is rounded up (pads
  # are masked), and the scores are those of one device.
  from tests import multiprocess_eval
  from tests.train_utils import write_random_annotations
  assert [sharding_lib.eval_batch_size(b, sharding_lib.make_mesh(4)) for b in (1, 4, 6, 8, 9)] == [4, 4, 8, 8, 12]
  for bad in (0, -3, 2.5, True):
    with pytest.raises(ValueError, match='must be a positive integer'):
      sharding_lib.eval_batch_size(bad, sharding_lib.make_mesh(4))
  graphdef, params, stats, dataset, mcfg = multiprocess_eval.model_state(
      write_random_annotations(tmp_path / 'tiny_2d.pkl'))
  kwargs = dict(feat='j', layout=mcfg.layout, clip_len=16, num_clips=2, num_person=mcfg.num_person)
  want = eval_lib.Evaluator(graphdef, sharding_lib.make_mesh(1)).predict(params, stats, dataset, batch_size=11,
                                                                          **kwargs)
  for num_devices, batch in ((4, 6), (8, 3)):
    mesh = sharding_lib.make_mesh(num_devices)
    scores = eval_lib.Evaluator(graphdef, mesh).predict(*sharding_lib.replicate((params, stats), mesh), dataset,
                                                        batch_size=batch, **kwargs)
    np.testing.assert_allclose(scores, want, atol=1e-6)


def test_zero_clips_is_refused_not_defaulted(converted, ann_file):
  for bad in (0, -1):
    with pytest.raises(ValueError, match=rf'num_clips must be a positive integer, got {bad} \(--num_clips'):
      eval_lib.evaluate_checkpoint(converted, _config(ann_file), num_clips=bad)
  config = _config(ann_file, test_clips=0)
  with pytest.raises(ValueError, match=r'num_clips must be a positive integer, got 0 .*config.data.test_clips'):
    eval_lib.evaluate_checkpoint(converted, config)


def test_checkpoint_that_is_a_pth_file_or_a_workdir_says_what_to_give(fixtures_dir, converted, tmp_path):
  pth = fixtures_dir / 'stgcnpp_ntu60_2d_ref.pth'
  with pytest.raises(ckpt_lib.CheckpointError, match=rf'{pth} is a file, not a checkpoint directory; a PyTorch '
                     rf'checkpoint \(.pth\) is converted first: python convert/from_torch.py {pth} --out DIR'):
    ckpt_lib.read_meta(pth)
  workdir = tmp_path / 'run'
  shutil.copytree(converted, workdir / 'checkpoints')
  with pytest.raises(ckpt_lib.CheckpointError, match=rf'{workdir} is a training workdir; its checkpoints are in '
                     rf'{workdir / "checkpoints"}: give that folder'):
    ckpt_lib.load_model(workdir)
  assert ckpt_lib.read_meta(workdir / 'checkpoints')[0] == 0
  out = subprocess.run([sys.executable, '-m', 'stgcn_jax.test', '--checkpoint', str(pth),
                        '--config', str(ROOT / 'configs' / 'ntu60_2d_joint.py')], capture_output=True, text=True,
                       timeout=600, cwd=tmp_path, env=dict(os.environ, STGCN_JAX_HOST_MALLOC='system'))
  assert out.returncode == 2 and 'Traceback' not in out.stderr
  assert f'error: {pth} is a file, not a checkpoint directory' in out.stderr


def test_modality_mismatch_is_refused(converted, ann_file):
  with pytest.raises(ValueError, match=r"modality 'j' but config.data.feat is 'b'.*--config.data.feat=j"):
    eval_lib.evaluate_checkpoint(converted, _config(ann_file, feat='b'))


def test_cli_prints_accuracy_and_writes_dump_and_report(converted, ann_file, tmp_path):
  dump = tmp_path / 'out' / 'j.pkl'
  dump.parent.mkdir()
  cmd = [sys.executable, '-m', 'stgcn_jax.test', '--checkpoint', str(converted),
         '--config', str(ROOT / 'configs' / 'ntu60_2d_joint.py'), f'--config.data.ann_file={ann_file}',
         '--config.data.test_split=xsub_val', '--config.eval_batch_size=8', '--config.data.num_workers=0',
         f'--config.data.cache_dir={tmp_path}', '--num_clips=2', f'--compilation_cache_dir={tmp_path / "xla"}',
         f'--dump={dump}']
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
  assert out.returncode == 0, out.stderr[-3000:]
  # The compiled test step was kept for the next run.
  assert [p.name for p in (tmp_path / 'xla').iterdir() if p.name.startswith('jit_') and p.name.endswith('-cache')]
  assert 'top1:' in out.stdout and 'mean_class:' in out.stdout
  if hostmem.choice() == 'auto' and hostmem.computes_on_cpu() and hostmem.find_tcmalloc():
    assert 'host allocator: tcmalloc (TCMALLOC_RELEASE_RATE=' in out.stderr     # the command relaunched on it
  res = results_lib.read_results(dump)
  assert res.scores.shape == (4, 60) and list(res.labels) == [int(x) for x in res.labels]
  assert res.frame_dirs[0] == 's2d_T001_M1'
  top1 = float(next(line for line in out.stdout.splitlines() if line.startswith('top1:')).split()[1])
  assert top1 == pytest.approx(100 * np.mean(res.scores.argmax(1) == res.labels), abs=0.01)
  assert sorted(p.name for p in dump.parent.iterdir() if p.suffix == '.png') == ['j_confusion.png', 'j_per_class.png']

  bad = subprocess.run(cmd[:-1] + ['--config.data.test_split=nope'], capture_output=True, text=True, timeout=600,
                       cwd=tmp_path)
  assert bad.returncode == 2 and "unknown split 'nope'" in bad.stderr and 'Traceback' not in bad.stderr

  not_a_folder = subprocess.run(cmd[:-2] + [f'--compilation_cache_dir={dump}'], capture_output=True, text=True,
                                timeout=600, cwd=tmp_path)
  assert not_a_folder.returncode == 2 and 'Traceback' not in not_a_folder.stderr
  assert f'--compilation_cache_dir {dump}: not a writable directory' in not_a_folder.stderr

  # A --dump that cannot be written is refused before the evaluation.
  folder = subprocess.run(cmd[:-1] + [f'--dump={tmp_path}'], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
  assert folder.returncode == 2 and 'Traceback' not in folder.stderr
  assert f'--dump {tmp_path} is a directory; name the results file' in folder.stderr and 'top1' not in folder.stdout

  # Zero clips is refused as negative counts are, not replaced by the config's test_clips.
  zero = subprocess.run(cmd[:-1] + ['--num_clips=0'], capture_output=True, text=True, timeout=600, cwd=tmp_path)
  assert zero.returncode == 2 and 'Traceback' not in zero.stderr and 'top1' not in zero.stdout
  assert 'error: --num_clips=0: clips per sample must be a positive integer' in zero.stderr
