"""Per-class evaluation report: accuracy table (CSV + markdown), confusion-matrix and per-class accuracy images.

Written next to a results dump by ``stgcn_jax.test`` (or from any dump: ``write_report(*load(...))``), with
the NTU60/NTU120 action names of :mod:`stgcn_jax.labels` when no names are given. For ``out`` =
``work/result`` (a prefix) the files are::

    work/result_per_class.csv       class, name, samples, correct, accuracy (fraction), most confused with
    work/result_per_class.md        the same, worst class first, under the overall top-1/top-5/mean-class
    work/result_confusion.png       confusion matrix, rows normalised (row t = where class t's samples went)
    work/result_per_class.png       horizontal bar per class, sorted by accuracy, mean-class line

When ``out`` is an existing directory (or ends with a path separator) the files are ``<out>/per_class.csv``
etc. Accuracies are top-1 from the argmax of the scores, as :func:`stgcn_jax.metrics.per_class_accuracy`;
classes with no sample in the split have an empty accuracy and are left out of the mean.

Images use matplotlib's Agg canvas directly (no pyplot, so the caller's backend and figures are untouched),
and stay readable for 60 and 120 classes: per-cell counts only up to 30 classes, class names on both axes in
a font that shrinks with the class count.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence

import numpy as np

from stgcn_jax import labels as labels_lib
from stgcn_jax import metrics

__all__ = ['ClassTable', 'class_table', 'write_report', 'report_prefix']

_CELL_TEXT_MAX_CLASSES = 30   # above this, numbers in cells are unreadable
_NAME_CHARS = 32              # long NTU names ("finger-guessing game (playing rock-paper-scissors)") are cut


class ClassTable:
  """Per-class counts: ``count[k]`` samples of class k, ``correct[k]`` of them predicted k, ``accuracy[k]``
  (NaN when ``count[k] == 0``), ``confused[k]`` the most frequent wrong prediction (-1 if none) and
  ``confused_count[k]`` how often; ``cm`` the (K, K) confusion matrix ``cm[true, pred]``."""

  def __init__(self, scores, labels):
    scores = np.asarray(scores)
    self.summary = metrics.accuracy_summary(scores, labels)  # validates scores and labels
    self.cm = metrics.confusion_matrix(metrics.predictions(scores), labels, scores.shape[1])
    self.count = self.cm.sum(axis=1)
    self.correct = np.diag(self.cm).copy()
    self.accuracy = metrics.per_class_accuracy(scores, labels)
    off = self.cm.copy()
    np.fill_diagonal(off, 0)
    self.confused = np.where(off.max(axis=1) > 0, off.argmax(axis=1), -1)
    self.confused_count = off.max(axis=1)

  @property
  def num_classes(self) -> int:
    return int(self.cm.shape[0])


def class_table(scores, labels) -> ClassTable:
  """:class:`ClassTable` of ``scores`` (N, K) and ``labels`` (N,)."""
  return ClassTable(scores, labels)


def report_prefix(dump_path: str | os.PathLike) -> str:
  """The report prefix beside a dump: ``work/result.pkl`` -> ``work/result``."""
  root, ext = os.path.splitext(os.fspath(dump_path))
  return root if ext in ('.pkl', '.pickle') else os.fspath(dump_path)


def _names(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
  if class_names is None:
    class_names = labels_lib.class_names(num_classes) or [f'class {k}' for k in range(num_classes)]
  class_names = [str(c) for c in class_names]
  if len(class_names) != num_classes:
    raise ValueError(f'{len(class_names)} class names given but the scores have {num_classes} classes')
  return class_names


def _short(name: str) -> str:
  return name if len(name) <= _NAME_CHARS else name[:_NAME_CHARS - 1] + '…'


def _paths(out: str | os.PathLike) -> dict[str, str]:
  out = os.fspath(out)
  if os.path.isdir(out) or out.endswith((os.sep, '/')):
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, '')
  else:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    stem = out + '_'
  return {'csv': stem + 'per_class.csv', 'markdown': stem + 'per_class.md',
          'confusion_png': stem + 'confusion.png', 'accuracy_png': stem + 'per_class.png'}


def _write_csv(path: str, table: ClassTable, names: list[str]) -> None:
  with open(path, 'w', newline='', encoding='utf-8') as f:
    w = csv.writer(f)
    w.writerow(['class', 'name', 'samples', 'correct', 'accuracy', 'most_confused_with', 'confused_count'])
    for k in range(table.num_classes):
      acc = '' if np.isnan(table.accuracy[k]) else repr(float(table.accuracy[k]))  # repr: exact round trip
      c = int(table.confused[k])
      w.writerow([k, names[k], int(table.count[k]), int(table.correct[k]), acc,
                  names[c] if c >= 0 else '', int(table.confused_count[k])])


def _order_by_accuracy(table: ClassTable) -> list[int]:
  """Worst class first; ties by class index; classes absent from the split last."""
  present = [k for k in range(table.num_classes) if table.count[k] > 0]
  absent = [k for k in range(table.num_classes) if table.count[k] == 0]
  return sorted(present, key=lambda k: (table.accuracy[k], k)) + absent


def _write_markdown(path: str, table: ClassTable, names: list[str]) -> None:
  s = table.summary
  top5 = f'{s["top5"]:.2f}%' if 'top5' in s else 'n/a'
  lines = [f'# Per-class accuracy ({int(table.count.sum())} samples, {table.num_classes} classes)', '',
           f'top-1 {s["top1"]:.2f}% · top-5 {top5} · mean class {s["mean_class"]:.2f}%', '',
           '| rank | class | name | samples | correct | accuracy | most confused with |',
           '|---:|---:|:---|---:|---:|---:|:---|']
  for rank, k in enumerate(_order_by_accuracy(table), 1):
    acc = '—' if table.count[k] == 0 else f'{100 * table.accuracy[k]:.2f}%'
    c = int(table.confused[k])
    confused = f'{names[c]} ({int(table.confused_count[k])})' if c >= 0 else ''
    name = names[k].replace('|', '\\|')
    lines.append(f'| {rank} | {k} | {name} | {int(table.count[k])} | {int(table.correct[k])} | {acc} | '
                 f'{confused.replace("|", chr(92) + "|")} |')
  with open(path, 'w', encoding='utf-8') as f:
    f.write('\n'.join(lines) + '\n')


def _font_size(num_classes: int) -> float:
  # Rows are ~0.15 in (~11 pt) apart at 60+ classes: 5 pt names at 120 classes still leave a gap.
  return float(np.clip(450 / max(num_classes, 1), 5, 9))


def _save(fig, path: str, dpi: int) -> None:
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  FigureCanvasAgg(fig)
  fig.savefig(path, dpi=dpi)


def _plot_confusion(path: str, table: ClassTable, names: list[str], dpi: int) -> None:
  from matplotlib.figure import Figure
  k = table.num_classes
  with np.errstate(invalid='ignore', divide='ignore'):
    norm = np.where(table.count[:, None] > 0, table.cm / table.count[:, None], 0.0)
  side = float(np.clip(0.16 * k + 3.5, 6, 26))  # inches: ~0.16 in per class keeps 5 pt labels apart
  fig = Figure(figsize=(side + 1.2, side), layout='constrained')
  ax = fig.add_subplot()
  im = ax.imshow(norm, cmap='Blues', vmin=0, vmax=1, interpolation='nearest')
  fs = _font_size(k)
  labels = [f'{i} {_short(n)}' for i, n in enumerate(names)]
  ax.set_xticks(range(k), labels, rotation=90, fontsize=fs)
  ax.set_yticks(range(k), labels, fontsize=fs)
  ax.set_xlabel('predicted class')
  ax.set_ylabel('true class')
  s = table.summary
  ax.set_title(f'Confusion matrix (rows normalised), top-1 {s["top1"]:.2f}%, mean class {s["mean_class"]:.2f}%')
  if k <= _CELL_TEXT_MAX_CLASSES:
    for t in range(k):
      for p in range(k):
        if table.cm[t, p]:
          ax.text(p, t, str(int(table.cm[t, p])), ha='center', va='center', fontsize=fs,
                  color='white' if norm[t, p] > 0.5 else 'black')
  fig.colorbar(im, ax=ax, shrink=0.6, label='fraction of the true class')
  _save(fig, path, dpi)


def _plot_accuracy(path: str, table: ClassTable, names: list[str], dpi: int) -> None:
  from matplotlib.figure import Figure
  # barh draws row 0 at the bottom: reversed, the worst class ends up on top
  order = [k for k in _order_by_accuracy(table) if table.count[k] > 0][::-1]
  n = len(order)
  fig = Figure(figsize=(8, float(np.clip(0.14 * n + 1.5, 3, 20))), layout='constrained')
  ax = fig.add_subplot()
  acc = 100 * table.accuracy[order]
  ax.barh(range(n), acc, color=np.where(acc >= table.summary['mean_class'], '#4c72b0', '#dd8452'))
  ax.set_yticks(range(n), [f'{k} {_short(names[k])}' for k in order], fontsize=_font_size(n))
  ax.set_ylim(-0.5, n - 0.5)
  ax.set_xlim(0, 100)
  ax.axvline(table.summary['mean_class'], color='black', linewidth=0.8, linestyle='--',
             label=f'mean class {table.summary["mean_class"]:.2f}%')
  ax.set_xlabel('top-1 accuracy (%)')
  ax.set_title('Per-class accuracy')
  ax.legend(loc='lower right', fontsize=8)
  _save(fig, path, dpi)


def write_report(scores, labels, class_names: Sequence[str] | None, out_dir_or_prefix: str | os.PathLike, *,
                 dpi: int = 150) -> dict[str, str]:
  """Writes the per-class table (CSV, markdown) and the two PNGs; returns ``{kind: path}``.

  ``scores`` (N, K), ``labels`` (N,) as in :mod:`stgcn_jax.metrics`; ``class_names`` (K,) or None for the
  built-in NTU60/NTU120 names (``'class k'`` for other class counts). Kinds: ``csv``, ``markdown``,
  ``confusion_png``, ``accuracy_png``. ``dpi`` 150 keeps the 5 pt class names of a 120-class matrix legible.
  """
  table = ClassTable(scores, labels)
  names = _names(class_names, table.num_classes)
  paths = _paths(out_dir_or_prefix)
  _write_csv(paths['csv'], table, names)
  _write_markdown(paths['markdown'], table, names)
  _plot_confusion(paths['confusion_png'], table, names, dpi)
  _plot_accuracy(paths['accuracy_png'], table, names, dpi)
  return paths


def plot_training_curves(metrics_jsonl: str | os.PathLike, out_png: str | os.PathLike, *, dpi: int = 120) -> str:
  """Loss and learning rate per logged step, and validation accuracy per evaluation, from ``metrics.jsonl``."""
  import json

  from matplotlib.figure import Figure
  records = [json.loads(line) for line in open(metrics_jsonl, encoding='utf-8') if line.strip()]
  train = [r for r in records if 'loss' in r]
  val = [r for r in records if 'val_top1' in r]
  fig = Figure(figsize=(10, 3.5), layout='constrained')
  ax_loss, ax_lr, ax_acc = fig.subplots(1, 3)
  ax_loss.plot([r['step'] for r in train], [r['loss'] for r in train])
  ax_loss.set(xlabel='step', ylabel='training loss', title='Loss')
  ax_lr.plot([r['step'] for r in train], [r['lr'] for r in train])
  ax_lr.set(xlabel='step', ylabel='learning rate', title='Learning rate')
  for key, label in (('val_top1', 'top-1'), ('val_top5', 'top-5'), ('val_mean_class', 'mean class')):
    points = [(r['step'], r[key]) for r in val if key in r]
    if points:
      ax_acc.plot(*zip(*points), marker='o', label=label)
  ax_acc.set(xlabel='step', ylabel='accuracy (%)', title='Validation', ylim=(0, 100))
  if val:
    ax_acc.legend(fontsize=8)
  _save(fig, str(out_png), dpi)
  return str(out_png)
