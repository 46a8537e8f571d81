"""The embedded demo in 3D: the full STGCN++ on synthetic NTU-25 skeletons (metres), no download needed.

    python -m stgcn_jax.train --config configs/demo_3d.py --workdir runs/demo_3d

As ``configs/demo.py``, on ``data/demo/demo_3d.pkl`` (generated on first use) with the ``nturgb+d`` layout.
Expected top-1 (10-clip test): 93.8 (validation 1-clip top-1 by step: 39.6 at 50, 44.8 at 100, 89.6 at 150,
92.7 at 200, 93.8 at 250; 3 min 58 s for the whole command on the machine of ``configs/demo.py``'s figures, shared
with a test run); a little slower than the 2D demo (25 joints instead of 17). Before the channels-first training
layout: 94.8 (34.4, 60.4, 91.7, 94.8, 93.8).
"""

from configs import demo


def get_config():
  config = demo.get_config()
  config.model.layout = 'nturgb+d'
  config.data.ann_file = 'data/demo/demo_3d.pkl'
  config.data.demo = '3d'
  return config
