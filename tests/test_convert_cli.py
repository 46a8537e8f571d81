"""convert/from_torch.py: the golden checkpoints convert and reproduce mmaction2; other architectures are
inferred; every failure names its cause and leaves nothing at --out."""

from __future__ import annotations

import importlib.util
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from stgcn_jax import checkpoint as ckpt_lib
from stgcn_jax import convert, graph, predict
from stgcn_jax.labels import NTU60_CLASSES
from stgcn_jax.model import ModelConfig, Recognizer

ROOT = Path(__file__).resolve().parents[1]
KINDS = {'2d': 'coco', '3d': 'nturgb+d'}


def _cli():
  spec = importlib.util.spec_from_file_location('from_torch', ROOT / 'convert' / 'from_torch.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.main


def _assert_nothing_written(out: Path):
  assert not out.exists()
  assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f'.{out.name}.')]   # no staging left


def _params(directory) -> dict[str, np.ndarray]:
  model, _ = ckpt_lib.load_model(directory)
  return convert.export_state_dict(model)


# --------------------------------------------------------------------------------------- golden acceptance
@pytest.mark.parametrize('kind', sorted(KINDS))
def test_convert_then_predict_reproduces_mmaction2(fixtures_dir, tmp_path, kind, capsys):
  out = tmp_path / f'ntu60_{kind}'
  assert _cli()([str(fixtures_dir / f'stgcnpp_ntu60_{kind}_ref.pth'), '--out', str(out)]) == 0
  printed = capsys.readouterr().out
  assert f'wrote {out}' in printed and 'inflate_stages=[5, 8], down_stages=[5, 8]' in printed

  _, meta = ckpt_lib.read_meta(out)
  assert meta['layout'] == KINDS[kind] and meta['layout_source'] == 'checkpoint config'
  assert meta['class_names'] == list(NTU60_CLASSES)
  assert meta['source'].endswith(f'stgcnpp_ntu60_{kind}_ref.pth') and meta['feat'] is None
  assert meta['torch_meta']['mmaction2_version'] == '1.2.0'
  assert ModelConfig.from_dict(meta['model_config']) == ModelConfig(layout=KINDS[kind])

  golden = np.load(fixtures_dir / f'stgcnpp_ntu60_{kind}_ref_eval.npz')
  scores = tmp_path / 'scores.npz'
  assert predict.main(['--checkpoint', str(out), '--input', str(fixtures_dir / f'stgcnpp_ntu60_{kind}_ref_eval.npz'),
                       '--output', str(scores), '--top-k', '3']) == 0
  with np.load(scores) as s:
    np.testing.assert_allclose(s['logits'].reshape(6, -1), golden['logits'], atol=2e-5, rtol=0)
    np.testing.assert_allclose(s['probs'], golden['probs'], atol=1e-6, rtol=0)
    np.testing.assert_array_equal(s['probs'].argmax(-1), golden['pred_label'])
  first = capsys.readouterr().out.splitlines()[0]
  label = int(golden['pred_label'][0])
  assert first.startswith(f'sample 0: {label} {NTU60_CLASSES[label]!r}')


# ---------------------------------------------------------------------------------------- pyskl-style copy
def test_pyskl_style_copy_converts_to_identical_parameters(fixtures_dir, tmp_path):
  torch = pytest.importorskip('torch')
  src = fixtures_dir / 'stgcnpp_ntu60_2d_ref.pth'
  sd = torch.load(src, map_location='cpu', weights_only=True)['state_dict']
  pyskl = {'module.' + k.replace('cls_head.fc.', 'cls_head.fc_cls.'): v for k, v in sd.items()}
  assert 'module.cls_head.fc_cls.weight' in pyskl
  copy = tmp_path / 'j.pth'           # pyskl zoo naming: the modality is the file name
  torch.save(pyskl, copy)              # a bare state dict, no meta
  result = convert.convert_checkpoint(copy, tmp_path / 'pyskl', check=True)
  assert result.meta['feat'] == 'j' and result.meta['feat_source'] == 'file name'
  assert result.meta['layout'] == 'coco' and result.meta['layout_source'] == 'guessed from V'
  assert result.check['param_max_abs_diff'] == 0.0
  if result.check['reference'].startswith('the PyTorch model'):   # torch and mmaction2 are installed
    assert result.check['max_abs_diff'] < 1e-5
  else:
    assert result.check['reference'].startswith('the re-loaded checkpoint only (no PyTorch comparison: ')
    assert result.check['max_abs_diff'] == 0.0
  exported = _params(tmp_path / 'pyskl')
  assert set(exported) == set(sd)
  for key, t in sd.items():
    np.testing.assert_array_equal(exported[key], t.numpy(), err_msg=key)


