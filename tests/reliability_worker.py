"""The training CLI with injected faults, started as a subprocess by tests/test_reliability.py.

    reliability_worker.py [--term-at-step K] [--enospc-at-step K] -- <python -m stgcn_jax.train arguments>

Without options it is exactly ``python -m stgcn_jax.train``. The options make a fault happen at a known point,
which a signal sent from outside cannot:

* ``--term-at-step K``: SIGTERM arrives while the K-th training step of this process runs, and two more
  SIGTERMs arrive from another thread while the checkpoint of step K is being written;
* ``--enospc-at-step K``: writing the checkpoint of step K fails with ENOSPC (a full disk).

The parent sets ``JAX_COMPILATION_CACHE_DIR`` (with ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0``) so that
restarts load the compiled steps instead of compiling them again.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import threading


def _install_faults(term_at_step: int, enospc_at_step: int) -> None:
  from stgcn_jax import checkpoint as ckpt_lib
  from stgcn_jax import sharding as sharding_lib

  real_save, real_batch = ckpt_lib.save, sharding_lib.global_batch
  batches = [0]

  def global_batch(batch, *args, **kwargs):
    if 'label' in batch:                # a training batch (evaluation batches carry no labels)
      batches[0] += 1                   # the batch of step batches[0] (1-based) of this process
      if batches[0] == term_at_step:
        os.kill(os.getpid(), signal.SIGTERM)
    return real_batch(batch, *args, **kwargs)

  def save(mngr, step, **kwargs):
    if step == enospc_at_step:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if step == term_at_step:
      # Two more SIGTERMs from another thread while the checkpoint is being written: the first lands in the
      # blocking part of the save (Orbax's Python code on the main thread), the second at the latest while the
      # asynchronous part still writes.
      timers = [threading.Timer(delay, os.kill, (os.getpid(), signal.SIGTERM)) for delay in (0.001, 0.1)]
      for t in timers:
        t.start()
      out = real_save(mngr, step, **kwargs)
      for t in timers:
        t.join()
      print(f'worker: two more SIGTERMs sent while saving step {step}', file=sys.stderr, flush=True)
      return out
    return real_save(mngr, step, **kwargs)

  ckpt_lib.save = save
  sharding_lib.global_batch = global_batch


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument('--term-at-step', type=int, default=0)
  parser.add_argument('--enospc-at-step', type=int, default=0)
  split = argv.index('--') if '--' in argv else len(argv)
  args = parser.parse_args(argv[:split])
  if args.term_at_step or args.enospc_at_step:
    _install_faults(args.term_at_step, args.enospc_at_step)
  from stgcn_jax import train
  return train.main(['stgcn_jax.train', *argv[split + 1:]])


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
