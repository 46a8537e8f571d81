"""STGCN++ parity with the genuine mmaction2 goldens: eval, train-mode loss/BN/gradients, one SGD step.

Tolerances are those of fixtures/mmaction2/README.md §6 (about 10-20× the float32-vs-float64 noise of the
reference itself).
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from stgcn_jax import convert, graph, steps
from stgcn_jax.model import ModelConfig, Recognizer, backbone_macs, build_model, count_params
from stgcn_jax.torch_pickle import load_state_dict as read_pth

KINDS = {'2d': 'coco', '3d': 'nturgb+d'}


def _load(fixtures_dir, kind, dtype='float32'):
  sd = read_pth(fixtures_dir / f'stgcnpp_ntu60_{kind}_ref.pth')
  cfg = convert.infer_config(sd)
  model = Recognizer(cfg, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
  convert.load_state_dict(model, sd)
  return model, sd


@pytest.fixture(scope='module', params=sorted(KINDS))
def kind(request):
  return request.param


@pytest.fixture(scope='module')
def ref_model(fixtures_dir, kind):
  return _load(fixtures_dir, kind)


# ------------------------------------------------------------------------------------------------- graph
@pytest.mark.parametrize('kind_, layout', sorted(KINDS.items()))
def test_graph_matches_mmaction2(fixtures_dir, kind_, layout):
  golden = np.load(fixtures_dir / f'stgcnpp_ntu60_{kind_}_ref_eval.npz')
  a = golden['graph_A/backbone.gcn.0.gcn.A']
  np.testing.assert_array_equal(graph.adjacency(layout), a)


def test_graph_spatial_hand_computed():
  # A 3-joint chain 1 -> 0 <- 2, centre 0. inward: A[parent, child] = 1, columns normalised.
  a = graph.adjacency(dict(num_node=3, inward=[(1, 0), (2, 0)], center=0))
  np.testing.assert_array_equal(a[0], np.eye(3))
  np.testing.assert_array_equal(a[1], [[0, 1, 1], [0, 0, 0], [0, 0, 0]])
  # outward: column 0 holds two ones before normalisation, so each becomes 1/2.
  np.testing.assert_array_equal(a[2], [[0, 0, 0], [0.5, 0, 0], [0.5, 0, 0]])


def test_graph_normalisation_and_stgcn_spatial():
  a = graph.adjacency('coco')
  inward, outward = a[1], a[2]
  np.testing.assert_allclose(inward.sum(0)[inward.sum(0) > 0], 1)
  np.testing.assert_allclose(outward.sum(0)[outward.sum(0) > 0], 1)
  s = graph.adjacency('nturgb+d', 'stgcn_spatial')
  assert s.shape == (3, 25, 25)
  # The three ST-GCN partitions split the normalised 1-hop neighbourhood: they sum to it.
  hop = graph.hop_distance(25, graph.LAYOUTS['nturgb+d'].inward)
  np.testing.assert_allclose(s.sum(0), graph.normalize_digraph((hop <= 1).astype(float)), atol=1e-7)
  assert np.count_nonzero(s[0]) == 25 and np.count_nonzero(s[1]) + np.count_nonzero(s[2]) == 2 * 24


@pytest.mark.parametrize('bad, match', [
    (dict(num_node=3, inward=[(1, 0), (3, 0)], center=0), 'out of range'),
    (dict(num_node=3, inward=[(1, 0), (2, 0)], center=5), 'center 5'),
    (dict(num_node=3, inward=[(1, 0), (0, 1), (2, 0)], center=0), 'duplicate edge'),
    (dict(num_node=4, inward=[(1, 0), (2, 0)], center=0), r'joints \[3\] are not connected'),
    (dict(num_node=3, inward=[(1, 1), (2, 0)], center=0), 'self loop'),
    (dict(num_node=3, inward=[(1, 0), (2, 0)], center=0, zaxis=(0, 3)), r'zaxis=\(0, 3\) must be two different'),
    (dict(num_node=3, inward=[(1, 0), (2, 0)], center=0, xaxis=(1, 1)), r'xaxis=\(1, 1\) must be two different'),
    (dict(num_node=3, inward=[(1, 0), (2, 0)], center=0, spine=(0, 1)), r"unknown \['spine'\]"),
    ('kinect', 'unknown skeleton layout'),
])
def test_graph_invalid_layouts(bad, match):
  with pytest.raises(ValueError, match=match):
    graph.get_layout(bad)


def test_bone_pairs():
  assert graph.LAYOUTS['coco'].bone_pairs[11] == (11, 0)
  assert dict(graph.LAYOUTS['nturgb+d'].bone_pairs)[20] == 20 and dict(graph.LAYOUTS['nturgb+d'].bone_pairs)[21] == 22
  assert graph.LAYOUTS['handmp'].bone_pairs[:3] == ((0, 0), (1, 0), (2, 1))
  custom = graph.get_layout(dict(num_node=3, inward=[(1, 0), (2, 1)], center=0))
  assert custom.bone_pairs == ((0, 0), (1, 0), (2, 1))


def test_3d_alignment_joints():
  assert graph.LAYOUTS['nturgb+d'].align_3d() == ((0, 1), (8, 4))           # mmaction2's defaults
  small = dict(num_node=5, inward=[(1, 0), (2, 1), (3, 2), (4, 3)], center=0)
  with pytest.raises(ValueError, match=r"layout 'custom': .* xaxis=\(8, 4\) by default .* has 5 joints.*"
                     r'xaxis=\(\) to skip that rotation'):
    graph.get_layout(dict(small, zaxis=[0, 2])).align_3d()
  with pytest.raises(ValueError, match=r"layout 'dot': .* zaxis=\(0, 1\) by default .* has 1 joints"):
    graph.get_layout(dict(name='dot', num_node=1, inward=[], center=0, xaxis=())).align_3d()
  layout = graph.get_layout(dict(small, zaxis=[0, 2], xaxis=[]))
  assert layout.align_3d() == ((0, 2), ()) and layout == graph.get_layout(dataclasses.asdict(layout))


# ---------------------------------------------------------------------------------------- structure
def test_param_counts_and_keys(fixtures_dir):
  assert count_params(build_model(ModelConfig(layout='coco'))) == 1_393_016
  assert count_params(build_model(ModelConfig(layout='nturgb+d'))) == 1_403_144
  for kind_ in KINDS:
    lines = (fixtures_dir / f'stgcnpp_ntu60_{kind_}_ref_state_dict_keys.txt').read_text().splitlines()
    ref = {l.split('\t')[0]: json.loads(l.split('\t')[1]) for l in lines}
    ours = convert.export_state_dict(build_model(ModelConfig(layout=KINDS[kind_])))
    assert set(ours) == set(ref)
    assert all(list(ours[k].shape) == ref[k] for k in ref)


def test_infer_config_of_reference(ref_model, kind):
  model, _ = ref_model
  assert model.config == ModelConfig(layout=KINDS[kind])


def _xla_backbone_flops(model: Recognizer, v: int) -> float:
  x = jnp.zeros((1, 2, 100, v, 3))
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda s, x: nnx.merge(graphdef, s).extract_feat(x))
  cost = fn.lower(state, x).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return cost['flops']


@pytest.mark.parametrize('layout, v, published', [('coco', 17, 1.93e9), ('nturgb+d', 25, 2.93e9)])
def test_backbone_macs_match_published(layout, v, published):
  cfg = ModelConfig(layout=layout)
  macs = backbone_macs(cfg)
  assert abs(macs / published - 1) < 0.02, macs
  # The compiled program does those MACs (2 flops each) plus the elementwise work (BN, ReLU, adds, max-pool),
  # which costs a few percent more.
  flops = _xla_backbone_flops(build_model(cfg), v)
  assert 2 * macs <= flops <= 2 * macs * 1.06, (flops, macs)


def test_custom_layout_20_joints_13_classes():
  inward = [(i, (i - 1) // 2) for i in range(1, 20)]          # a binary tree over 20 joints, centre 0
  cfg = ModelConfig(num_classes=13, layout=dict(name='tree20', num_node=20, inward=inward, center=0))
  model = build_model(cfg)
  x = jax.random.normal(jax.random.key(0), (3, 2, 2, 40, 20, 3))
  logits, probs = model.predict_clips(x)
  assert logits.shape == (3, 2, 13) and probs.shape == (3, 13)
  np.testing.assert_allclose(np.asarray(probs).sum(-1), 1, rtol=1e-6)
  # Same as the 17-joint model except data_bn (3·V) and the 10 A tensors (3·V·V) and the 13-class head.
  base = 1_393_016 - 3 * 17 * 2 - 10 * 3 * 17 * 17 - (256 * 60 + 60)
  assert count_params(model) == base + 3 * 20 * 2 + 10 * 3 * 20 * 20 + 256 * 13 + 13
  # The config round-trips through JSON (what checkpoints store).
  assert ModelConfig.from_dict(json.loads(cfg.to_json())) == cfg


def test_wrong_joint_count_is_a_clear_error():
  model = build_model(ModelConfig(layout='coco'))
  with pytest.raises(ValueError, match='expects V=17 joints'):
    model(jnp.zeros((1, 2, 10, 25, 3)))


@pytest.mark.parametrize('overrides', [
    dict(gcn_adaptive='importance', tcn_type='unit_tcn', gcn_with_res=False, graph_mode='stgcn_spatial'),
    dict(gcn_adaptive='offset', gcn_conv_pos='post', data_bn_type='MVC', tcn_dropout=0.1, head_dropout=0.5),
    dict(in_channels=2, num_stages=6, inflate_stages=(6,), down_stages=(6,), layout='handmp', data_bn_type='none'),
])
def test_other_architectures_roundtrip_through_state_dict(overrides):
  cfg = ModelConfig(**overrides)
  model = build_model(cfg, seed=1)
  x = jax.random.normal(jax.random.key(1), (2, 2, 24, cfg.num_node, cfg.in_channels))
  # One train-mode forward moves the BN statistics away from their initial values.
  model(x, train=True, rng=jax.random.key(2))
  sd = convert.export_state_dict(model)
  meta = 'down_stages=' + str(list(cfg.down_stages))
  clone = convert.model_from_state_dict(sd, meta_cfg=meta)
  for field in ('in_channels', 'num_stages', 'inflate_stages', 'down_stages', 'gcn_adaptive', 'gcn_with_res',
                'gcn_conv_pos', 'tcn_type', 'data_bn_type', 'graph_mode', 'layout', 'num_classes'):
    assert getattr(clone.config, field) == getattr(cfg, field), field
  np.testing.assert_array_equal(np.asarray(clone(x)), np.asarray(model(x)))


def test_stgcn_original_configuration_param_count():
  # ST-GCN (Yan et al.): importance-weighted fixed A, 9x1 temporal convs, no gcn residual, NTU-25, 60 classes.
  cfg = ModelConfig(layout='nturgb+d', gcn_adaptive='importance', tcn_type='unit_tcn', gcn_with_res=False,
                    graph_mode='stgcn_spatial')
  n = 0
  for c_in, c_out, stride, residual in cfg.stage_specs():
    n += c_in * 3 * c_out + 3 * c_out + 2 * c_out              # gcn conv + bn
    n += 3 * 25 * 25                                          # PA (A is a buffer)
    n += 9 * c_out * c_out + c_out + 2 * c_out                # 9x1 conv + bn
    if residual and (c_in != c_out or stride != 1):
      n += c_in * c_out + c_out + 2 * c_out
  n += 2 * 75 + 256 * 60 + 60
  assert count_params(build_model(cfg)) == n


# ----------------------------------------------------------------------------------------- eval parity
def test_eval_parity(fixtures_dir, ref_model, kind):
  model, _ = ref_model
  g = np.load(fixtures_dir / f'stgcnpp_ntu60_{kind}_ref_eval.npz')
  x = jnp.asarray(g['input'])
  n, s = x.shape[:2]
  graphdef, state = nnx.split(model)
  feat = jax.jit(lambda st, x: nnx.merge(graphdef, st).extract_feat(x))(state, x.reshape((n * s,) + x.shape[2:]))
  feat = np.asarray(feat).transpose(0, 1, 4, 2, 3)            # (N·S, M, T', V, C') -> torch (N·S, M, C', T', V)
  np.testing.assert_allclose(feat, g['feat'], atol=1e-4, rtol=0)
  # The whole batch at once, and micro-batches of 4 clips (4 does not divide the 6 clips: 3 are used) and 1.
  for micro_batch in (None, 4, 1):
    logits, probs = jax.jit(lambda st, x: nnx.merge(graphdef, st).predict_clips(x, micro_batch=micro_batch))(state, x)
    np.testing.assert_allclose(np.asarray(logits).reshape(n * s, -1), g['logits'], atol=2e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(probs), g['probs'], atol=1e-6, rtol=0)
    np.testing.assert_array_equal(np.asarray(probs).argmax(-1), g['pred_label'])


# ---------------------------------------------------------------------------------------- train parity
def _train_forward(model, x, label):
  graphdef, params, stats = steps.split_model(model)
  grad_fn = jax.jit(jax.value_and_grad(
      lambda p, s: steps.loss_fn(p, s, graphdef, x, label, bn_groups=1, rng=None), has_aux=True))
  (loss, (logits, new_stats)), grads = grad_fn(params, stats)
  by_key = lambda state: {convert.torch_key(tuple(p)): (convert._module_at(model, tuple(p)[:-1]), p[-1], v)
                          for p, v in nnx.to_flat_state(state)}
  grads_t = {k: convert.to_torch(o, leaf, np.asarray(v[...] if hasattr(v, "get_value") else v))
             for k, (o, leaf, v) in by_key(grads).items()}
  stats_t = {k: np.asarray(v[...]) for k, (o, leaf, v) in by_key(new_stats).items()}
  return loss, logits, grads_t, stats_t, (graphdef, params, stats, grads)


def test_train_parity_float32(fixtures_dir, ref_model, kind):
  model, _ = ref_model
  g = np.load(fixtures_dir / f'stgcnpp_ntu60_{kind}_ref_train.npz')
  info = json.loads((fixtures_dir / f'stgcnpp_ntu60_{kind}_ref_info.json').read_text())
  x, label = jnp.asarray(g['input'][:, 0]), jnp.asarray(g['label'])
  loss, logits, grads, stats, (_, params, _, _) = _train_forward(model, x, label)
  np.testing.assert_allclose(float(loss), float(g['loss']), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(logits), g['logits'], atol=5e-5, rtol=0)
  # BN running statistics after one train forward.
  buffers = [k[len('state_after/'):] for k in g.files if k.startswith('state_after/')]
  assert len(buffers) == 3 * 86
  for key in buffers:
    ref = g['state_after/' + key]
    if key.endswith('num_batches_tracked'):
      assert int(stats[key]) == int(ref) == 21, key
    else:
      np.testing.assert_allclose(stats[key], ref, rtol=1e-5, atol=1e-7, err_msg=key)
  # Gradients: per-tensor relative L2 within 5%, structurally-zero ones tiny, global cosine.
  grad_keys = [k[len('grad/'):] for k in g.files if k.startswith('grad/')]
  assert len(grad_keys) == 434 and set(grad_keys) == {k for k in grads}
  zero = set(info['structurally_zero_grad_keys'])
  ours_all, ref_all = [], []
  for key in grad_keys:
    ref, ours = g['grad/' + key], grads[key]
    assert ours.shape == ref.shape, key
    if key in zero:
      assert np.abs(ours).max() <= 1e-4, key
      continue
    rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
    assert rel <= 0.05, (key, rel)
    ours_all.append(ours.ravel())
    ref_all.append(ref.ravel())
  a, b = np.concatenate(ours_all), np.concatenate(ref_all)
  assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) >= 0.9999
  # One SGD step (lr 0.1, momentum 0.9, Nesterov, wd 5e-4 added to the gradient) from the reference gradients
  # (ours are checked above) must give the genuine mmaction2 step.
  opt = steps.make_optimizer(float(g['sgd_lr']), momentum=float(g['sgd_momentum']),
                             nesterov=bool(g['sgd_nesterov']), weight_decay=float(g['sgd_weight_decay']))
  ref_grads = _map_torch(model, params, lambda key, owner, leaf, v: convert.to_ours(owner, leaf, g['grad/' + key]))
  updates, _ = opt.update(ref_grads, opt.init(params), params)
  stepped = optax.apply_updates(params, updates)
  sgd_keys = {k[len('sgd_step/'):] for k in g.files if k.startswith('sgd_step/')}
  assert len(sgd_keys) == 385
  checked = []
  def check(key, owner, leaf, v):
    if key in sgd_keys:
      np.testing.assert_allclose(convert.to_torch(owner, leaf, np.asarray(v)), g['sgd_step/' + key],
                                 rtol=1e-5, atol=2e-7, err_msg=key)
      checked.append(key)
    return v
  _map_torch(model, stepped, check)
  assert len(checked) == 385


def _map_torch(model, tree, fn):
  """Maps ``fn(torch_key, owner module, leaf name, value)`` over a State of the model's parameters."""
  def visit(keypath, value):
    path = tuple(getattr(k, 'key', getattr(k, 'idx', None)) for k in keypath
                 if not (hasattr(k, 'name') and k.name == 'value'))
    path = tuple(p for p in path if p is not None)
    return fn(convert.torch_key(path), convert._module_at(model, path[:-1]), path[-1], value)
  return jax.tree_util.tree_map_with_path(visit, tree)


