"""STGCN++ NTU60 XSub, 3D (Kinect NTU-25), joint.

    python -m stgcn_jax.train --config configs/ntu60_3d_joint.py --workdir runs/ntu60_3d_joint

Expected top-1 (10-clip test, mmaction2 model zoo): 89.14.
"""

from configs import base


def get_config():
  config = base.get_config()
  config.model.layout = 'nturgb+d'
  config.data.ann_file = 'data/skeleton/ntu60_3d.pkl'
  return config