# ------------------------------------------------------------------------------- non-default architecture
def _random_state_dict(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
  """A state dict of ``cfg``'s shapes with random values, without initialising the model."""
  rng = np.random.default_rng(seed)
  abstract = nnx.eval_shape(lambda: Recognizer(cfg, rngs=nnx.Rngs(0)))
  adjacency = graph.adjacency(cfg.layout, cfg.graph_mode)
  sd = {}
  for path, owner, var in convert._variables(abstract):
    shape = var.get_value().shape
    if path[-1] == 'A':
      value = adjacency + rng.normal(0, 0.02, shape)
    elif path[-1] == 'num_batches_tracked':
      value = np.array(7, np.int64)
    elif path[-1] == 'var':
      value = rng.uniform(0.5, 1.5, shape)
    else:
      value = rng.normal(0, 0.3, shape)
    sd[convert.torch_key(path)] = np.asarray(convert.to_torch(owner, path[-1], value)).astype(
        np.int64 if path[-1] == 'num_batches_tracked' else np.float32)
  return sd


def test_hand_model_architecture_is_inferred_without_flags(tmp_path, capsys):
  torch = pytest.importorskip('torch')
  # pyskl's hand-gesture STGCN++: 6 stages, (x, y) input, 21 MediaPipe hand joints, inflate+down at stage 6.
  cfg = ModelConfig(num_classes=14, layout='handmp', in_channels=2, num_stages=6, inflate_stages=(6,),
                    down_stages=(6,))
  sd = _random_state_dict(cfg)
  assert sd['backbone.gcn.5.residual.conv.weight'].shape == (128, 64, 1, 1)
  pth = tmp_path / 'hand.pth'
  torch.save({'state_dict': {k: torch.from_numpy(v) for k, v in sd.items()}}, pth)
  out = tmp_path / 'hand'
  assert _cli()([str(pth), '--out', str(out), '--check']) == 0
  printed = capsys.readouterr().out
  assert 'max abs logit difference 0' in printed
  model, meta = ckpt_lib.load_model(out)
  assert model.config == cfg
  assert len(model.backbone.gcn) == 6
  assert [b.residual_mode for b in model.backbone.gcn] == ['none'] + ['identity'] * 4 + ['conv']
  assert meta['layout'] == 'handmp' and meta['layout_source'] == 'guessed from V'
  assert meta['class_names'] is None and meta['feat'] is None
  exported = convert.export_state_dict(model)
  for key, value in sd.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)


@pytest.mark.parametrize('dtype', ['float64', 'bfloat16'])
def test_float64_and_bfloat16_checkpoints_pass_the_check(tmp_path, dtype, capsys):
  # Stored as float32: the check compares the parameters with the file's values in that dtype. The file's own
  # class names win over the built-in NTU60 ones.
  torch = pytest.importorskip('torch')
  cfg = ModelConfig(num_classes=60, layout='coco', num_stages=3, base_channels=8, inflate_stages=(3,),
                    down_stages=(3,))
  sd = {k: torch.from_numpy(v.astype(np.float64) + 1e-9).to(getattr(torch, dtype)) if v.dtype == np.float32
        else torch.from_numpy(v) for k, v in _random_state_dict(cfg).items()}   # float64 off the float32 grid
  names = [f'gesture {i}' for i in range(60)]
  pth = tmp_path / f'{dtype}.pth'
  torch.save({'meta': {'dataset_meta': {'classes': names}}, 'state_dict': sd}, pth)
  out = tmp_path / dtype
  assert _cli()([str(pth), '--out', str(out), '--check']) == 0
  assert "class names: 'gesture 0', ... (60)" in capsys.readouterr().out
  model, meta = ckpt_lib.load_model(out)
  assert meta['class_names'] == names
  for key, value in convert.export_state_dict(model).items():
    np.testing.assert_array_equal(value, sd[key].float().numpy() if sd[key].is_floating_point() else sd[key].numpy(),
                                  err_msg=key)


