"""The torch-free .pth reader: exact against torch.load(weights_only=True), and it never runs code from a file."""

from __future__ import annotations

import os
import pickle
import struct
import zipfile
from collections import OrderedDict

import numpy as np
import pytest

from stgcn_jax import torch_pickle as tp


class _Evil:
  """Pickles to ``os.system(cmd)``: what a malicious checkpoint does."""

  def __init__(self, cmd: str):
    self.cmd = cmd

  def __reduce__(self):
    return (os.system, (self.cmd,))


def _torch_zip(path, data_pkl: bytes, storages: dict[str, bytes] | None = None, prefix='archive'):
  with zipfile.ZipFile(path, 'w') as zf:
    zf.writestr(f'{prefix}/data.pkl', data_pkl)
    zf.writestr(f'{prefix}/byteorder', 'little')
    for key, raw in (storages or {}).items():
      zf.writestr(f'{prefix}/data/{key}', raw)
    zf.writestr(f'{prefix}/version', '3\n')


def _legacy(path, obj_pickle: bytes, magic_pickle: bytes | None = None):
  with open(path, 'wb') as f:
    f.write(magic_pickle if magic_pickle is not None else pickle.dumps(tp.LEGACY_MAGIC, protocol=2))
    f.write(pickle.dumps(tp.LEGACY_PROTOCOL, protocol=2))
    f.write(pickle.dumps({'protocol_version': 1001, 'little_endian': True}, protocol=2))
    f.write(obj_pickle)
    f.write(pickle.dumps([], protocol=2))


# ------------------------------------------------------------------------------------------- fixtures exact
@pytest.mark.parametrize('kind', ['2d', '3d'])
def test_fixture_checkpoints_equal_torch_load(fixtures_dir, kind):
  torch = pytest.importorskip('torch')
  path = fixtures_dir / f'stgcnpp_ntu60_{kind}_ref.pth'
  ref = torch.load(path, map_location='cpu', weights_only=True)
  sd, meta = tp.load_checkpoint(path)
  assert list(sd) == list(ref['state_dict'])   # order kept
  for key, t in ref['state_dict'].items():
    assert sd[key].dtype == t.numpy().dtype, key
    np.testing.assert_array_equal(sd[key], t.numpy(), err_msg=key)
  assert meta == ref['meta']
  assert meta['dataset_meta'] == {'num_classes': 60}
  assert tp.load_state_dict(path).keys() == sd.keys()


def test_fixture_reads_without_torch_values(fixtures_dir):
  # Independent of torch: the documented structure (README §3) and a value pinned by the goldens.
  sd = tp.load_state_dict(fixtures_dir / 'stgcnpp_ntu60_2d_ref.pth')
  assert len(sd) == 692
  assert sd['backbone.data_bn.weight'].shape == (51,)
  assert sd['backbone.gcn.4.residual.conv.weight'].shape == (128, 64, 1, 1)
  assert sd['backbone.gcn.0.gcn.bn.num_batches_tracked'].dtype == np.int64
  assert int(sd['backbone.gcn.0.gcn.bn.num_batches_tracked']) == 20
  golden = np.load(fixtures_dir / 'stgcnpp_ntu60_2d_ref_eval.npz')
  a = sd['backbone.gcn.0.gcn.A']
  assert 0 < np.abs(a - golden['graph_A/backbone.gcn.0.gcn.A']).max() < 0.2   # perturbed by 0.02·N(0,1)


