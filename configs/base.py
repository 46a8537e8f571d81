"""STGCN++ on NTU60 XSub, 2D joint: the recipe shared by every config (SPEC §5).

    python -m stgcn_jax.train --config configs/base.py --workdir runs/ntu60_2d_joint

Other configs import this one and change only what differs. Expected top-1 (10-clip test): 89.29.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  # The network (stgcn_jax.model.ModelConfig); the defaults are STGCN++. ``layout`` is a built-in name or a
  # user-defined skeleton, dict(num_node=..., inward=[(child, parent), ...], center=...) (README, "Custom
  # datasets and skeleton layouts"): a field of either type.
  config.model = ml_collections.ConfigDict(dict(
      num_classes=60, layout=ml_collections.FieldReference('coco', field_type=object), graph_mode='spatial',
      in_channels=3, base_channels=64, ch_ratio=2.0, num_stages=10, inflate_stages=(5, 8), down_stages=(5, 8),
      num_person=2, data_bn_type='VC', gcn_adaptive='init', gcn_with_res=True, gcn_conv_pos='pre',
      tcn_type='mstcn', tcn_dropout=0.0, head_dropout=0.0))

  # Data: mmaction2's published annotation pickle (https://download.openmmlab.com/mmaction/v1.0/skeleton/data/).
  config.data = ml_collections.ConfigDict(dict(
      ann_file='data/skeleton/ntu60_2d.pkl',
      train_split='xsub_train', val_split='xsub_val', test_split='xsub_val',
      feat='j',                 # 'j' joint, 'b' bone, 'jm' joint motion, 'bm' bone motion
      clip_len=100, val_clips=1, test_clips=10,
      train_repeat=5,           # the training split is repeated 5 times per epoch ("80e" = 16 × 5)
      num_workers=2,            # Grain worker processes per host (0: in the main process)
      cache_dir='',             # where the memory-mapped cache goes ('' = next to ann_file)
      demo='',                  # '2d' / '3d': generate the embedded demo dataset at ann_file if absent
  ))

  # Optimiser: SGD Nesterov, lr 0.1 per global batch of 128, scaled linearly with the actual global batch.
  config.optim = ml_collections.ConfigDict(dict(
      base_lr=0.1, reference_batch=128, auto_scale_lr=True, momentum=0.9, nesterov=True, weight_decay=5e-4))
  config.batch_size = 128           # global, over all devices and hosts (16 per GPU × 8 GPUs in the paper)
  config.eval_batch_size = 64       # global, samples (each with val_clips / test_clips clips); rounded up to a
                                    # multiple of the device count (evaluation pads and masks: same scores)
  config.num_epochs = 16
  config.max_steps = -1             # stop early after this many steps (-1: the full schedule)
  # BatchNorm statistics: per group of this many samples, as the reference's un-synchronised BN over 16
  # samples per GPU (results then do not depend on the device count); 0 = statistics over the global batch.
  config.bn_group_size = 16
  config.dtype = 'float32'          # compute dtype ('bfloat16' for speed); parameters, BN statistics and loss stay float32

  config.log_every_steps = 50
  config.eval_every_epochs = 1
  config.checkpoint_every_steps = 0  # 0: at the end of every epoch
  config.keep_checkpoints = 3        # the last N, plus the best by validation top-1
  config.async_checkpointing = True
  config.init_from = ''              # a checkpoint directory (e.g. a converted PyTorch one) to fine-tune from
  config.run_test = True             # the 10-clip test on test_split after training
  return config
