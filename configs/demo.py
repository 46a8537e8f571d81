"""The embedded demo: the full STGCN++ on synthetic COCO-17 2D actions, no download needed.

    python -m stgcn_jax.train --config configs/demo.py --workdir runs/demo

On first use the run writes ``data/demo/demo_2d.pkl`` (relative to the working directory) with
:func:`stgcn_jax.data.synthetic.ensure_demo_dataset`: 8 actions (``synthetic.DEMO_CLASSES``), 800 training and
96 validation sequences in the NTU annotation format. The model is the recipe's STGCN++ (10 stages, 64 base
channels), trained from scratch for 250 steps (5 epochs) of 16 clips of 24 frames.

Expected top-1 (10-clip test on the validation split): 91.7 (validation 1-clip top-1 by step: 52.1 at 50, 51.0
at 100, 83.3 at 150, 90.6 at 200, 91.7 at 250). Time: 2 min 52 s for the whole command on a 2-core AMD EPYC
shared with a test run; before the channels-first training layout, 260 s from start to the end of the test on
the idle 2-core machine of the README's Speed runs A–E (90.6 top-1), 830 s on a shared, busy one.
"""

from configs import base


def get_config():
  config = base.get_config()
  config.model.num_classes = 8
  config.data.ann_file = 'data/demo/demo_2d.pkl'
  config.data.demo = '2d'
  config.data.clip_len = 24
  config.data.train_repeat = 1
  config.data.num_workers = 0      # the per-sample transforms are cheap next to the model on a CPU
  # lr 0.1 per 64 samples (0.025 at batch 16): twice the recipe's rate, for a short run. Much higher (0.05 at
  # batch 16) makes the first steps diverge without a warm-up, and the run stays at chance for 100 steps.
  config.optim.reference_batch = 64
  config.batch_size = 16
  config.eval_batch_size = 32
  config.num_epochs = 5
  config.bn_group_size = 16
  config.log_every_steps = 10
  config.keep_checkpoints = 1
  return config
