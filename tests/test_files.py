"""Files written atomically (a temporary file renamed into place) get the mode open() would give them."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from stgcn_jax import files, notebook_utils, results
from stgcn_jax.data import annotations, synthetic
from tests.train_utils import write_random_annotations


def _mode(path) -> int:
  return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize('mask', [0o022, 0o027, 0o002])
def test_atomically_written_files_follow_the_umask(tmp_path, mask):
  previous = os.umask(mask)
  try:
    assert files.umask() == mask
    want = 0o666 & ~mask
    fd, tmp = files.mkstemp(dir=tmp_path)
    os.close(fd)
    assert _mode(tmp) == want
    # A results dump, a download, the demo dataset and the annotation cache beside a (shared) pickle.
    dump = results.write_results(tmp_path / 'r.pkl', np.eye(3, dtype=np.float32), np.arange(3), None, None, {})
    source = write_random_annotations(tmp_path / 'ann.pkl', num_train=4, num_val=2)
    got = notebook_utils.download(source.as_uri(), tmp_path / 'dl', quiet=True)
    demo = synthetic.generate_demo_dataset(tmp_path / 'demo.pkl', '2d', num_train=8, num_val=8)
    annotations.load_annotations(source, 'xsub_train', layout='coco', num_classes=4)
    cache = sorted(p for p in tmp_path.iterdir() if p.name.startswith('ann.pkl.'))
    assert [p.name.split('.')[-2] + '.' + p.suffix[1:] for p in cache] == ['index.npz', 'kp.npy']
    for path in [dump, got, demo, *cache]:
      assert _mode(path) == want, (path, oct(_mode(path)), oct(want))
  finally:
    os.umask(previous)
