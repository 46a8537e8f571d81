"""Every architecture the references build, and the per-sample pipeline, side by side with the genuine mmaction2
1.2.0 (when installed).

The golden fixtures cover the two published STGCN++ models. Here mmaction2's own ``RecognizerGCN`` is built for
ST-GCN and STGCN++ variants (adaptive graph modes, conv positions, residuals, data BN types, layouts, stage
plans, input channels, persons, classes), given random weights, random BatchNorm statistics and a perturbed
adjacency, and compared with ours in float64: eval logits, train-mode loss, every gradient and the updated
BatchNorm statistics. Our model is built from the state dict by the converter (architecture inferred from the
tensors, or from the checkpoint's config text where the tensors cannot tell).

The pipeline (prenormalise, feature, uniform sampling, format) must give mmaction2's arrays bit for bit on random
samples: any length, 1 to 4 persons, absent persons and frames, every feature, test and seeded train sampling.
"""

from __future__ import annotations

import functools
import types

import jax
import numpy as np
import pytest
from flax import nnx

from stgcn_jax import convert, steps, torch_reference
from stgcn_jax import graph as graph_lib
from stgcn_jax.data import transforms as T
from stgcn_jax.model import ModelConfig

torch = pytest.importorskip('torch')
_MMACTION, _WHY = torch_reference.import_mmaction()
pytestmark = pytest.mark.skipif(_MMACTION is None, reason=f'genuine mmaction2 not usable: {_WHY}')

# name -> ModelConfig fields (everything else default). mmaction2's own defaults differ from STGCN++'s; the
# configs are passed to it in full (torch_reference.mmaction_recognizer).
ARCHITECTURES = {
    'stgcn_coco': dict(graph_mode='stgcn_spatial', gcn_adaptive='importance', gcn_with_res=False,
                       tcn_type='unit_tcn', num_classes=11),
    'stgcn_ntu': dict(layout='nturgb+d', graph_mode='stgcn_spatial', gcn_adaptive='importance', gcn_with_res=False,
                      tcn_type='unit_tcn', num_classes=5),
    'stgcn_openpose_mvc': dict(layout='openpose', graph_mode='stgcn_spatial', gcn_adaptive='importance',
                               gcn_with_res=False, tcn_type='unit_tcn', data_bn_type='MVC', num_classes=9),
    'offset_post_nores': dict(gcn_adaptive='offset', gcn_conv_pos='post', gcn_with_res=False, num_classes=11),
    'fixed_graph_no_data_bn': dict(layout='nturgb+d', gcn_adaptive=None, data_bn_type='none', num_classes=3),
    'importance_mstcn_one_person': dict(gcn_adaptive='importance', num_person=1, data_bn_type='MVC',
                                        num_classes=4),
    # stage 5 widens without downsampling and stage 6 downsamples without widening: only the config text says so
    'custom_stages_2ch': dict(base_channels=32, num_stages=6, inflate_stages=(3, 5), down_stages=(3, 6),
                              in_channels=2, num_classes=7),
}


def _reference(cfg: ModelConfig, seed: int):
  """mmaction2's model for ``cfg`` (float64) with random weights, BN statistics and a perturbed adjacency."""
  torch.manual_seed(seed)
  net = torch_reference.mmaction_recognizer(cfg).double()
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in net.named_parameters():
      if name.endswith(('.A', '.PA')):
        p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
      elif p.ndim > 1:
        p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) / np.sqrt(p[0].numel()))
      else:
        p.copy_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    for module in net.modules():
      if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
        module.running_mean.normal_(0, 0.2, generator=g)
        module.running_var.uniform_(0.5, 2.0, generator=g)
        module.weight.uniform_(0.5, 1.5, generator=g)
  return net.float().double()   # float32 values, as in a checkpoint file


def _as_tensors_show(cfg: ModelConfig) -> ModelConfig:
  """``cfg`` as far as its state dict can show it: a fixed graph (``None``) stores the same tensors as a learned
  one (``'init'``), one person's ``'MVC'`` data BN is a ``'VC'`` one, and the person count shows only there."""
  fields = cfg.to_dict()
  if fields['gcn_adaptive'] is None:
    fields['gcn_adaptive'] = 'init'
  if fields['data_bn_type'] == 'MVC' and fields['num_person'] == 1:
    fields['data_bn_type'] = 'VC'
  if fields['data_bn_type'] != 'MVC':
    fields['num_person'] = ModelConfig.num_person
  return ModelConfig.from_dict(fields)


