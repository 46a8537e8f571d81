"""STGCN++ NTU60 XView, 3D, joint. Other modalities: set config.data.feat (b, jm, bm) on the command line,
e.g. --config.data.feat=b.

    python -m stgcn_jax.train --config configs/ntu60_xview_3d_joint.py --workdir runs/ntu60_xview_3d_joint

No published mmaction2 number for this split; PYSKL reports the same model on it.
"""

from configs import ntu60_3d_joint


def get_config():
  config = ntu60_3d_joint.get_config()
  config.data.train_split = 'xview_train'
  config.data.val_split = config.data.test_split = 'xview_val'
  return config
