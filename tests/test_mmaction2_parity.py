"""Every architecture the references build, side by side with the genuine mmaction2 1.2.0 (when installed).

The golden fixtures cover the two published STGCN++ models. Here mmaction2's own ``RecognizerGCN`` is built for
ST-GCN and STGCN++ variants (adaptive graph modes, conv positions, residuals, data BN types, layouts, stage
plans, input channels, persons, classes), given random weights, random BatchNorm statistics and a perturbed
adjacency, and compared with ours in float64: eval logits, train-mode loss, every gradient and the updated
BatchNorm statistics. Our model is built from the state dict by the converter (architecture inferred from the
tensors, or from the checkpoint's config text where the tensors cannot tell).
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from flax import nnx

from stgcn_jax import convert, steps, torch_reference
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
