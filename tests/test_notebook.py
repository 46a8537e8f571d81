"""The Colab evaluation notebook: stored clean, online defaults, and a full offline execution (as CI runs it).

The offline run replaces the values of the ``parameters`` cell (as papermill would), executes every cell with
nbclient in a kernel of this interpreter, and fails on any cell error. It converts the mmaction2 reference
checkpoint, evaluates it as joint and bone streams on a small embedded demo dataset, fuses them, and writes
the accuracy table and plots; the checks recompute the fused numbers from the score dumps it wrote.
"""

from __future__ import annotations

import ast
import json
import os
import re
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

from stgcn_jax import fusion, metrics, notebook_utils as nbu
from stgcn_jax import results as results_lib

NOTEBOOK = Path(__file__).resolve().parents[1] / 'notebooks' / 'evaluate_stgcnpp.ipynb'
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def _read() -> nbformat.NotebookNode:
  return nbformat.read(NOTEBOOK, as_version=4)


def _parameters_cell(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
  tagged = [c for c in nb.cells if 'parameters' in c.metadata.get('tags', [])]
  assert len(tagged) == 1, f'expected exactly one cell tagged "parameters", found {len(tagged)}'
  assert tagged[0].cell_type == 'code'
  return tagged[0]


def _parameters(source: str) -> dict:
  """The parameters cell's values (it must be plain assignments of literals)."""
  values = {}
  for node in ast.parse(source).body:
    assert isinstance(node, ast.Assign) and len(node.targets) == 1, ast.dump(node)
    values[node.targets[0].id] = ast.literal_eval(node.value)
  return values


def test_notebook_is_stored_valid_and_without_outputs():
  nb = _read()
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == 'code']
  assert code, 'the notebook has no code cells'
  for cell in code:
    assert cell.outputs == [] and cell.execution_count is None, f'stored with outputs: {cell.source[:60]!r}'
  assert nb.cells.index(_parameters_cell(nb)) < nb.cells.index(code[1]), 'parameters must come before the work'


def test_parameters_default_to_the_online_published_evaluation():
  params = _parameters(_parameters_cell(_read()).source)
  assert params['OFFLINE'] is False
  assert params['REPO_URL'] == 'https://github.com/stgcn-jax/stgcn_jax'
  assert params['CHECKPOINT_PATH'] is None and params['DATA_PATH'] is None and params['FEATS'] is None
  assert params['NUM_CLIPS'] is None and params['SPLIT'] == 'xsub_val'
  # The online run installs from REPO_URL and downloads what notebook_utils lists.
  source = '\n'.join(c.source for c in _read().cells if c.cell_type == 'code')
  assert "f'git+{REPO_URL}'" in source and 'nbu.NTU60_2D_ANN_URL' in source
  assert 'nbu.PUBLISHED_NTU60_XSUB_2D[feat].url' in source


def test_published_table_matches_spec():
  assert {f: s.top1 for f, s in nbu.PUBLISHED_NTU60_XSUB_2D.items()} == {'j': 89.29, 'b': 92.30, 'jm': 87.30,
                                                                         'bm': 88.76}
  assert [v for _, v in nbu.PUBLISHED_FUSION_NTU60_XSUB_2D.values()] == [92.61, 92.77]
  for feat, stream in nbu.PUBLISHED_NTU60_XSUB_2D.items():
    word = nbu.STREAM_NAMES[feat]
    assert stream.url.startswith('https://download.openmmlab.com/mmaction/v1.0/skeleton/stgcnpp/')
    assert f'stgcnpp_8xb16-{word}-u100-80e_ntu60-xsub-keypoint-2d_2022' in stream.url and stream.url.endswith('.pth')
  assert list(nbu.available_fusions(['j', 'b'])) == ['two-stream (j:b = 1:1)']
  assert nbu.available_fusions(['j', 'jm', 'b', 'bm'])['four-stream (j:jm:b:bm = 2:1:2:1)'] == {
      'j': 2.0, 'jm': 1.0, 'b': 2.0, 'bm': 1.0}
  assert nbu.available_fusions(['j', 'jm']) == {}


def test_accuracy_table_rows():
  table = nbu.accuracy_table([('joint', 89.29, {'top1': 89.3, 'top5': 98.1234, 'mean_class': 88.0}),
                              ('demo', None, {'top1': 50.0, 'mean_class': 40.0})])
  lines = table.splitlines()
  assert lines[2] == '| joint | 89.29 | 89.30 | +0.01 | 98.12 | 88.00 |'
  assert lines[3] == '| demo |  | 50.00 |  | n/a | 40.00 |'


def test_eval_config_rejects_unknown_modality():
  with pytest.raises(ValueError, match="got 'joint'"):
    nbu.eval_config('x.pkl', 'joint')
  cfg = nbu.eval_config('x.pkl', 'bm', num_clips=3, batch_size=16)
  assert (cfg.data.feat, cfg.data.test_clips, cfg.data.clip_len, cfg.data.test_split, cfg.eval_batch_size) == (
      'bm', 3, 100, 'xsub_val', 16)


