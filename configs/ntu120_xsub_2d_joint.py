"""STGCN++ NTU120 XSub, 2D, joint. Other modalities: set config.data.feat (b, jm, bm) on the command line,
e.g. --config.data.feat=b.

    python -m stgcn_jax.train --config configs/ntu120_xsub_2d_joint.py --workdir runs/ntu120_xsub_2d_joint

No published mmaction2 number for this split; PYSKL reports the same model on it.
"""

from configs import ntu60_2d_joint


def get_config():
  config = ntu60_2d_joint.get_config()
  config.model.num_classes = 120
  config.data.ann_file = 'data/skeleton/ntu120_2d.pkl'
  return config