def test_input_width_equal_to_base_width_is_inferred():
  # in_channels == base_channels: no stage-1 block, and stage 2 may already widen (with a residual conv).
  cfg = ModelConfig(num_classes=5, in_channels=8, base_channels=8, num_stages=3, inflate_stages=(2,),
                    down_stages=(2,))
  assert convert.infer_config(_random_state_dict(cfg)) == cfg
  # No block widens: an identity GCN residual leaves no tensor, and only the config text can say there is none.
  plain = ModelConfig(num_classes=5, in_channels=8, base_channels=8, num_stages=3, inflate_stages=(),
                      down_stages=(), gcn_with_res=False, tcn_type='unit_tcn', graph_mode='stgcn_spatial')
  sd = _random_state_dict(plain)
  assert convert.infer_config(sd, meta_cfg='backbone=dict(gcn_with_res=False)') == plain
  assert convert.infer_config(sd).gcn_with_res


def test_down_stage_without_inflation_is_inferred():
  # A stride-2 stage that keeps the width still has a residual conv: only a stride explains it.
  cfg = ModelConfig(num_classes=5, layout='openpose', num_stages=4, base_channels=16, inflate_stages=(4,),
                    down_stages=(3, 4), tcn_type='unit_tcn')
  assert convert.infer_config(_random_state_dict(cfg)) == cfg


@pytest.mark.parametrize('adaptive', ['importance', 'offset'])
def test_importance_and_offset_graphs_are_told_apart_after_training(adaptive):
  # ST-GCN's importance PA multiplies the fixed A: where A is 0 it gets no gradient, and weight decay takes all of
  # those entries to one value (0.22 after 3000 SGD steps with the recipe's decay), which PA's mean scale (then
  # below 0.5, as an offset's) does not tell apart. An offset PA is added to A and trained everywhere.
  cfg = ModelConfig(num_classes=5, layout='coco', graph_mode='stgcn_spatial', num_stages=3, base_channels=8,
                    inflate_stages=(3,), down_stages=(3,), gcn_adaptive=adaptive, gcn_with_res=False,
                    tcn_type='unit_tcn')
  sd = _random_state_dict(cfg)
  rng = np.random.default_rng(1)
  a = graph.adjacency('coco', 'stgcn_spatial').astype(np.float32)
  for key in [k for k in sd if k.endswith('.gcn.PA')]:
    sd[key.replace('.PA', '.A')] = a
    trained = rng.normal(0, 0.3, a.shape)
    sd[key] = (np.where(a == 0, 0.22, 1 + trained) if adaptive == 'importance' else trained).astype(np.float32)
  assert convert.infer_config(sd) == cfg
  other = 'offset' if adaptive == 'importance' else 'importance'
  assert convert.infer_config(sd, meta_cfg=f"backbone=dict(gcn_adaptive='{other}')").gcn_adaptive == other


# ------------------------------------------------------------------------------------------- failures
def _rewrite_pickle(src: Path, dst: Path, old: bytes, new: bytes):
  """Copies a torch zip checkpoint, replacing bytes of its data.pkl (same length keeps the pickle valid)."""
  assert len(old) == len(new)
  with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, 'w') as zout:
    for info in zin.infolist():
      data = zin.read(info)
      if info.filename.endswith('/data.pkl'):
        assert old in data
        data = data.replace(old, new)
      zout.writestr(info, data)


class _Evil:
  def __init__(self, cmd):
    self.cmd = cmd

  def __reduce__(self):
    return (os.system, (self.cmd,))


