"""Evaluation: the multi-clip test protocol over a whole split, sharded over every device and host.

Each sample's clips go through the model, logits are turned into probabilities per clip and averaged over
clips (mmaction2 ``average_clips='prob'``). Batches are split along the ``'data'`` mesh axis; each process
feeds its own shard of the split, the final partial batch is padded and masked, and the per-sample scores are
gathered back into split order. Every sample is counted exactly once, which is checked, not assumed.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from stgcn_jax import checkpoint as ckpt_lib
from stgcn_jax import metrics as metrics_lib
from stgcn_jax import sharding as sharding_lib
from stgcn_jax import steps
from stgcn_jax.data import annotations, pipeline


class Evaluator:
  """Compiles the eval step once for a mesh and runs it over datasets."""

  def __init__(self, graphdef, mesh: Mesh):
    self.mesh = mesh
    rep, data = sharding_lib.replicated(mesh), sharding_lib.batch_sharding(mesh)
    # One device: cache-sized micro-batches on the CPU (a sharded batch is left whole).
    step = steps.make_eval_step(graphdef, micro_batch='auto' if mesh.devices.size == 1 else None)
    self._step = jax.jit(step, in_shardings=(rep, rep, data), out_shardings=(data, data))

  def predict(self, params, stats, dataset, *, feat: str, layout: Any, clip_len: int, num_clips: int,
              batch_size: int, num_workers: int = 0, num_person: int = pipeline.NUM_PERSON) -> np.ndarray:
    """Clip-averaged class probabilities ``(len(dataset), K)`` in dataset order, on every process; clips of
    ``num_person`` persons (the model's). ``batch_size`` (global, samples) is rounded up to a multiple of the
    device count (:func:`stgcn_jax.sharding.eval_batch_size`): the scores do not depend on it."""
    n_proc = jax.process_count()
    batch_size = sharding_lib.eval_batch_size(batch_size, self.mesh)
    iterator = pipeline.make_eval_iterator(
        dataset, feat=feat, layout=layout, clip_len=clip_len, num_clips=num_clips,
        batch_size=batch_size // n_proc, shard_index=jax.process_index(), shard_count=n_proc,
        num_workers=num_workers, num_person=num_person)
    scores, seen = None, np.zeros(len(dataset), np.int64)
    for local in iterator:
      # The sample indices and the padding mask travel as global arrays sharded exactly as the clips, so that
      # gathered, their rows line up with the gathered scores whatever order the mesh puts the processes'
      # devices in (a mesh may interleave processes: the global rows are then not process-major).
      batch = sharding_lib.global_batch({'keypoint': local['keypoint'],
                                         'index': np.asarray(local['index'], np.int32),
                                         'mask': np.asarray(local['mask'], np.int32)}, self.mesh)
      _, probs = self._step(params, stats, batch['keypoint'])
      probs, index, mask = (np.asarray(x) for x in multihost_utils.process_allgather(
          (probs, batch['index'], batch['mask']), tiled=True))
      mask = mask.astype(bool)
      if scores is None:
        scores = np.zeros((len(dataset), probs.shape[-1]), np.float32)
      scores[index[mask]] = probs[mask]
      np.add.at(seen, index[mask], 1)
    if scores is None or not np.all(seen == 1):
      bad = np.flatnonzero(seen != 1)[:10]
      raise RuntimeError(f'evaluation covered samples {bad.tolist()} {seen[bad].tolist()} times instead of once; '
                         'this is a bug in the eval pipeline sharding')
    return scores


def summarize(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  """top-1, top-5 (when there are at least 5 classes) and mean-class accuracy, in percent."""
  out = {'top1': 100 * metrics_lib.top_k_accuracy(scores, labels, 1),
         'mean_class': 100 * metrics_lib.mean_class_accuracy(scores, labels)}
  if scores.shape[1] >= 5:
    out['top5'] = 100 * metrics_lib.top_k_accuracy(scores, labels, 5)
  return out


@dataclasses.dataclass
class EvalResult:
  scores: np.ndarray          # (N, K) clip-averaged probabilities, in split order
  metrics: dict[str, float]   # top1 / top5 / mean_class, percent
  dataset: Any                # the SkeletonDataset evaluated
  meta: dict[str, Any]        # the checkpoint's metadata
  num_clips: int = 0          # clips per sample evaluated


def evaluate_checkpoint(checkpoint: str | os.PathLike, config: ml_collections.ConfigDict, *, split: str | None = None,
                        num_clips: int | None = None, step: int | None = None, mesh: Mesh | None = None,
                        for_dump: bool = False) -> EvalResult:
  """The test protocol for a training or converted checkpoint on the data that ``config.data`` names.

  The model (architecture, layout, classes) comes from the checkpoint; ``config.data`` gives the annotation
  file, the modality ``feat``, ``clip_len`` and the defaults for ``split`` (``test_split``) and ``num_clips``
  (``test_clips``). ``for_dump``: the scores will be written as a results file, so a split that names a
  ``frame_dir`` twice is refused before the evaluation starts. ``num_clips`` (None: the config's) must be a
  positive integer (``ValueError``).
  """
  num_clips = config.data.test_clips if num_clips is None else num_clips
  if isinstance(num_clips, bool) or not isinstance(num_clips, (int, np.integer)) or num_clips < 1:
    raise ValueError(f'num_clips must be a positive integer, got {num_clips!r} (--num_clips, or '
                     'config.data.test_clips)')
  model, meta = ckpt_lib.load_model(checkpoint, step)
  feat = config.data.feat
  if meta.get('feat') and meta['feat'] != feat:
    raise ValueError(f'{checkpoint} was trained on modality {meta["feat"]!r} but config.data.feat is {feat!r}; '
                     f'pass --config.data.feat={meta["feat"]} (or the config of that modality)')
  cfg = model.config
  dataset = annotations.load_annotations(config.data.ann_file, split=split or config.data.test_split,
                                         layout=cfg.layout, num_classes=cfg.num_classes,
                                         cache_dir=config.data.cache_dir or None)
  if for_dump:
    dataset.check_unique_frame_dirs()
  mesh = sharding_lib.make_mesh() if mesh is None else mesh
  graphdef, params, stats = steps.split_model(model)
  params, stats = sharding_lib.replicate((params, stats), mesh)
  scores = Evaluator(graphdef, mesh).predict(
      params, stats, dataset, feat=feat, layout=cfg.layout, clip_len=config.data.clip_len,
      num_clips=num_clips, batch_size=config.eval_batch_size,
      num_workers=config.data.num_workers, num_person=cfg.num_person)
  return EvalResult(scores, summarize(scores, dataset.labels), dataset, meta, int(num_clips))


def write_outputs(dump: str | os.PathLike, scores: np.ndarray, dataset, class_names, meta: dict[str, Any]
                  ) -> dict[str, str]:
  """The result dump (:mod:`stgcn_jax.results`) plus the per-class report and confusion matrix beside it."""
  from stgcn_jax import report, results as results_lib
  dump = Path(dump)
  results_lib.write_results(dump, scores=scores, labels=dataset.labels, frame_dirs=[str(f) for f in dataset.frame_dirs],
                            class_names=class_names, meta={k: v for k, v in meta.items() if k in ('feat', 'source')})
  written = report.write_report(scores, dataset.labels, class_names, report.report_prefix(dump))
  return {'dump': str(dump), **{k: str(v) for k, v in dict(written).items()}}
