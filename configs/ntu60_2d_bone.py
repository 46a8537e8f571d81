"""STGCN++ NTU60 XSub, 2D, bone.

    python -m stgcn_jax.train --config configs/ntu60_2d_bone.py --workdir runs/ntu60_2d_bone

Expected top-1 (10-clip test, mmaction2 model zoo): 92.30.
"""

from configs import ntu60_2d_joint


def get_config():
  config = ntu60_2d_joint.get_config()
  config.data.feat = 'b'
  return config