# ------------------------------------------------------------------------------ dtypes and views saved by torch
@pytest.mark.parametrize('legacy', [False, True], ids=['zip', 'legacy'])
def test_dtypes_and_non_contiguous_views_match_torch(tmp_path, legacy):
  torch = pytest.importorskip('torch')
  g = torch.Generator().manual_seed(0)
  base = torch.arange(24.0).reshape(4, 6)
  obj = OrderedDict(
      f16=torch.randn(3, 4, generator=g).half(), f64=torch.randn(2, generator=g).double(),
      i64=torch.arange(-3, 5), i32=torch.arange(4, dtype=torch.int32), i8=torch.tensor([-2, 7], dtype=torch.int8),
      u8=torch.arange(4, dtype=torch.uint8), b=torch.tensor([True, False, True]),
      bf16=torch.randn(5, generator=g).bfloat16(), c64=torch.randn(2, dtype=torch.complex64, generator=g),
      transposed=base.t(), sliced=base[1:, ::2], expanded=torch.ones(3, 1).expand(3, 4), offset=base.view(-1)[7:11],
      param=torch.nn.Parameter(torch.full((2,), 0.5)), empty=torch.zeros(0, 3), scalar=torch.tensor(3.5))
  nested = {'state_dict': obj, 'meta': {'epoch': 3, 'names': ['a', 'b'], 'pair': (1, 2.5)}}
  path = tmp_path / 'x.pth'
  torch.save(nested, path, _use_new_zipfile_serialization=not legacy)
  out = tp.load(path)
  assert out['meta'] == {'epoch': 3, 'names': ['a', 'b'], 'pair': (1, 2.5)}
  for key, t in obj.items():
    got = out['state_dict'][key]
    if t.dtype == torch.bfloat16:   # kept exactly as ml_dtypes.bfloat16; widening to float32 is lossless
      assert got.dtype.name == 'bfloat16'
      got, ref = got.astype(np.float32), t.float().numpy()
    else:
      ref = t.detach().numpy()
    assert got.dtype == ref.dtype and got.shape == ref.shape, key
    np.testing.assert_array_equal(got, ref, err_msg=key)
    assert got.flags.c_contiguous
  np.testing.assert_array_equal(out['state_dict']['transposed'], np.arange(24.0).reshape(4, 6).T)


def _u(text: str) -> bytes:
  raw = text.encode()
  return b'X' + struct.pack('<I', len(raw)) + raw


def _ints(values) -> bytes:
  return b'(' + b''.join(b'J' + struct.pack('<i', v) for v in values) + b't'


def _tensor_pickle(entries: dict[str, tuple[str, int, int, tuple, tuple]], storage='FloatStorage') -> bytes:
  """Protocol-2 bytes of ``{name: _rebuild_tensor_v2(storage(key, numel), offset, size, stride, ...)}``, written
  opcode by opcode as torch writes them, so no torch is needed."""
  out = [b'\x80\x02}(']
  for name, (key, numel, offset, size, stride) in entries.items():
    out += [_u(name), b'ctorch._utils\n_rebuild_tensor_v2\n(',
            b'(' + _u('storage') + f'ctorch\n{storage}\n'.encode() + _u(key) + _u('cpu')
            + b'J' + struct.pack('<i', numel) + b'tQ',
            b'J' + struct.pack('<i', offset), _ints(size), _ints(stride),
            b'\x89ccollections\nOrderedDict\n)Rt', b'R']
  out.append(b'u.')
  return b''.join(out)


def test_big_endian_zip_and_shared_storage(tmp_path):
  # Two tensors viewing one big-endian float32 storage, the second one strided.
  pkl = _tensor_pickle({'a': ('0', 6, 0, (2, 3), (3, 1)), 'b': ('0', 6, 1, (2,), (3,))})
  path = tmp_path / 'be.pth'
  with zipfile.ZipFile(path, 'w') as zf:
    zf.writestr('m/data.pkl', pkl)
    zf.writestr('m/byteorder', 'big')
    zf.writestr('m/data/0', np.arange(6, dtype='>f4').tobytes())
  out = tp.load(path)
  np.testing.assert_array_equal(out['a'], np.arange(6, dtype=np.float32).reshape(2, 3))
  np.testing.assert_array_equal(out['b'], [1.0, 4.0])
  assert out['a'].dtype == np.float32 and out['a'].dtype.isnative


def test_view_outside_storage_is_refused(tmp_path):
  # A crafted stride that would read past the buffer must not reach as_strided.
  path = tmp_path / 'oob.pth'
  _torch_zip(path, _tensor_pickle({'w': ('0', 4, 0, (2, 3), (1000, 1))}), {'0': np.zeros(4, '<f4').tobytes()})
  with pytest.raises(tp.CheckpointFormatError, match='reaches element 1002 of a storage of 4'):
    tp.load(path)


def test_short_storage_is_refused(tmp_path):
  path = tmp_path / 'short.pth'
  _torch_zip(path, _tensor_pickle({'w': ('0', 8, 0, (8,), (1,))}), {'0': np.zeros(3, '<f4').tobytes()})
  with pytest.raises(tp.CheckpointFormatError, match=r'short.pth: storage archive/data/0 holds 12 bytes'):
    tp.load(path)


