"""One process of a multi-process evaluation on CPU (gloo collectives), started by tests/test_evaluate.py.

    multiprocess_eval.py COORDINATOR NUM_PROCESSES PROCESS_ID ANN_FILE OUT_NPZ

The mesh interleaves the processes' devices (process 0's first device, process 1's first, ..., then each one's
second), as ``jax.make_mesh`` may order them on multi-host pods: the global rows of a batch are then not
process-major. Process 0 writes the scores to ``OUT_NPZ``.
"""

import sys

import jax
import numpy as np
from jax.sharding import Mesh

from stgcn_jax import evaluate, sharding, steps
from stgcn_jax.data import annotations
from tests.train_utils import tiny_config


def model_state(ann_file):
  """The tiny test model with a sharpened head, so that every sample's scores differ clearly."""
  from stgcn_jax import train
  config = tiny_config(ann_file)
  mcfg = train.model_config(config)
  model = train.build_model(mcfg, seed=0)
  model.cls_head.fc.kernel[...] = model.cls_head.fc.kernel[...] * 1000
  graphdef, params, stats = steps.split_model(model)
  dataset = annotations.load_annotations(config.data.ann_file, split='xsub_val', layout=mcfg.layout,
                                         num_classes=mcfg.num_classes, use_cache=False)
  return graphdef, params, stats, dataset, mcfg


def interleaved_mesh() -> Mesh:
  by_process = [[d for d in jax.devices() if d.process_index == p] for p in range(jax.process_count())]
  order = [devices[i] for i in range(len(by_process[0])) for devices in by_process]
  kwargs = {'axis_types': (jax.sharding.AxisType.Auto,)} if hasattr(jax.sharding, 'AxisType') else {}
  return Mesh(np.array(order), (sharding.DATA_AXIS,), **kwargs)


def main(coordinator, num_processes, process_id, ann_file, out):
  sharding.maybe_initialize_distributed(coordinator, int(num_processes), int(process_id))
  graphdef, params, stats, dataset, mcfg = model_state(ann_file)
  mesh = interleaved_mesh()
  assert [d.process_index for d in mesh.devices.flat] != sorted(d.process_index for d in mesh.devices.flat)
  params, stats = sharding.replicate((params, stats), mesh)
  scores = evaluate.Evaluator(graphdef, mesh).predict(
      params, stats, dataset, feat='j', layout=mcfg.layout, clip_len=16, num_clips=1, batch_size=4,
      num_person=mcfg.num_person)
  if jax.process_index() == 0:
    np.savez(out, scores=scores)
  print('done', scores.shape)


if __name__ == '__main__':
  main(*sys.argv[1:])
