"""The restricted unpickler: real annotation files load, anything executable is refused before it runs."""

import collections
import os
import pickle
import subprocess

import numpy as np
import pytest

from stgcn_jax.safe_pickle import UnsafePickleError, load_pickle, loads_pickle


def _assert_same(a, b):
  assert type(a) is type(b)
  if isinstance(a, np.ndarray):
    assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
  elif isinstance(a, dict):
    assert list(a) == list(b)
    for k in a:
      _assert_same(a[k], b[k])
  elif isinstance(a, (list, tuple)):
    assert len(a) == len(b)
    for x, y in zip(a, b):
      _assert_same(x, y)
  else:
    assert a == b


@pytest.mark.parametrize('name', ['ntu60_2d_synth.pkl', 'ntu60_3d_synth.pkl'])
def test_fixture_annotation_files_load_like_pickle(fixtures_dir, name):
  with open(fixtures_dir / name, 'rb') as f:
    want = pickle.load(f)
  _assert_same(load_pickle(fixtures_dir / name), want)


@pytest.mark.parametrize('protocol', range(0, pickle.HIGHEST_PROTOCOL + 1))
def test_allowed_content_round_trips(protocol):
  obj = {
      'f16': np.arange(6, dtype=np.float16).reshape(2, 3), 'f32_t': np.arange(12, dtype=np.float32).reshape(3, 4).T,
      'i64': np.array([1, -2], np.int64), 'empty': np.zeros((0, 3, 17, 2), np.float32),
      'record': np.zeros(2, dtype=[('x', 'f4'), ('y', 'i8')]), 'objects': np.array(['a', 1], dtype=object),
      'scalars': [np.float32(1.5), np.int64(7), np.bool_(True)],
      'builtins': [1, 2.5, 'text', b'bytes', None, True, (1, 2), {3}, frozenset({4}), complex(1, 2), slice(1, 5, 2),
                   range(3), bytearray(b'ab')],
      'ordered': collections.OrderedDict(b=1, a=2),
  }
  _assert_same(loads_pickle(pickle.dumps(obj, protocol=protocol)), obj)


def test_numpy_1x_module_names_are_accepted():
  # numpy 1.x writes numpy.core.multiarray._reconstruct, numpy 2.x numpy._core...; either must load.
  data = pickle.dumps(np.arange(5, dtype=np.float32), protocol=2)
  old_style = data.replace(b'numpy._core.', b'numpy.core.') if b'numpy._core.' in data else data
  new_style = data.replace(b'numpy.core.', b'numpy._core.') if b'numpy.core.' in data else data
  assert b'numpy.core.multiarray' in old_style and b'numpy._core.multiarray' in new_style
  for blob in (old_style, new_style):
    np.testing.assert_array_equal(loads_pickle(blob), np.arange(5, dtype=np.float32))


class _System:
  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return (os.system, (self.command,))


class _Popen:
  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return (subprocess.Popen, (['sh', '-c', self.command],))


class _Eval:
  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return (eval, (f'__import__("os").system({self.command!r})',))


@pytest.mark.parametrize('payload', [_System, _Popen, _Eval])
def test_malicious_reduce_is_refused_and_nothing_runs(tmp_path, payload):
  marker = tmp_path / 'pwned'
  path = tmp_path / 'evil.pkl'
  # Hide the payload inside a plausible annotation file.
  path.write_bytes(pickle.dumps({'split': {'train': ['a']}, 'annotations': [{'frame_dir': 'a',
                                                                            'label': payload(f'touch {marker}')}]}))
  with pytest.raises(UnsafePickleError) as info:
    load_pickle(path)
  message = str(info.value)
  assert str(path) in message and 'refused to load the global' in message and 'may be malicious' in message
  assert not marker.exists()


@pytest.mark.parametrize('module,name', [('builtins', 'getattr'), ('builtins', '__import__'), ('os', 'system'),
                                         ('numpy', 'load'), ('numpy.lib.npyio', 'load'), ('copyreg', '_reconstructor'),
                                         ('builtins', 'exec'), ('subprocess', 'check_output')])
def test_refused_globals_are_named(module, name):
  blob = f'c{module}\n{name}\n.'.encode()                 # protocol 0 GLOBAL opcode, then STOP
  with pytest.raises(UnsafePickleError, match=rf'refused to load the global {module}\.{name}'):
    loads_pickle(blob, source='crafted.pkl')


def test_non_latin1_codecs_and_persistent_ids_are_refused():
  with pytest.raises(UnsafePickleError, match='only latin1'):
    loads_pickle(b"c_codecs\nencode\n(Vabc\nVrot13\ntR.")
  with pytest.raises(UnsafePickleError, match='persistent id'):
    loads_pickle(b'Pid\n.')


def test_truncated_garbled_and_foreign_files_raise_value_errors(fixtures_dir, tmp_path):
  good = (fixtures_dir / 'ntu60_2d_synth.pkl').read_bytes()
  cases = {'truncated': good[:len(good) // 2], 'empty': b'', 'garbled': bytes(range(256)) * 4,
           'text': b'frame_dir,label\na,1\n', 'trailing': good + b'junk', 'bitflip': good[:100] + b'\xff' + good[101:]}
  for name, data in cases.items():
    path = tmp_path / f'{name}.pkl'
    path.write_bytes(data)
    with pytest.raises(ValueError) as info:
      load_pickle(path)
    assert str(path) in str(info.value), name
    error = info.value                                    # no traceback from inside pickle is chained to it
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__), name


def test_missing_file_and_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    load_pickle(tmp_path / 'nope.pkl')
  with pytest.raises(ValueError, match='is a directory'):
    load_pickle(tmp_path)
