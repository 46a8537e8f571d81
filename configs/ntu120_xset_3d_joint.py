"""STGCN++ NTU120 XSet, 3D, joint. Other modalities: set config.data.feat (b, jm, bm) on the command line,
e.g. --config.data.feat=b.

    python -m stgcn_jax.train --config configs/ntu120_xset_3d_joint.py --workdir runs/ntu120_xset_3d_joint

No published mmaction2 number for this split; PYSKL reports the same model on it.
"""

from configs import ntu120_xsub_3d_joint


def get_config():
  config = ntu120_xsub_3d_joint.get_config()
  config.data.train_split = 'xset_train'
  config.data.val_split = config.data.test_split = 'xset_val'
  return config
