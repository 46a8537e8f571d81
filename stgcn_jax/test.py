"""Testing: ``python -m stgcn_jax.test --checkpoint DIR [--config configs/x.py] [--dump result.pkl]``.

Runs the 10-clip protocol (softmax per clip, mean over clips) of a training checkpoint or a converted
PyTorch one over a whole split, sharded over every device and host; every sample is evaluated exactly once.
Prints top-1, top-5 and mean-class accuracy. ``--dump`` writes the per-sample scores (:mod:`stgcn_jax.results`)
with a per-class report and a confusion matrix beside it.

The data settings (annotation file, split, modality, clip length) come from ``--config`` — with the usual
``--config.data.ann_file=...`` overrides — or, for a training checkpoint, from the config saved in it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import ml_collections

from stgcn_jax import checkpoint as ckpt_lib
from stgcn_jax import evaluate as eval_lib


def config_for(checkpoint: str, config: ml_collections.ConfigDict | None) -> ml_collections.ConfigDict:
  """``config``, or the training config saved in the checkpoint."""
  if config is not None:
    return config
  _, meta = ckpt_lib.read_meta(checkpoint)
  if 'config' not in meta:
    raise ValueError(f'{checkpoint} is a converted checkpoint without a training config; pass --config (e.g. '
                     'configs/ntu60_2d_joint.py) to say which annotation file, split and modality to test on')
  return ml_collections.ConfigDict(meta['config'])


def check_dump_path(dump: str) -> None:
  """Refuses, before any evaluation, a ``--dump`` path that cannot be written."""
  from stgcn_jax.train import write_probe
  path = Path(dump)
  if path.is_dir():
    raise ValueError(f'--dump {dump} is a directory; name the results file, e.g. {path / "result.pkl"}')
  try:
    write_probe(path.parent)
  except OSError as e:
    raise ValueError(f'--dump {dump}: its folder {path.parent} cannot be written ({e.strerror or e})') from None


def main(argv=None) -> int:
  from absl import flags
  from ml_collections import config_flags

  from stgcn_jax import cli

  flags.DEFINE_string('checkpoint', None, 'Checkpoint directory (training workdir/checkpoints or a converted one).',
                      required=True)
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
  flags.DEFINE_string('split', None, 'Split to test (default: config.data.test_split).')
  flags.DEFINE_integer('num_clips', None, 'Clips per sample (default: config.data.test_clips, 10).')
  flags.DEFINE_string('dump', None, 'Write per-sample scores here (a .pkl), with a report beside it.')
  cli.define_distributed_flags(flags)
  config_flags.DEFINE_config_file('config', None, 'Config file naming the data (configs/*.py).', lock_config=True)

  def body(FLAGS) -> int:
    if FLAGS.num_clips is not None and FLAGS.num_clips < 1:
      return cli.fail(f'--num_clips={FLAGS.num_clips}: clips per sample must be a positive integer (leave the flag '
                      'out for the config\'s test_clips, 10 in the published protocol)')
    try:
      if FLAGS.dump:
        check_dump_path(FLAGS.dump)
      config = config_for(FLAGS.checkpoint, FLAGS.config)
      result = eval_lib.evaluate_checkpoint(FLAGS.checkpoint, config, split=FLAGS.split, num_clips=FLAGS.num_clips,
                                            step=FLAGS.step, for_dump=bool(FLAGS.dump))
    except (ValueError, OSError) as e:   # OSError: a missing or unreadable checkpoint / annotation file
      return cli.fail(e)
    if jax.process_index() != 0:
      return 0
    ds = result.dataset
    print(f'{ds.source} split {ds.split!r}: {len(ds)} samples, {result.num_clips} clip(s) each')
    for k, v in result.metrics.items():
      print(f'{k}: {v:.2f}')
    if FLAGS.dump:
      try:
        outputs = eval_lib.write_outputs(FLAGS.dump, result.scores, ds, result.meta.get('class_names'),
                                         {**result.meta, 'source': FLAGS.checkpoint})
      except (ValueError, OSError) as e:
        return cli.fail(f'--dump {FLAGS.dump}: {e}')
      for name, path in outputs.items():
        print(f'{name}: {path}')
    return 0

  return cli.run(body, argv)


if __name__ == '__main__':
  from stgcn_jax import cli
  cli.relaunch_with_tcmalloc()
  sys.exit(main())