def _rel(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


@pytest.mark.parametrize('name', sorted(ARCHITECTURES))
def test_matches_genuine_mmaction2_in_float64(name, tmp_path):
  cfg = ModelConfig(**ARCHITECTURES[name])
  net = _reference(cfg, seed=len(name))
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, cfg.num_person, 20, cfg.num_node, cfg.in_channels))
  labels = rng.integers(0, cfg.num_classes, 3)
  sd = {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}   # torch updates its buffers in place

  # Through the converter's file path: a model-zoo style checkpoint whose meta holds the config text.
  backbone_text = ', '.join(f'{k}={v!r}' for k, v in cfg.to_dict().items() if k.endswith('_stages'))
  pth = tmp_path / f'{name}.pth'
  torch.save({'meta': {'cfg': f'model = dict(backbone=dict({backbone_text}))'},
              'state_dict': {k: v.float() if v.is_floating_point() else v for k, v in net.state_dict().items()}}, pth)
  result = convert.convert_checkpoint(pth, tmp_path / 'converted', check=True)
  assert result.config == _as_tensors_show(cfg)
  assert result.check['reference'] == 'the PyTorch model (mmaction2)' and result.check['max_abs_diff'] < 1e-4

  net.eval()
  with torch.no_grad():
    want_eval = net.cls_head(net.backbone(torch.from_numpy(x))).numpy()
  net.train()
  logits = net.cls_head(net.backbone(torch.from_numpy(x)))
  loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels))
  loss.backward()
  want_grads = {k: p.grad.numpy() for k, p in net.named_parameters()}
  want_stats = {k: v.numpy() for k, v in net.state_dict().items() if 'running' in k or 'num_batches' in k}

  with jax.enable_x64(True):
    ours = convert.build_loaded(cfg, sd, dtype='float64', param_dtype='float64')
    graphdef, params, stats = steps.split_model(ours)
    got_eval = jax.jit(steps.make_eval_step(graphdef))(params, stats, x[:, None])[0][:, 0]   # one clip each
    loss_and_grad = jax.value_and_grad(functools.partial(steps.loss_fn, graphdef=graphdef, bn_groups=1, rng=None),
                                       has_aux=True)
    (got_loss, (_, new_stats)), grads = jax.jit(loss_and_grad)(params, stats, keypoint=x, label=labels)
    got_grads = convert.export_state_dict(nnx.merge(graphdef, grads, stats))
    got_stats = convert.export_state_dict(nnx.merge(graphdef, params, new_stats))

  assert _rel(got_eval, want_eval) < 1e-10
  assert abs(float(got_loss) - loss.item()) < 1e-10
  assert set(want_grads) <= set(got_grads)
  scale = max(np.abs(g).max() for g in want_grads.values())
  for key, want in want_grads.items():
    # Conv biases before a training BatchNorm have a gradient of exactly zero in theory: compare absolutely.
    np.testing.assert_allclose(got_grads[key], want, rtol=1e-8, atol=1e-11 * scale, err_msg=key)
  for key, want in want_stats.items():
    np.testing.assert_allclose(got_stats[key], want, rtol=1e-10, atol=1e-12, err_msg=key)


# ------------------------------------------------------------------------------------------------- pipeline
class _NumpyWithPlainDots:
  """numpy as mmaction2's pose transforms see it, except that 3-element dot products and norms are summed left to
  right. BLAS computes those with CPU-dependent kernels (FMA or not), so on some machines mmaction2's own
  PreNormalize3D differs from the golden fixtures in the last bit of a unit vector; the goldens, and ours, are
  the plain sums (``transforms._dot3``)."""

  linalg = types.SimpleNamespace(norm=lambda v: np.sqrt(T._dot3(v, v)))

  def __getattr__(self, name):
    return getattr(np, name)

  @staticmethod
  def dot(x, y):
    if np.shape(x) == (3,) and np.shape(y) == (3,):
      return T._dot3(x, y)
    return np.dot(x, y)


def _random_sample(rng: np.random.Generator, is_2d: bool, index: int) -> dict:
  v = 17 if is_2d else 25
  m = int(rng.integers(1, 5))
  t = int(rng.choice([1, 2, 3, rng.integers(4, 100), rng.integers(100, 200), rng.integers(200, 400)]))
  kp = rng.normal(0.0, rng.choice([1e-3, 1.0, 300.0]), (m, t, v, 2 if is_2d else 3)).astype(np.float32)
  if is_2d:
    kp += rng.uniform(0, 1000)
  if rng.random() < 0.3:
    kp[rng.integers(0, m)] = 0                              # an absent person
  if rng.random() < 0.3 and t > 2:
    kp[:, rng.integers(1, t):] = 0                          # trailing empty frames
  sample = {'keypoint': kp, 'total_frames': t, 'frame_dir': f'random_{index}', 'label': 0,
            'img_shape': (int(rng.integers(200, 2000)), int(rng.integers(200, 2000)))}
  if is_2d:
    sample['keypoint_score'] = rng.random((m, t, v)).astype(np.float32)
  return sample


