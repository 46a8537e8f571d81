"""Testing: ``python -m stgcn_jax.test --checkpoint DIR [--config configs/x.py] [--dump result.pkl]``.

Runs the 10-clip protocol (softmax per clip, mean over clips) of a training checkpoint or a converted
PyTorch one over a whole split, sharded over every device and host; every sample is evaluated exactly once.
Prints top-1, top-5 and mean-class accuracy. ``--dump`` writes the per-sample scores (:mod:`stgcn_jax.results`)
with a per-class report and a confusion matrix beside it.

The data settings (annotation file, split, modality, clip length) come from ``--config`` — with the usual
``--config.data.ann_file=...`` overrides — or, for a training checkpoint, from the config saved in it.
"""

from __future__ import annotations

import json
import logging
import sys

import jax
import ml_collections

from stgcn_jax import checkpoint as ckpt_lib
from stgcn_jax import evaluate as eval_lib
from stgcn_jax import sharding as sharding_lib


def config_for(checkpoint: str, config: ml_collections.ConfigDict | None) -> ml_collections.ConfigDict:
  """``config``, or the training config saved in the checkpoint."""
  if config is not None:
    return config
  _, meta = ckpt_lib.read_meta(checkpoint)
  if 'config' not in meta:
    raise ValueError(f'{checkpoint} is a converted checkpoint without a training config; pass --config (e.g. '
                     'configs/ntu60_2d_joint.py) to say which annotation file, split and modality to test on')
  return ml_collections.ConfigDict(meta['config'])


def main(argv=None) -> int:
  from absl import app, flags
  from ml_collections import config_flags

  from stgcn_jax.train import _add_config_root

  flags.DEFINE_string('checkpoint', None, 'Checkpoint directory (training workdir/checkpoints or a converted one).',
                      required=True)
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
  flags.DEFINE_string('split', None, 'Split to test (default: config.data.test_split).')
  flags.DEFINE_integer('num_clips', None, 'Clips per sample (default: config.data.test_clips, 10).')
  flags.DEFINE_string('dump', None, 'Write per-sample scores here (a .pkl), with a report beside it.')
  flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 for multi-host runs.')
  flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-host).')
  flags.DEFINE_integer('process_id', None, 'This process index (multi-host).')
  config_flags.DEFINE_config_file('config', None, 'Config file naming the data (configs/*.py).', lock_config=True)
  argv = sys.argv if argv is None else argv
  _add_config_root(argv)
  code = 0

  def run(_):
    nonlocal code
    FLAGS = flags.FLAGS
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s: %(message)s')
    sharding_lib.maybe_initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    try:
      config = config_for(FLAGS.checkpoint, FLAGS.config)
      result = eval_lib.evaluate_checkpoint(FLAGS.checkpoint, config, split=FLAGS.split, num_clips=FLAGS.num_clips,
                                            step=FLAGS.step)
    except (ValueError, FileNotFoundError) as e:
      print(f'error: {e}', file=sys.stderr)
      code = 2
      return
    if jax.process_index() != 0:
      return
    ds = result.dataset
    clips = FLAGS.num_clips or config.data.test_clips
    print(f'{ds.source} split {ds.split!r}: {len(ds)} samples, {clips} clip(s) each')
    print(json.dumps({k: round(v, 4) for k, v in result.metrics.items()}))
    for k, v in result.metrics.items():
      print(f'{k}: {v:.2f}')
    if FLAGS.dump:
      outputs = eval_lib.write_outputs(FLAGS.dump, result.scores, ds, result.meta.get('class_names'),
                                       {**result.meta, 'source': FLAGS.checkpoint})
      for name, path in outputs.items():
        print(f'{name}: {path}')

  try:
    app.run(run, argv=argv)
  except SystemExit as e:
    if e.code not in (None, 0):
      return int(e.code) if isinstance(e.code, int) else 2
  return code


if __name__ == '__main__':
  sys.exit(main())
