"""STGCN++ NTU60 XSub, 2D (HRNet COCO-17), joint.

    python -m stgcn_jax.train --config configs/ntu60_2d_joint.py --workdir runs/ntu60_2d_joint

Expected top-1 (10-clip test, mmaction2 model zoo): 89.29.
"""

from configs import base


def get_config():
  return base.get_config()