def _kernel_env() -> dict[str, str]:
  env = dict(os.environ)
  # conftest fakes 8 CPU devices for the sharding tests; the notebook runs as a user would, on one.
  flags = re.sub(r'--xla_force_host_platform_device_count=\d+', '', env.get('XLA_FLAGS', '')).strip()
  env.pop('XLA_FLAGS', None)
  if flags:
    env['XLA_FLAGS'] = flags
  env['JAX_PLATFORMS'] = 'cpu'
  env['MPLBACKEND'] = 'Agg'
  return env


def _write_kernelspec(root: Path) -> str:
  """A kernelspec that starts ipykernel with this interpreter (the one that has stgcn_jax installed)."""
  name = 'stgcn-jax-test'
  spec = root / 'kernels' / name
  spec.mkdir(parents=True)
  (spec / 'kernel.json').write_text(json.dumps({
      'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
      'display_name': 'stgcn_jax test', 'language': 'python'}))
  return name


def _stream_text(cell) -> str:
  return ''.join(o.get('text', '') for o in cell.outputs if o.output_type == 'stream' and o.name == 'stdout')


def test_notebook_executes_offline(tmp_path, fixtures_dir, monkeypatch):
  nb = _read()
  work = tmp_path / 'work'
  params = _parameters_cell(nb)
  # As papermill does: the new values after the defaults, in the parameters cell itself.
  params.source += '\n\n# injected by tests/test_notebook.py\n' + '\n'.join([
      'OFFLINE = True',
      f'CHECKPOINT_PATH = {str(fixtures_dir / "stgcnpp_ntu60_2d_ref.pth")!r}',
      f'WORK_DIR = {str(work)!r}',
      'DEMO_NUM_VAL = 16',
      'NUM_CLIPS = 2',
      'EVAL_BATCH_SIZE = 8',
  ])
  monkeypatch.setenv('JUPYTER_PATH', str(tmp_path / 'jupyter'))
  kernel = _write_kernelspec(tmp_path / 'jupyter')
  client = NotebookClient(nb, kernel_name=kernel, timeout=600, resources={'metadata': {'path': str(tmp_path)}})
  client.execute(env=_kernel_env())   # raises CellExecutionError (with the traceback) if any cell fails

  text = '\n'.join(_stream_text(c) for c in nb.cells if c.cell_type == 'code')
  # Both streams were evaluated on the 16 demo validation samples, 2 clips each.
  for name in ('joint', 'bone'):
    assert re.search(rf'{name}: 16 samples x 2 clips in [\d.]+ s, top-1 [\d.]+%', text), text

  # The score dumps: clip-averaged probabilities of the 60-class model for the same 16 samples.
  dumps = {f: results_lib.read_results(work / 'results' / f'{f}.pkl') for f in ('j', 'b')}
  for r in dumps.values():
    assert r.scores.shape == (16, 60)
    np.testing.assert_allclose(r.scores.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(r.labels, np.arange(16) % 8)   # the demo cycles through its 8 classes
  assert dumps['j'].frame_dirs == dumps['b'].frame_dirs
  assert not np.allclose(dumps['j'].scores, dumps['b'].scores), 'bone stream gave the joint stream\'s scores'

  # The printed table: one row per stream and the two-stream fusion, with numbers recomputed here.
  table = (work / 'accuracy.md').read_text(encoding='utf-8').strip()
  assert table in text
  expected = {'joint': (89.29, metrics.accuracy_summary(dumps['j'].scores, dumps['j'].labels)),
              'bone': (92.30, metrics.accuracy_summary(dumps['b'].scores, dumps['b'].labels)),
              'two-stream (j:b = 1:1)': (92.61, metrics.accuracy_summary(
                  fusion.fuse([dumps['j'], dumps['b']], [1, 1]), dumps['j'].labels))}
  rows = {line.split('|')[1].strip(): line for line in table.splitlines()[2:]}
  assert set(rows) == set(expected)
  for name, (published, acc) in expected.items():
    assert rows[name] == nbu.accuracy_table([(name, published, acc)]).splitlines()[2]
  assert 'the difference column says nothing about the conversion' in text

  # Plots: written as PNG files and shown inline.
  for suffix in ('confusion', 'per_class'):
    png = work / 'results' / f'report_two-stream_{suffix}.png'
    assert png.read_bytes()[:8] == PNG_SIGNATURE
  shown = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs if 'image/png' in o.get('data', {})]
  assert len(shown) == 2