# ----------------------------------------------------------------------------------------------- safety
_EVIL_PAYLOADS = {
    'top_level': lambda cmd: pickle.dumps(_Evil(cmd), protocol=2),
    'inside_state_dict': lambda cmd: pickle.dumps({'state_dict': OrderedDict(w=_Evil(cmd))}, protocol=4),
    'eval': lambda cmd: pickle.dumps(_EvalEvil(cmd), protocol=2),
}


class _EvalEvil:
  def __init__(self, cmd):
    self.cmd = cmd

  def __reduce__(self):
    return (eval, (f'__import__("os").system({self.cmd!r})',))


@pytest.mark.parametrize('payload', sorted(_EVIL_PAYLOADS))
@pytest.mark.parametrize('container', ['zip', 'legacy_magic', 'legacy_object'])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, payload, container):
  marker = tmp_path / 'pwned'
  evil = _EVIL_PAYLOADS[payload](f'touch {marker}')
  path = tmp_path / 'evil.pth'
  if container == 'zip':
    _torch_zip(path, evil)
  elif container == 'legacy_magic':
    _legacy(path, pickle.dumps({}, protocol=2), magic_pickle=evil)
  else:
    _legacy(path, evil)
  refused = 'builtins.eval' if payload == 'eval' else f'{os.system.__module__}.system'
  with pytest.raises(tp.UnsafeCheckpointError, match=rf'evil.pth: refused to load the global {refused}') as e:
    tp.load_checkpoint(path)
  assert isinstance(e.value, ValueError)
  assert 'nothing from it was executed' in str(e.value)
  assert not marker.exists()


def test_foreign_persistent_id_is_refused(tmp_path):
  path = tmp_path / 'pid.pth'
  _torch_zip(path, b'\x80\x02' + _u('module') + b'Q.')
  with pytest.raises(tp.UnsafeCheckpointError, match='refused the persistent id'):
    tp.load(path)


def test_mmengine_history_buffer_becomes_inert(tmp_path):
  # mmengine's message_hub pickles HistoryBuffer objects beside the weights: read as placeholders, never imported.
  pkl = (b'\x80\x02}(' + _u('message_hub') + b'cmmengine.logging.history_buffer\nHistoryBuffer\n)\x81}b'
         + _u('state_dict') + _tensor_pickle({'w': ('0', 2, 0, (2,), (1,))})[2:-1] + b'u.')
  path = tmp_path / 'mmengine.pth'
  _torch_zip(path, pkl, {'0': np.array([1.5, -2.0], '<f4').tobytes()})
  obj = tp.load(path)
  assert isinstance(obj['message_hub'], tp.IgnoredObject)
  sd, meta = tp.load_checkpoint(path)
  np.testing.assert_array_equal(sd['w'], [1.5, -2.0])
  assert meta is None


@pytest.mark.parametrize('protocol', [2, 4])
def test_genuine_mmengine_training_checkpoint_loads(tmp_path, protocol):
  # What mmengine's CheckpointHook writes: meta, weights, the message hub (HistoryBuffers, whose statistics
  # methods pickle as getattr(HistoryBuffer, 'mean') or by qualname), optimizer and scheduler states.
  torch = pytest.importorskip('torch')
  logging = pytest.importorskip('mmengine.logging')
  hub = logging.MessageHub.get_instance(f'probe_{protocol}')
  hub.update_scalar('train/loss', 1.25)
  hub.update_info('iter', 3)
  w = torch.nn.Parameter(torch.tensor([1.5, -2.0]))
  opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
  w.sum().backward()
  opt.step()
  path = tmp_path / 'epoch_1.pth'
  torch.save({'meta': {'epoch': 1, 'seed': 0}, 'state_dict': {'w': w.detach()}, 'message_hub': hub.state_dict(),
              'optimizer': opt.state_dict(), 'param_schedulers': [{'last_epoch': 1, 'base_lrs': [0.1]}]},
             path, pickle_protocol=protocol)
  sd, meta = tp.load_checkpoint(path)
  np.testing.assert_array_equal(sd['w'], w.detach().numpy())
  assert meta == {'epoch': 1, 'seed': 0}
  assert isinstance(tp.load(path)['message_hub']['log_scalars']['train/loss'], tp.IgnoredObject)


class _GetattrEvil:
  def __reduce__(self):
    return (getattr, (OrderedDict, 'fromkeys'))


