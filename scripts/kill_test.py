"""Crash-safety soak test: more SIGKILLs than CI runs, with a chosen or random seed.

    python scripts/kill_test.py --kills 30 [--seed 1234]

Runs ``tests/test_reliability.py::test_sigkill_at_random_points_resumes_from_the_last_complete_checkpoint``
with ``--kills`` random kill points: a tiny training run (checkpoint every step, asynchronous saves) is killed
with SIGKILL at random times, restarted each time, and must resume from the last complete checkpoint and end
bitwise equal to an uninterrupted run. The test prints the seed; pass it back with ``--seed`` to replay the
same kill delays. The run has 30 steps and each kill advances it by 1-3 steps, so at most about 14 kills fit
one run; larger ``--kills`` values are run as several rounds.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PER_ROUND = 10


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--kills', type=int, default=10, help='total number of SIGKILLs (default 10)')
  parser.add_argument('--seed', type=int, default=None, help='seed of the kill delays (default: random)')
  args = parser.parse_args()
  if args.kills < 1:
    parser.error('--kills must be positive')
  remaining, round_index = args.kills, 0
  while remaining > 0:
    kills = min(PER_ROUND, remaining)
    env = dict(os.environ, STGCN_NUM_KILLS=str(kills))
    if args.seed is not None:
      env['STGCN_KILL_SEED'] = str(args.seed + round_index)
    test = 'tests/test_reliability.py::test_sigkill_at_random_points_resumes_from_the_last_complete_checkpoint'
    code = subprocess.call([sys.executable, '-m', 'pytest', '-q', '-s', '-p', 'no:cacheprovider', test], cwd=ROOT,
                           env=env)
    if code != 0:
      return code
    remaining -= kills
    round_index += 1
  print(f'{args.kills} kills: every restart resumed from the last complete checkpoint and matched the '
        'uninterrupted run')
  return 0


if __name__ == '__main__':
  sys.exit(main())