def test_train_gradients_float64(fixtures_dir, kind):
  """The tight check of the backward pass: float64 against the reference's float64 gradients."""
  g = np.load(fixtures_dir / f'stgcnpp_ntu60_{kind}_ref_train.npz')
  with jax.enable_x64(True):
    model, _ = _load(fixtures_dir, kind, dtype='float64')
    x = jnp.asarray(g['input'][:, 0].astype(np.float64))
    loss, logits, grads, _, _ = _train_forward(model, x, jnp.asarray(g['label']))
    np.testing.assert_allclose(float(loss), float(g['loss_f64']), rtol=1e-10)
    np.testing.assert_allclose(np.asarray(logits), g['logits_f64'], atol=1e-9)
    keys = [k[len('grad_f64/'):] for k in g.files if k.startswith('grad_f64/')]
    assert len(keys) == 385
    max_g = max(np.abs(g['grad_f64/' + k]).max() for k in keys)
    for key in keys:
      np.testing.assert_allclose(grads[key], g['grad_f64/' + key], rtol=1e-5, atol=1e-6 * max_g, err_msg=key)


def test_micro_batches_give_the_whole_batch_result():
  cfg = ModelConfig(layout='coco', num_classes=7)
  model = build_model(cfg, seed=1)
  x = jax.random.normal(jax.random.key(5), (7, 2, 12, 17, 3))
  whole = np.asarray(model(x))
  for micro_batch in (1, 2, 3, 7, 50, 'auto'):    # 2 and 3 do not divide 7: micro-batches of 1 sample
    np.testing.assert_allclose(np.asarray(model(x, micro_batch=micro_batch)), whole, rtol=1e-6, atol=1e-6,
                               err_msg=str(micro_batch))
  with pytest.raises(ValueError, match='eval mode only'):
    model(x, train=True, micro_batch=2)
  for bad in (0, -1, 2.0, True, 'fast'):
    with pytest.raises(ValueError, match='micro_batch must be'):
      model(x, micro_batch=bad)