def test_prepare_checkpoint_converts_once_and_checks_the_modality(tmp_path, fixtures_dir):
  pth = fixtures_dir / 'stgcnpp_ntu60_2d_ref.pth'
  out = nbu.prepare_checkpoint(pth, tmp_path / 'j', feat='j')
  assert out == (tmp_path / 'j').absolute()
  stamp = sorted((p.name, p.stat().st_mtime_ns) for p in out.rglob('*'))
  # A re-run of the cell reuses the conversion instead of failing on the existing directory.
  assert nbu.prepare_checkpoint(pth, tmp_path / 'j', feat='j') == tmp_path / 'j'
  assert sorted((p.name, p.stat().st_mtime_ns) for p in out.rglob('*')) == stamp
  with pytest.raises(ValueError, match=r"holds a conversion of .*stgcnpp_ntu60_2d_ref.pth \(feat 'j'\).*remove it"):
    nbu.prepare_checkpoint(pth, tmp_path / 'j', feat='b')
  # A converted directory is used as it is, for its own modality only.
  assert nbu.prepare_checkpoint(out, tmp_path / 'unused', feat='j') == out
  with pytest.raises(ValueError, match=r"holds a joint model \(feat 'j'\) but stream 'b' was asked for"):
    nbu.prepare_checkpoint(out, tmp_path / 'unused', feat='b')
  assert not (tmp_path / 'unused').exists()
  with pytest.raises(FileNotFoundError, match='missing.pth'):
    nbu.prepare_checkpoint(tmp_path / 'missing.pth', tmp_path / 'x', feat='j')


def _run_code_cells(tmp_path, assignments: str) -> dict:
  """Runs the notebook's code cells in this process (as a kernel would, without one) with the parameters cell
  followed by ``assignments``; returns the namespace."""
  nb = _read()
  namespace: dict = {}
  for cell in (c for c in nb.cells if c.cell_type == 'code'):
    source = cell.source + ('\n' + assignments if 'parameters' in cell.metadata.get('tags', []) else '')
    exec(compile(source, f'<notebook cell {nb.cells.index(cell)}>', 'exec'), namespace)
  return namespace


@pytest.fixture(scope='module')
def two_stream_checkpoints(tmp_path_factory):
  """Two 4-class checkpoints (joint, joint motion) whose class names differ, and an annotation file."""
  from stgcn_jax import checkpoint as ckpt_lib, train
  from tests.train_utils import tiny_config, write_random_annotations
  root = tmp_path_factory.mktemp('two_streams')
  ann_file = write_random_annotations(root / 'tiny_2d.pkl')
  config = tiny_config(ann_file)
  paths, names = {}, {}
  for seed, feat in enumerate(('j', 'jm')):
    names[feat] = [f'{feat}-class{k}' for k in range(4)]
    model = train.build_model(train.model_config(config), seed=seed)
    paths[feat] = str(ckpt_lib.write_model(root / feat, model, {'feat': feat, 'class_names': names[feat]}))
  return ann_file, paths, names


def test_notebook_reports_a_single_stream_with_its_own_class_names(two_stream_checkpoints, tmp_path):
  # No published fusion of j and jm: the last cell reports the first stream, with that stream's names (not
  # those of the stream evaluated last).
  ann_file, paths, names = two_stream_checkpoints
  ns = _run_code_cells(tmp_path, '\n'.join([
      'OFFLINE = True', f'CHECKPOINT_PATH = {paths!r}', f'DATA_PATH = {str(ann_file)!r}', "FEATS = ['j', 'jm']",
      f'WORK_DIR = {str(tmp_path / "work")!r}', 'NUM_CLIPS = 1', 'EVAL_BATCH_SIZE = 8']))
  assert ns['fused'] == {} and ns['name'] == 'joint'
  assert ns['names'] == names['j']
  rows = (tmp_path / 'work' / 'results' / 'report_joint_per_class.csv').read_text().splitlines()
  assert [row.split(',')[1] for row in rows[1:]] == names['j'], rows
  assert results_lib.read_results(tmp_path / 'work' / 'results' / 'jm.pkl').class_names == names['jm']


def test_notebook_refuses_a_checkpoint_dict_without_a_stream_and_zero_clips(two_stream_checkpoints, tmp_path):
  ann_file, paths, _ = two_stream_checkpoints
  common = ['OFFLINE = True', f'DATA_PATH = {str(ann_file)!r}', f'WORK_DIR = {str(tmp_path / "work")!r}',
            "FEATS = ['j', 'jm', 'b']"]
  with pytest.raises(ValueError, match=r"CHECKPOINT_PATH has no checkpoint for stream 'b' \(bone\) of FEATS = "
                                       r"\['j', 'jm', 'b'\]; it has \['j', 'jm'\]. Add 'b': path"):
    _run_code_cells(tmp_path, '\n'.join(common + [f'CHECKPOINT_PATH = {paths!r}']))
  assert not (tmp_path / 'work' / 'converted').exists()           # refused before converting anything
  for zero in ('NUM_CLIPS = 0', 'EVAL_BATCH_SIZE = 0'):
    with pytest.raises(ValueError, match=r'(num_clips|batch_size) must be a positive integer, got 0'):
      _run_code_cells(tmp_path, '\n'.join(common + [f'CHECKPOINT_PATH = {paths!r}', zero]))
