"""Small pieces for ``notebooks/evaluate_stgcnpp.ipynb``: the published STGCN++ table, downloads, checkpoint
preparation, the evaluation config and the accuracy-comparison table.

The notebook stays a sequence of library calls (convert, evaluate, fuse, report); what is here is only what
has no better home: the mmaction2 model-zoo URLs and reported numbers (SPEC §2, NTU60 XSub 2D), a download
that never leaves a partial file under the final name (an interrupted one starts again from the first byte on
the next call), "convert unless already converted", and the
``config.data`` fields that :func:`stgcn_jax.evaluate.evaluate_checkpoint` reads.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

import ml_collections

from stgcn_jax import files

__all__ = ['PublishedStream', 'PUBLISHED_NTU60_XSUB_2D', 'PUBLISHED_FUSION_NTU60_XSUB_2D', 'NTU60_2D_ANN_URL',
           'STREAM_NAMES', 'download', 'checkpoint_sources', 'prepare_checkpoint', 'eval_config', 'available_fusions',
           'accuracy_table']

_ZOO = 'https://download.openmmlab.com/mmaction/v1.0/skeleton/stgcnpp/'
NTU60_2D_ANN_URL = 'https://download.openmmlab.com/mmaction/v1.0/skeleton/data/ntu60_2d.pkl'
STREAM_NAMES = {'j': 'joint', 'b': 'bone', 'jm': 'joint-motion', 'bm': 'bone-motion'}


@dataclasses.dataclass(frozen=True)
class PublishedStream:
  """One mmaction2 model-zoo checkpoint: its modality, URL and reported 10-clip top-1 (percent)."""
  feat: str
  url: str
  top1: float


def _zoo(feat_word: str, stamp: str) -> str:
  name = f'stgcnpp_8xb16-{feat_word}-u100-80e_ntu60-xsub-keypoint-2d'
  return f'{_ZOO}{name}/{name}_{stamp}.pth'


# mmaction2 model zoo, STGCN++ on NTU60 XSub with 2D (HRNet, COCO-17) keypoints; top-1 from SPEC §2.
PUBLISHED_NTU60_XSUB_2D: dict[str, PublishedStream] = {
    'j': PublishedStream('j', _zoo('joint', '20221228-86e1e77a'), 89.29),
    'b': PublishedStream('b', _zoo('bone', '20221228-cd11a691'), 92.30),
    'jm': PublishedStream('jm', _zoo('joint-motion', '20221228-19a34aba'), 87.30),
    'bm': PublishedStream('bm', _zoo('bone-motion', '20221228-c02a0749'), 88.76),
}
# Late fusion of the single-stream scores (stgcn_jax.fusion): name -> (coefficients per feat, reported top-1).
PUBLISHED_FUSION_NTU60_XSUB_2D: dict[str, tuple[dict[str, float], float]] = {
    'two-stream (j:b = 1:1)': ({'j': 1.0, 'b': 1.0}, 92.61),
    'four-stream (j:jm:b:bm = 2:1:2:1)': ({'j': 2.0, 'jm': 1.0, 'b': 2.0, 'bm': 1.0}, 92.77),
}


def download(url: str, dest_dir: str | os.PathLike, *, filename: str | None = None, quiet: bool = False) -> Path:
  """Downloads ``url`` into ``dest_dir`` (kept if already there) and returns the file's path.

  The bytes go to a temporary file in ``dest_dir`` that is renamed into place only when complete, so an
  interrupted download is retried on the next call instead of being mistaken for a finished one.
  """
  dest_dir = Path(dest_dir).expanduser()
  name = filename or os.path.basename(urllib.parse.urlparse(url).path)
  if not name:
    raise ValueError(f'cannot tell a file name from {url!r}; pass filename=')
  path = dest_dir / name
  if path.is_file() and path.stat().st_size > 0:
    if not quiet:
      print(f'{path} already downloaded')
    return path
  dest_dir.mkdir(parents=True, exist_ok=True)
  fd, tmp = files.mkstemp(dir=dest_dir, prefix=f'.{name}.', suffix='.part')
  try:
    with os.fdopen(fd, 'wb') as out, urllib.request.urlopen(url, timeout=60) as response:
      total = int(response.headers.get('Content-Length') or 0)
      done, step = 0, max(total // 10, 1 << 20)
      next_report = step
      while chunk := response.read(1 << 20):
        out.write(chunk)
        done += len(chunk)
        if not quiet and done >= next_report:
          print(f'  {name}: {done / 2**20:.0f} / {total / 2**20:.0f} MiB' if total else f'  {name}: {done / 2**20:.0f} MiB',
                file=sys.stderr)
          next_report += step
    if total and done != total:
      raise OSError(f'{url}: received {done} of {total} bytes; run the cell again to retry')
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  if not quiet:
    print(f'downloaded {url} -> {path}')
  return path


def checkpoint_sources(checkpoint_path: str | os.PathLike | Mapping[str, str | os.PathLike], feats: Sequence[str]
                       ) -> dict[str, str | os.PathLike]:
  """The checkpoint of each stream in ``feats`` that ``CHECKPOINT_PATH`` gives: one path for every stream, or a
  dict ``{feat: path}``, which must hold every stream of ``feats`` (raises ``ValueError`` naming the missing
  ones, before anything is converted)."""
  if not isinstance(checkpoint_path, Mapping):
    return {feat: checkpoint_path for feat in feats}
  missing = [feat for feat in feats if feat not in checkpoint_path]
  if missing:
    names = ', '.join(f'{feat!r} ({STREAM_NAMES.get(feat, feat)})' for feat in missing)
    raise ValueError(f'CHECKPOINT_PATH has no checkpoint for stream{"s" if len(missing) > 1 else ""} {names} of '
                     f'FEATS = {list(feats)}; it has {sorted(checkpoint_path)}. Add '
                     f'{", ".join(f"{feat!r}: path" for feat in missing)} to CHECKPOINT_PATH, or set FEATS to the '
                     'streams it has')
  return {feat: checkpoint_path[feat] for feat in feats}


def prepare_checkpoint(path: str | os.PathLike, out_dir: str | os.PathLike, *, feat: str) -> Path:
  """A stgcn_jax checkpoint directory for ``path``, evaluated as modality ``feat``.

  ``path`` is an mmaction2/pyskl ``.pth`` (converted into ``out_dir`` with :func:`stgcn_jax.convert.
  convert_checkpoint`, recording ``feat``; a conversion already in ``out_dir`` with the same source and
  ``feat`` is reused, so re-running a notebook cell does not fail) or an existing stgcn_jax checkpoint
  directory (returned as it is; its recorded modality must be ``feat`` or unknown).

  Raises:
    FileNotFoundError: ``path`` does not exist.
    ValueError: a directory trained on another modality, or ``out_dir`` holding another conversion.
  """
  from stgcn_jax import checkpoint as ckpt_lib
  from stgcn_jax import convert

  path, out_dir = Path(path).expanduser(), Path(out_dir).expanduser()
  if path.is_dir():
    _, meta = ckpt_lib.read_meta(path)
    if meta.get('feat') not in (None, feat):
      raise ValueError(f'{path} holds a {STREAM_NAMES.get(meta["feat"], meta["feat"])} model (feat '
                       f'{meta["feat"]!r}) but stream {feat!r} was asked for; give one checkpoint per stream '
                       "(CHECKPOINT_PATH = {'j': ..., 'b': ...}) or the .pth file to convert")
    return path
  if not path.is_file():
    raise FileNotFoundError(f'checkpoint {str(path)!r} does not exist; give a .pth file or a converted directory')
  if out_dir.exists():
    _, meta = ckpt_lib.read_meta(out_dir)
    if meta.get('source') == str(path.absolute()) and meta.get('feat') == feat:
      print(f'{out_dir}: already converted from {path.name} (feat {feat!r})')
      return out_dir
    raise ValueError(f'{out_dir} holds a conversion of {meta.get("source")} (feat {meta.get("feat")!r}), not of '
                     f'{path} (feat {feat!r}); remove it or choose another WORK_DIR')
  result = convert.convert_checkpoint(path, out_dir, feat=feat)
  print(result.summary())
  return result.out_dir


def eval_config(ann_file: str | os.PathLike, feat: str, *, split: str = 'xsub_val', num_clips: int = 10,
                clip_len: int = 100, batch_size: int = 64, num_workers: int = 2, cache_dir: str = ''
                ) -> ml_collections.ConfigDict:
  """The fields of ``configs/base.py`` that :func:`stgcn_jax.evaluate.evaluate_checkpoint` reads.

  Defaults are the published test protocol: 10 clips of 100 frames on ``xsub_val``. ``batch_size`` is global
  (samples, each with ``num_clips`` clips); the evaluation rounds it up to a multiple of the device count.
  ``num_clips``, ``clip_len`` and ``batch_size`` must be positive integers (``ValueError``).
  """
  if feat not in STREAM_NAMES:
    raise ValueError(f'feat must be one of {sorted(STREAM_NAMES)} (joint, bone, joint motion, bone motion), got '
                     f'{feat!r}')
  for name, value in (('num_clips', num_clips), ('clip_len', clip_len), ('batch_size', batch_size)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f'{name} must be a positive integer, got {value!r}')
  return ml_collections.ConfigDict(dict(
      data=dict(ann_file=str(ann_file), feat=feat, clip_len=int(clip_len), test_split=split,
                test_clips=int(num_clips), cache_dir=str(cache_dir), num_workers=int(num_workers)),
      eval_batch_size=int(batch_size)))


def available_fusions(feats: Sequence[str]) -> dict[str, dict[str, float]]:
  """The published fusions whose streams are all in ``feats``: name -> coefficients per feat."""
  return {name: coefs for name, (coefs, _) in PUBLISHED_FUSION_NTU60_XSUB_2D.items() if set(coefs) <= set(feats)}


def accuracy_table(rows: Sequence[tuple[str, float | None, Mapping[str, float]]]) -> str:
  """A markdown table of ``(name, published top-1 or None, our accuracy_summary)`` rows, in percent.

  Columns: model, published top-1, our top-1, difference (ours - published), our top-5, mean-class accuracy.
  """
  lines = ['| model | published top-1 | our top-1 | difference | our top-5 | mean class |',
           '|---|---:|---:|---:|---:|---:|']
  for name, published, acc in rows:
    pub = '' if published is None else f'{published:.2f}'
    diff = '' if published is None else f'{acc["top1"] - published:+.2f}'
    top5 = f'{acc["top5"]:.2f}' if 'top5' in acc else 'n/a'
    lines.append(f'| {name} | {pub} | {acc["top1"]:.2f} | {diff} | {top5} | {acc["mean_class"]:.2f} |')
  return '\n'.join(lines)