def test_getattr_is_refused_outside_ignored_objects(tmp_path):
  path = tmp_path / 'getattr.pth'
  _torch_zip(path, pickle.dumps({'state_dict': {}, 'x': _GetattrEvil()}, protocol=2))
  with pytest.raises(tp.UnsafeCheckpointError, match=r"getattr.pth: getattr\(<class 'collections.OrderedDict'>, "
                     r"'fromkeys'\) is not allowed.*nothing from it was executed"):
    tp.load(path)


# ------------------------------------------------------------------------------------------- broken files
def test_truncated_zip_checkpoint(tmp_path, fixtures_dir):
  raw = (fixtures_dir / 'stgcnpp_ntu60_2d_ref.pth').read_bytes()
  for cut in (len(raw) // 2, len(raw) - 10):
    path = tmp_path / f'cut{cut}.pth'
    path.write_bytes(raw[:cut])
    with pytest.raises(tp.CheckpointFormatError, match=rf'cut{cut}.pth: corrupted or truncated zip archive'):
      tp.load_state_dict(path)


def test_corrupted_storage_bytes_fail_the_crc(tmp_path, fixtures_dir):
  raw = bytearray((fixtures_dir / 'stgcnpp_ntu60_2d_ref.pth').read_bytes())
  raw[len(raw) // 2] ^= 0xFF   # inside some storage member
  path = tmp_path / 'flipped.pth'
  path.write_bytes(bytes(raw))
  with pytest.raises(tp.CheckpointFormatError, match='flipped.pth: corrupted or truncated zip archive'):
    tp.load_state_dict(path)


def test_truncated_legacy_checkpoint(tmp_path):
  torch = pytest.importorskip('torch')
  path = tmp_path / 'legacy.pth'
  torch.save({'w': torch.arange(100.0)}, path, _use_new_zipfile_serialization=False)
  raw = path.read_bytes()
  path.write_bytes(raw[:-40])
  with pytest.raises(tp.CheckpointFormatError, match='legacy.pth: truncated or corrupted storage'):
    tp.load(path)


@pytest.mark.parametrize('content, message', [
    (np.random.default_rng(0).bytes(4096), 'not a PyTorch checkpoint'),
    (b'', 'not a PyTorch checkpoint'),
    (pickle.dumps([1, 2, 3], protocol=2), 'not a PyTorch checkpoint'),
    (b'PK\x03\x04' + bytes(100), 'corrupted or truncated zip archive'),
], ids=['random', 'empty', 'plain_pickle', 'zip_header_only'])
def test_not_a_checkpoint(tmp_path, content, message):
  path = tmp_path / 'junk.pth'
  path.write_bytes(content)
  with pytest.raises(tp.CheckpointFormatError, match=f'junk.pth: {message}'):
    tp.load(path)


def test_zip_that_is_not_a_checkpoint(tmp_path):
  path = tmp_path / 'other.zip'
  with zipfile.ZipFile(path, 'w') as zf:
    zf.writestr('readme.txt', 'hello')
  with pytest.raises(tp.CheckpointFormatError, match='other.zip: a zip file but not a PyTorch checkpoint'):
    tp.load(path)


def test_checkpoint_without_state_dict(tmp_path):
  path = tmp_path / 'nosd.pth'
  _torch_zip(path, pickle.dumps({'epoch': 3, 'optimizer': {}}, protocol=2))
  with pytest.raises(tp.CheckpointFormatError, match=r"nosd.pth: no state dict found: top-level keys \['epoch'"):
    tp.load_checkpoint(path)
  with pytest.raises(FileNotFoundError, match='does not exist'):
    tp.load(tmp_path / 'absent.pth')


def test_bare_and_wrapped_state_dicts(tmp_path):
  sd_pkl = _tensor_pickle({'module.w': ('0', 2, 0, (2,), (1,))})
  storages = {'0': np.array([3.0, 4.0], '<f4').tobytes()}
  bare = tmp_path / 'bare.pth'
  _torch_zip(bare, sd_pkl, storages)
  sd, meta = tp.load_checkpoint(bare)
  assert list(sd) == ['module.w'] and meta is None
  wrapped = tmp_path / 'wrapped.pth'
  _torch_zip(wrapped, b'\x80\x02}(' + _u('model') + sd_pkl[2:-1] + _u('meta') + b'}' + _u('epoch') + b'K\x05su.',
             storages)
  sd, meta = tp.load_checkpoint(wrapped)
  np.testing.assert_array_equal(sd['module.w'], [3.0, 4.0])
  assert meta == {'epoch': 5}
