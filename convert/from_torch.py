"""Converts an mmaction2 / pyskl STGCN++ (or ST-GCN) PyTorch checkpoint into a stgcn_jax checkpoint directory.

    python convert/from_torch.py stgcnpp_ntu60_2d.pth --out checkpoints/ntu60_2d_joint [--check]

The architecture is read from the tensors; ``--layout`` / ``--config`` name the skeleton layout (and the
modality) for the data side when they cannot be guessed. torch is not needed, and nothing in the file is
executed. The library function is :func:`stgcn_jax.convert.convert_checkpoint`. A file that cannot be
converted (truncated, garbled, foreign, crafted) or an ``--out`` that exists: one ``error:`` line, status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')   # conversion is small; do not grab an accelerator

from stgcn_jax import convert  # noqa: E402


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('checkpoint', help='the PyTorch .pth file')
  parser.add_argument('--out', required=True, help='output checkpoint directory (must not exist)')
  parser.add_argument('--layout', help='skeleton layout (coco, nturgb+d, openpose, handmp); default: from the '
                      "checkpoint's config or guessed from the number of joints")
  parser.add_argument('--config', help='an mmaction2/pyskl or stgcn_jax config file, read as text (layout, feats)')
  parser.add_argument('--feat', choices=convert.FEATS, help='the modality the model was trained on')
  parser.add_argument('--check', action='store_true', help='run the converted model on a seeded input and compare')
  args = parser.parse_args(argv)
  try:
    result = convert.convert_checkpoint(args.checkpoint, args.out, layout=args.layout, config_path=args.config,
                                        feat=args.feat, check=args.check)
  except (ValueError, OSError) as e:   # every conversion error is a ValueError subclass naming the file
    print(f'error: {e}', file=sys.stderr)
    return 2                           # a broken or foreign input, as every command line reports it
  print(result.summary())
  return 0


if __name__ == '__main__':
  sys.exit(main())
