"""Small annotation files and a tiny config for training tests (CPU, seconds per run)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from configs import base


def write_random_annotations(path: Path, *, num_train: int = 24, num_val: int = 11, num_classes: int = 4,
                             seed: int = 0) -> Path:
  """A 2D COCO-17 annotation file with class-dependent motion (learnable) and varied lengths / persons."""
  rng = np.random.default_rng(seed)
  anns, split = [], {'xsub_train': [], 'xsub_val': []}
  for i in range(num_train + num_val):
    label = i % num_classes
    t = int(rng.integers(12, 40))
    m = 1 + int(rng.integers(0, 2))
    phase = np.arange(t) * (0.2 + 0.15 * label)
    base_pose = rng.uniform(300, 700, size=(1, 1, 17, 2))
    wave = 60 * np.stack([np.sin(phase + label), np.cos(phase * (1 + label % 2))], -1)[None, :, None, :]
    kp = base_pose + wave * (np.arange(17) % (label + 2) == 0)[None, None, :, None] + rng.normal(0, 5, (m, t, 17, 2))
    name = f'S{i:03d}_A{label:03d}'
    anns.append({'frame_dir': name, 'label': label, 'img_shape': (1080, 1920), 'original_shape': (1080, 1920),
                 'total_frames': t, 'keypoint': kp.astype(np.float32),
                 'keypoint_score': rng.uniform(0.5, 1, (m, t, 17)).astype(np.float32)})
    split['xsub_train' if i < num_train else 'xsub_val'].append(name)
  with open(path, 'wb') as f:
    pickle.dump({'split': split, 'annotations': anns}, f, protocol=4)
  return path


def tiny_config(ann_file: Path, **overrides):
  """The base recipe on a 4-stage, 8-channel STGCN++ with 16-frame clips."""
  config = base.get_config()
  config.model.update(dict(num_classes=4, base_channels=8, num_stages=4, inflate_stages=(3,), down_stages=(3,)))
  config.data.update(dict(ann_file=str(ann_file), clip_len=16, train_repeat=1, num_workers=0,
                          cache_dir=str(Path(ann_file).parent / 'cache')))
  config.update(dict(batch_size=8, eval_batch_size=8, bn_group_size=4, num_epochs=2, log_every_steps=1,
                     async_checkpointing=False))
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split('.')
    for p in parents:
      target = target[p]
    target[leaf] = value
  return config