@pytest.mark.parametrize('is_2d', [True, False], ids=['2d', '3d'])
def test_pipeline_matches_genuine_mmaction2_on_random_samples(is_2d, monkeypatch):
  from mmaction.datasets import transforms as mt
  from mmaction.datasets.transforms import pose_transforms

  monkeypatch.setattr(pose_transforms, 'np', _NumpyWithPlainDots())
  layout = 'coco' if is_2d else 'nturgb+d'
  rng = np.random.default_rng(7 if is_2d else 8)
  for i in range(80):
    sample = _random_sample(rng, is_2d, i)
    feat = str(rng.choice(T.FEATS))
    test_mode = bool(rng.integers(0, 2))
    num_clips = 10 if test_mode else 1
    seed = int(rng.integers(0, 2 ** 31))
    reference = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in sample.items()}
    if not is_2d:   # mmaction2 accepts at most 2 persons in 3D; ours keeps the first two, as FormatGCNInput does
      reference['keypoint'] = reference['keypoint'][:2]
    reference.update(start_index=0, modality='Pose')
    for step in (mt.PreNormalize2D() if is_2d else mt.PreNormalize3D(),
                 mt.GenSkeFeat(dataset=layout, feats=[feat]),
                 mt.UniformSampleFrames(clip_len=100, num_clips=num_clips, test_mode=test_mode),
                 mt.PoseDecode(), mt.FormatGCNInput(num_person=2)):
      if isinstance(step, mt.UniformSampleFrames):
        np.random.seed(seed)                                # train-mode sampling draws from numpy's global RNG
      reference = step(reference)
    ours = T.process_sample(sample, layout=layout, feat=feat, clip_len=100, num_clips=num_clips,
                            test_mode=test_mode, rng=np.random.RandomState(seed))
    want = reference['keypoint']
    assert ours.dtype == np.float32 and ours.shape == want.shape, (i, ours.shape, want.shape)
    assert np.array_equal(ours, want), (f'sample {i}: T={sample["total_frames"]}, M={len(sample["keypoint"])}, '
                                        f'{feat}, test_mode={test_mode}: max |diff| {np.abs(ours - want).max()}')


@pytest.mark.parametrize('v,zaxis,xaxis', [(25, (), (8, 4)), (25, (3, 2), ()), (25, (), ()), (7, (0, 2), (6, 5))])
def test_3d_alignment_joints_of_a_layout_match_mmaction2(v, zaxis, xaxis, monkeypatch):
  """A layout's ``zaxis`` / ``xaxis`` do what PreNormalize3D's arguments do (``()``: align_spine /
  align_shoulder=False). The 25-joint layouts keep NTU's bones, so every feature is compared; the 7-joint one
  has no bones mmaction2 knows, so joint features only."""
  from mmaction.datasets import transforms as mt
  from mmaction.datasets.transforms import pose_transforms

  monkeypatch.setattr(pose_transforms, 'np', _NumpyWithPlainDots())
  if v == 25:
    ntu = graph_lib.LAYOUTS['nturgb+d']
    layout = dict(num_node=25, inward=ntu.inward, center=ntu.center, bones=ntu.bones, zaxis=zaxis, xaxis=xaxis)
  else:
    layout = dict(num_node=7, inward=[(i, i - 1) for i in range(1, 7)], center=0, zaxis=zaxis, xaxis=xaxis)
  feats = T.FEATS if v == 25 else ('j', 'jm')
  prenorm = mt.PreNormalize3D(zaxis=list(zaxis or (0, 1)), xaxis=list(xaxis or (8, 4)), align_spine=bool(zaxis),
                              align_shoulder=bool(xaxis))
  rng = np.random.default_rng(v + len(zaxis) + 2 * len(xaxis))
  for i in range(30):
    sample = _random_sample(rng, False, i)
    sample['keypoint'] = sample['keypoint'][:2, :, :v]
    feat = str(rng.choice(feats))
    reference = dict(sample, keypoint=sample['keypoint'].copy(), start_index=0, modality='Pose')
    for step in (prenorm, mt.GenSkeFeat(dataset='nturgb+d', feats=[feat]),
                 mt.UniformSampleFrames(clip_len=100, num_clips=10, test_mode=True), mt.PoseDecode(),
                 mt.FormatGCNInput(num_person=2)):
      reference = step(reference)
    ours = T.process_sample(sample, layout=layout, feat=feat, clip_len=100, num_clips=10, test_mode=True)
    assert np.array_equal(ours, reference['keypoint']), (i, feat, np.abs(ours - reference['keypoint']).max())
