"""stgcn_jax.predict and stgcn_jax.labels: inputs of every accepted form, the test pipeline on annotation files,
errors that name the expected layout/modality, top-k and label names."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from stgcn_jax import checkpoint as ckpt_lib
from stgcn_jax import labels, predict
from stgcn_jax.model import ModelConfig, build_model

# A small coco model: 2 blocks, so building and compiling it takes a moment only.
CFG = ModelConfig(num_classes=60, layout='coco', num_stages=2, base_channels=8, inflate_stages=(), down_stages=())


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  model = build_model(CFG, seed=3)
  directory = tmp_path_factory.mktemp('ckpt') / 'tiny'
  ckpt_lib.write_model(directory, model, {'layout': 'coco', 'feat': 'j', 'class_names': list(labels.NTU60_CLASSES),
                                          'source': 'test'})
  return model, directory


def _x(shape, seed=0):
  return np.random.default_rng(seed).normal(0, 0.5, shape).astype(np.float32)


def test_predict_arrays_matches_predict_clips(tiny):
  model, _ = tiny
  x = _x((2, 3, 2, 20, 17, 3))
  logits, probs = predict.predict_arrays(model, x, batch_size=4)   # 6 clips in batches of 4 (2 padded)
  ref_logits, ref_probs = model.predict_clips(x)
  np.testing.assert_allclose(logits, np.asarray(ref_logits), atol=1e-5, rtol=0)
  np.testing.assert_allclose(probs, np.asarray(ref_probs), atol=1e-7, rtol=0)
  e = np.exp(logits - logits.max(-1, keepdims=True))
  np.testing.assert_allclose(probs, (e / e.sum(-1, keepdims=True)).mean(1), atol=1e-7)   # softmax, then mean


@pytest.mark.parametrize('shape', [(2, 20, 17, 3), (1, 2, 20, 17, 3), (1, 1, 2, 20, 17, 3)])
def test_input_forms_from_npy(tiny, tmp_path, shape, capsys):
  model, directory = tiny
  x = _x((2, 20, 17, 3), seed=1)
  path = tmp_path / 'x.npy'
  np.save(path, x.reshape(shape))
  out = tmp_path / 'scores.npy'
  assert predict.main(['--checkpoint', str(directory), '--input', str(path), '--top-k', '2',
                       '--output', str(out)]) == 0
  _, ref = model.predict_clips(x[None, None])
  np.testing.assert_allclose(np.load(out), np.asarray(ref), atol=1e-6)
  best = int(np.asarray(ref)[0].argmax())
  assert capsys.readouterr().out.startswith(f'sample 0: {best} {labels.NTU60_CLASSES[best]!r}')


def test_wrong_joints_or_channels_name_the_expected_layout_and_modality(tiny, tmp_path, capsys):
  _, directory = tiny
  path = tmp_path / 'ntu.npy'
  np.save(path, _x((2, 20, 25, 3)))
  with pytest.raises(ValueError, match=r"ntu.npy: V=25 joints but the checkpoint expects V=17 \(layout 'coco'\)"):
    predict.predict(directory, path)
  path2 = tmp_path / 'xy.npz'
  np.savez(path2, input=_x((1, 1, 2, 20, 17, 2)))
  with pytest.raises(ValueError, match=r'C=2 channels but the checkpoint expects C=3 \(joint features'):
    predict.predict(directory, path2)
  assert predict.main(['--checkpoint', str(directory), '--input', str(path)]) == 2   # README: status 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith('error:')


def test_annotation_file_runs_the_test_pipeline(fixtures_dir, tiny):
  model, directory = tiny
  x, names = predict.load_inputs(fixtures_dir / 'ntu60_2d_synth.pkl', layout='coco', feat='b',
                                 split='xsub_val')
  golden = np.load(fixtures_dir / 'pipeline_2d_synth.npz')
  assert names == ['s2d_T001_M1', 's2d_T099_M1', 's2d_T150_M1_720x1280', 's2d_T064_M3_360x480']
  assert x.shape == (4, 10, 2, 100, 17, 3)
  for i, name in enumerate(names):
    np.testing.assert_array_equal(x[i], golden[f'test/b/{name}'])
  # The checkpoint records feat 'j'; predict uses it without --feat.
  result = predict.predict(directory, fixtures_dir / 'ntu60_2d_synth.pkl', split='xsub_val', k=3)
  joint = np.stack([golden[f'test/j/{n}'] for n in names])
  np.testing.assert_allclose(result.probs, np.asarray(model.predict_clips(joint)[1]), atol=1e-6)
  assert result.sample_names == names and [len(t) for t in result.top] == [3] * 4
  with pytest.raises(ValueError, match=r"trained on 'j' \(joint\) but --feat is 'b'"):
    predict.predict(directory, fixtures_dir / 'ntu60_2d_synth.pkl', feat='b')


def test_per_person_data_norm_gets_its_person_count(fixtures_dir, tmp_path):
  # A data BatchNorm over M·V·C channels (MVC) fixes M: the pipeline formats clips of the model's num_person.
  cfg = ModelConfig(num_classes=60, layout='coco', num_stages=2, base_channels=8, inflate_stages=(), down_stages=(),
                    data_bn_type='MVC', num_person=3)
  model = build_model(cfg, seed=1)
  ckpt_lib.write_model(tmp_path / 'mvc3', model, {'layout': 'coco', 'feat': 'j', 'source': 'test'})
  result = predict.predict(tmp_path / 'mvc3', fixtures_dir / 'ntu60_2d_synth.pkl', split='xsub_val', k=1)
  x, _ = predict.load_inputs(fixtures_dir / 'ntu60_2d_synth.pkl', layout='coco', feat='j',
                             split='xsub_val', num_person=3)
  golden = np.load(fixtures_dir / 'pipeline_2d_synth.npz')
  np.testing.assert_array_equal(x[3, :, :2], golden['test/j/s2d_T064_M3_360x480'])   # M=3 sample: its third
  assert np.abs(x[3, :, 2]).sum() > 0 and not x[0, :, 1:].any()                      # person too; M=1: zeros
  np.testing.assert_allclose(result.probs, np.asarray(model.predict_clips(x)[1]), atol=1e-6)
  with pytest.raises(ValueError, match=r'M=2 persons but the checkpoint normalises its input per person and '
                                       r'expects M=3'):
    predict.check_input(x[:, :, :2], model)
  with pytest.raises(ValueError, match=r'per person \(data_bn_type MVC\) and expects M=3 persons, got M=2'):
    model(x[:1, 0, :2])


def test_unusable_array_inputs_are_refused_naming_the_file(tiny, tmp_path, capsys):
  _, directory = tiny
  cases = {'nan.npy': (_x((2, 20, 17, 3)), r'nan.npy: 1 NaN/Inf value\(s\), the first at .* = \(0, 0, 1, 2, 3, 0\)'),
           'empty.npy': (np.zeros((0, 2, 20, 17, 3), np.float32), r'empty.npy: an empty input of shape \(0, 1, 2, '),
           'no_frames.npy': (np.zeros((2, 0, 17, 3), np.float32), r'no_frames.npy: an empty input'),
           'words.npy': (np.array([['a']]), r'words.npy: .*expected \(N, num_clips'),
           'trunc.npz': (None, r'trunc.npz: not a readable .npz array of numbers \(BadZipFile'),
           'trunc.npy': (None, r'trunc.npy: not a readable .npy array of numbers')}
  for name, (value, message) in cases.items():
    path = tmp_path / name
    if name == 'nan.npy':
      value[1, 2, 3, 0] = np.nan
    if value is not None:
      np.save(path, value)
    else:                                                     # a file cut short
      (np.savez if name.endswith('.npz') else np.save)(path, _x((2, 20, 17, 3)))
      path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ValueError, match=message):
      predict.predict(directory, path)
    assert predict.main(['--checkpoint', str(directory), '--input', str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and name in err


def test_output_file_names_and_top_k(tiny, tmp_path, capsys):
  _, directory = tiny
  x = tmp_path / 'x.npy'
  np.save(x, _x((2, 20, 17, 3)))
  out = tmp_path / 'new' / 'res.NPZ'
  assert predict.main(['--checkpoint', str(directory), '--input', str(x), '--output', str(out)]) == 0
  assert f'scores written to {out}' in capsys.readouterr().out
  with np.load(out) as z:                                     # the very name given, in the format its suffix says
    assert sorted(z.keys()) == ['logits', 'names', 'probs']
  for bad, message in ((tmp_path / 'res.json', r"res.json': name a .npy file"), (tmp_path, 'is a directory')):
    with pytest.raises(ValueError, match=message):
      predict.predict(directory, x, output=bad)
  with pytest.raises(ValueError, match='top-k must be a positive integer, got 0'):
    predict.predict(directory, x, k=0)


def test_labels_file_encodings(tmp_path):
  path = tmp_path / 'names.txt'
  path.write_bytes('\ufeffwalk\r\nrun\r\n'.encode('utf-8'))           # with a BOM, as Notepad saves it
  assert labels.read_labels_file(path, 2) == ['walk', 'run']
  path.write_bytes('marché\nrun\n'.encode('latin-1'))
  with pytest.raises(ValueError, match=r'names.txt: not UTF-8 text .*save the labels file as UTF-8'):
    labels.read_labels_file(path, 2)


def test_annotation_file_labels_are_not_needed(tiny, tmp_path):
  # Recorded skeletons without labels, or with another label set, still get predictions.
  _, directory = tiny
  rng = np.random.default_rng(0)
  anns = [{'frame_dir': f'clip{i}', 'img_shape': (480, 640), 'keypoint': rng.uniform(0, 400, (1, 30, 17, 2)),
           'keypoint_score': rng.uniform(0.5, 1, (1, 30, 17))} for i in range(3)]
  anns[1]['label'] = 700
  path = tmp_path / 'recorded.pkl'
  path.write_bytes(pickle.dumps({'split': {'all': ['clip0', 'clip1', 'clip2']}, 'annotations': anns}))
  result = predict.predict(directory, path, feat='j', split='all', k=2)
  assert result.sample_names == ['clip0', 'clip1', 'clip2'] and result.probs.shape == (3, 60)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['recorded.pkl']   # read into memory: no cache written


def test_annotation_file_needs_a_modality(fixtures_dir):
  with pytest.raises(ValueError, match='pass --feat'):
    predict.load_inputs(fixtures_dir / 'ntu60_2d_synth.pkl', layout='coco', feat=None)


def test_top_k_and_labels_file(tiny, tmp_path):
  probs = np.array([[0.1, 0.5, 0.1, 0.3], [0.25, 0.25, 0.4, 0.1]])
  names = ['a', 'b', 'c', 'd']
  assert predict.top_k(probs, 2, names) == [[(1, 'b', 0.5), (3, 'd', 0.3)], [(2, 'c', 0.4), (0, 'a', 0.25)]]
  assert len(predict.top_k(probs, 10, names)[0]) == 4
  _, directory = tiny
  label_file = tmp_path / 'names.txt'
  label_file.write_text('\n'.join(f'action {i}' for i in range(60)) + '\n\n')
  x = tmp_path / 'x.npy'
  np.save(x, _x((2, 20, 17, 3)))
  result = predict.predict(directory, x, labels=label_file, k=1)
  assert result.top[0][0][1] == f'action {result.top[0][0][0]}'
  label_file.write_text('only\ntwo\n')
  with pytest.raises(ValueError, match='holds 2 class names but the model has 60 classes'):
    predict.predict(directory, x, labels=label_file)


def test_bad_input_files(tiny, tmp_path):
  _, directory = tiny
  npz = tmp_path / 'many.npz'
  np.savez(npz, a=np.zeros(3), b=np.zeros(3))
  with pytest.raises(ValueError, match='put the inputs under the key "input"'):
    predict.predict(directory, npz)
  npy = tmp_path / 'flat.npy'
  np.save(npy, np.zeros((5, 3)))
  with pytest.raises(ValueError, match=r'array of shape \(5, 3\); expected \(N, num_clips, M, T, V, C\)'):
    predict.predict(directory, npy)
  with pytest.raises(FileNotFoundError):
    predict.predict(directory, tmp_path / 'absent.npy')


# -------------------------------------------------------------------------------------------------- labels
def test_builtin_class_names():
  assert len(labels.NTU60_CLASSES) == 60 and len(labels.NTU120_CLASSES) == 120
  assert len(set(labels.NTU120_CLASSES)) == 120
  assert labels.class_names(60)[0] == 'drink water'
  assert labels.class_names(60)[59] == 'walking apart from each other'       # A60
  assert labels.class_names(120)[60] == 'put on headphone'                   # A61
  assert labels.class_names(120)[119] == 'finger-guessing game (playing rock-paper-scissors)'
  assert labels.class_names(120)[:60] == labels.class_names(60)
  assert labels.class_names(14) is None


def test_read_labels_file_validation(tmp_path):
  path = tmp_path / 'l.txt'
  path.write_text('  wave \nclap\n\n')
  assert labels.read_labels_file(path) == ['wave', 'clap']
  for text, message in [('', 'holds no class names'), ('a\n\nb\n', r'line\(s\) \[2\] are blank'),
                        ('a\nb\na\n', "'a' appears on lines 1 and 3")]:
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
      labels.read_labels_file(path)
  with pytest.raises(FileNotFoundError):
    labels.read_labels_file(tmp_path / 'absent.txt')