def test_micro_batches_derive_each_layers_weights_once(monkeypatch):
  """The first micro-batch derives the layers' weights before the loop and the loop's body reuses them; the
  result and its parameter gradient are the whole batch's."""
  from stgcn_jax import layers
  cfg = ModelConfig(layout='coco', num_classes=7, base_channels=12, num_stages=4, inflate_stages=(3,),
                    down_stages=(3,))
  model = build_model(cfg, seed=1)
  x = jax.random.normal(jax.random.key(5), (4, 2, 12, 17, 3))
  derived = []

  def aggregated_conv(self, *args):
    kernel, bias = original(self, *args)
    derived.append((id(self), isinstance(kernel, jax.core.Tracer)))
    return kernel, bias

  original = layers.UnitGCN._aggregated_conv
  monkeypatch.setattr(layers.UnitGCN, '_aggregated_conv', aggregated_conv)
  whole = jax.jit(lambda x: model(x))(x)
  assert len(derived) == 4                               # one per block
  derived.clear()
  micro = model(x, micro_batch=1)    # 4 micro-batches: the first runs eagerly and derives, 3 in the traced loop
  assert len({owner for owner, _ in derived}) == 4 and not any(traced for _, traced in derived), derived
  np.testing.assert_allclose(np.asarray(micro), np.asarray(whole), rtol=1e-6, atol=1e-6)

  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  loss = lambda params, micro_batch: jnp.sum(jnp.sin(nnx.merge(graphdef, params, rest)(x, micro_batch=micro_batch)))
  grad = jax.jit(jax.grad(loss), static_argnums=1)
  for a, b in zip(jax.tree.leaves(grad(params, 1)), jax.tree.leaves(grad(params, None)), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_derived_weights_scope():
  from stgcn_jax import layers
  calls = []
  derive = lambda: calls.append(1) or len(calls)
  owner = object()
  assert layers._derived(owner, 'w', derive) == 1 and layers._derived(owner, 'w', derive) == 2   # no scope
  with layers.derived_weights() as cache:
    assert layers._derived(owner, 'w', derive) == 3 and layers._derived(owner, 'w', derive) == 3
    assert layers._derived(object(), 'w', derive) == 4 and layers._derived(owner, 'v', derive) == 5
    cache.freeze()
    assert layers._derived(owner, 'w', derive) == 3                   # kept before freezing
    assert layers._derived(owner, 'u', derive) == 6 and layers._derived(owner, 'u', derive) == 7   # not kept
  assert layers._derived(owner, 'w', derive) == 8


def test_auto_micro_batch():
  from stgcn_jax.model import MICRO_BATCH_ROWS, auto_micro_batch
  assert auto_micro_batch((16, 2, 100, 17, 3), 'cpu') == MICRO_BATCH_ROWS // 3400 == 2
  assert auto_micro_batch((16, 2, 100, 25, 3), 'cpu') == 1
  assert auto_micro_batch((16, 1, 20, 17, 3), 'cpu') == MICRO_BATCH_ROWS // 340
  assert auto_micro_batch((16, 2, 300, 25, 3), 'cpu') == 1
  for platform in ('gpu', 'tpu'):
    assert auto_micro_batch((16, 2, 100, 17, 3), platform) is None


# -------------------------------------------------------------------------------- BN groups and dtypes
def test_bn_groups_equal_separate_batches():
  cfg = ModelConfig(layout='coco', num_classes=5)
  x = jax.random.normal(jax.random.key(3), (4, 2, 16, 17, 3))
  m_grouped, m_a, m_b = build_model(cfg), build_model(cfg), build_model(cfg)
  y = m_grouped(x, train=True, bn_groups=2)
  ya, yb = m_a(x[:2], train=True), m_b(x[2:], train=True)
  np.testing.assert_allclose(np.asarray(y), np.concatenate([ya, yb]), atol=1e-5)
  # Running statistics move towards the mean of the group statistics.
  mean = lambda m: np.asarray(m.backbone.gcn[3].gcn.bn.mean[...])  # noqa: E731
  np.testing.assert_allclose(mean(m_grouped), (mean(m_a) + mean(m_b)) / 2, atol=1e-6)


def test_unbiased_running_var_and_momentum():
  from stgcn_jax.layers import BatchNorm
  layer = BatchNorm(2)
  x = jnp.asarray(np.arange(12, dtype=np.float32).reshape(6, 2))
  y = layer(x, train=True)
  col = np.arange(12, dtype=np.float64).reshape(6, 2)
  np.testing.assert_allclose(np.asarray(y), (col - col.mean(0)) / np.sqrt(col.var(0) + 1e-5), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(layer.mean[...]), 0.1 * col.mean(0), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(layer.var[...]), 0.9 + 0.1 * col.var(0, ddof=1), rtol=1e-6)
  assert int(layer.num_batches_tracked[...]) == 1


def test_bfloat16_compute_close_to_float32(fixtures_dir):
  sd = read_pth(fixtures_dir / 'stgcnpp_ntu60_2d_ref.pth')
  g = np.load(fixtures_dir / 'stgcnpp_ntu60_2d_ref_eval.npz')
  model = Recognizer(convert.infer_config(sd), dtype='bfloat16', rngs=nnx.Rngs(0))
  convert.load_state_dict(model, sd)
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
  logits, probs = model.predict_clips(jnp.asarray(g['input']))
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(logits).reshape(6, -1), g['logits'], atol=0.1)
  np.testing.assert_array_equal(np.asarray(probs).argmax(-1), g['pred_label'])
