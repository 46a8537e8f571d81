"""STGCN++ NTU60 XSub, 3D, bone motion.

    python -m stgcn_jax.train --config configs/ntu60_3d_bone_motion.py --workdir runs/ntu60_3d_bone_motion

Expected top-1 (10-clip test, mmaction2 model zoo): 87.45.
"""

from configs import ntu60_3d_joint


def get_config():
  config = ntu60_3d_joint.get_config()
  config.data.feat = 'bm'
  return config
