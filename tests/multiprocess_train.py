"""One process of a multi-process training run on CPU (gloo collectives), started by tests/test_train.py.

    multiprocess_train.py COORDINATOR NUM_PROCESSES PROCESS_ID ANN_FILE WORKDIR CONFIG_OVERRIDES_JSON
"""

import json
import sys

from stgcn_jax import sharding, train
from tests.train_utils import tiny_config


def main(coordinator, num_processes, process_id, ann_file, workdir, overrides):
  sharding.maybe_initialize_distributed(coordinator, int(num_processes), int(process_id))
  out = train.train_and_evaluate(tiny_config(ann_file, **json.loads(overrides)), workdir)
  print('done', out['step'], out.get('val'))


if __name__ == '__main__':
  main(*sys.argv[1:])