def test_malicious_pickle_is_refused_and_nothing_written(tmp_path, capsys):
  import pickle
  marker = tmp_path / 'pwned'
  pth = tmp_path / 'evil.pth'
  with zipfile.ZipFile(pth, 'w') as zf:
    zf.writestr('evil/data.pkl', pickle.dumps({'state_dict': _Evil(f'touch {marker}')}, protocol=2))
  out = tmp_path / 'out'
  assert _cli()([str(pth), '--out', str(out)]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1
  assert err.startswith(f'error: {pth}: refused to load the global {os.system.__module__}.system')
  assert not marker.exists()
  _assert_nothing_written(out)


def test_truncated_checkpoint_is_refused_and_nothing_written(fixtures_dir, tmp_path, capsys):
  pth = tmp_path / 'cut.pth'
  pth.write_bytes((fixtures_dir / 'stgcnpp_ntu60_2d_ref.pth').read_bytes()[:3_000_000])
  out = tmp_path / 'out'
  assert _cli()([str(pth), '--out', str(out)]) == 2
  assert f'error: {pth}: corrupted or truncated zip archive' in capsys.readouterr().err
  _assert_nothing_written(out)


def test_wrong_keys_are_listed_and_nothing_written(fixtures_dir, tmp_path):
  pth = tmp_path / 'renamed.pth'
  _rewrite_pickle(fixtures_dir / 'stgcnpp_ntu60_2d_ref.pth', pth, b'backbone.gcn.3.tcn.bn.bias',
                  b'backbone.gcn.3.tcn.bn.bjas')
  out = tmp_path / 'out'
  with pytest.raises(convert.StateDictError) as e:
    convert.convert_checkpoint(pth, out)
  message = str(e.value)
  assert message.startswith(f'{pth} does not fit the model')
  assert 'missing keys (1):\n  backbone.gcn.3.tcn.bn.bias' in message
  assert 'unexpected keys (1):\n  backbone.gcn.3.tcn.bn.bjas' in message
  _assert_nothing_written(out)


def test_unsupported_architecture_names_file(fixtures_dir, tmp_path):
  pth = tmp_path / 'noblocks.pth'
  _rewrite_pickle(fixtures_dir / 'stgcnpp_ntu60_2d_ref.pth', pth, b'backbone.gcn.', b'backbone.xyz.')
  out = tmp_path / 'out'
  with pytest.raises(convert.StateDictError, match=rf'{pth}: unsupported architecture: no ST-GCN blocks'):
    convert.convert_checkpoint(pth, out)
  _assert_nothing_written(out)


def test_existing_out_and_bad_arguments(fixtures_dir, tmp_path, capsys):
  pth = fixtures_dir / 'stgcnpp_ntu60_2d_ref.pth'
  out = tmp_path / 'exists'
  out.mkdir()
  assert _cli()([str(pth), '--out', str(out)]) == 2
  assert 'already exists' in capsys.readouterr().err
  assert list(out.iterdir()) == []
  with pytest.raises(convert.StateDictError, match="layout 'nturgb\\+d' has 25 joints but the checkpoint has 17"):
    convert.convert_checkpoint(pth, tmp_path / 'o2', layout='nturgb+d')
  _assert_nothing_written(tmp_path / 'o2')
  with pytest.raises(FileNotFoundError, match='does not exist'):
    convert.convert_checkpoint(tmp_path / 'absent.pth', tmp_path / 'o3')


def test_feat_and_layout_read_from_config_text(fixtures_dir, tmp_path):
  config = tmp_path / 'stgcnpp_bone.py'
  config.write_text("test_pipeline = [dict(type='GenSkeFeat', dataset='coco', feats=['bm'])]\n"
                    "model = dict(backbone=dict(graph_cfg=dict(layout='coco', mode='spatial')))\n")
  result = convert.convert_checkpoint(fixtures_dir / 'stgcnpp_ntu60_2d_ref.pth', tmp_path / 'o', config_path=config)
  assert (result.meta['feat'], result.meta['feat_source']) == ('bm', 'config file')
  assert (result.meta['layout'], result.meta['layout_source']) == ('coco', 'config file')
  assert json.loads(json.dumps(result.meta)) == result.meta
  assert convert._feat_from_name(Path('stgcnpp_8xb16-bone-motion-u100-80e_ntu60-xsub-keypoint-2d.pth')) == 'bm'
  assert convert._feat_from_name(Path('stgcnpp_8xb16-joint-u100-80e_ntu60-xsub-keypoint-3d.pth')) == 'j'
  assert convert._feat_from_name(Path('model.pth')) is None
  assert convert._feat_from_name(Path('stgcnpp_backbone_ft.pth')) is None        # words, not substrings
  assert convert._feat_from_name(Path('bone_motion.pth')) == 'bm' and convert._feat_from_name(Path('jm.pth')) == 'jm'


def test_load_state_dict_into_an_initialised_model():
  # The in-place path (a concrete model, as fine-tuning and tests use it), not only the abstract build.
  cfg = ModelConfig(num_classes=4, num_stages=2, base_channels=8, inflate_stages=(), down_stages=())
  sd = _random_state_dict(cfg, seed=5)
  model = Recognizer(cfg, rngs=nnx.Rngs(1))
  convert.load_state_dict(model, sd)
  exported = convert.export_state_dict(model)
  for key, value in sd.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)
