"""Skeleton layouts, adjacency matrices and bone pairs.

Mirrors mmaction2's ``mmaction.models.utils.graph.Graph`` (and pyskl's ``pyskl.utils.graph``):

* ``mode='spatial'`` (STGCN++): ``A = stack(I, norm(inward), norm(outward))`` with ``A[j, i] = 1`` for an
  edge ``(i, j)`` and ``norm(A) = A @ D^-1``, ``D`` the column sums (all-zero columns stay zero).
* ``mode='stgcn_spatial'`` (the original ST-GCN partitioning): the 1-hop neighbourhood split into the
  root, the joints closer to the centre and the joints further from it.

Every layout is a :class:`Layout`: the number of joints ``V``, the inward edges ``(child, parent)`` and the
centre joint. The built-in layouts live in one dict literal, :data:`LAYOUTS`; a user-defined skeleton is a
``Layout(num_node, inward, center)`` or a mapping with those keys.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

Edge = tuple[int, int]


@dataclasses.dataclass(frozen=True)
class Layout:
  """A skeleton: ``num_node`` joints, ``inward`` edges ``(child, parent)`` and the ``center`` joint.

  ``bones`` optionally overrides the bone pairs ``(v1, v2)`` (``bone[v1] = x[v1] - x[v2]``); by default each
  inward edge gives ``(child, parent)`` and the centre gives ``(center, center)``.

  ``zaxis`` and ``xaxis`` are the joints 3D pre-normalisation (mmaction2's ``PreNormalize3D``) aligns, from the
  first frame: ``x[zaxis[1]] - x[zaxis[0]]`` (bottom to top of the spine) turned to +z, then
  ``x[xaxis[0]] - x[xaxis[1]]`` (left to right shoulder) to +x. ``None`` is mmaction2's default, ``(0, 1)``
  and ``(8, 4)`` (NTU RGB+D's hip, spine and shoulders); ``()`` skips that rotation (``align_spine=False`` /
  ``align_shoulder=False``). 2D data does not use them.
  """

  name: str
  num_node: int
  inward: tuple[Edge, ...]
  center: int
  bones: tuple[Edge, ...] | None = None
  zaxis: Edge | tuple[()] | None = None
  xaxis: Edge | tuple[()] | None = None

  def __post_init__(self):
    _validate(self)

  @property
  def outward(self) -> tuple[Edge, ...]:
    return tuple((j, i) for i, j in self.inward)

  @property
  def bone_pairs(self) -> tuple[Edge, ...]:
    """Bone pairs ``(v1, v2)``; ``bone[v1] = x[v1] - x[v2]``. Every joint appears once as ``v1``."""
    if self.bones is not None:
      return self.bones
    pairs = dict(self.inward)
    pairs[self.center] = self.center
    if len(pairs) != self.num_node or len(self.inward) != self.num_node - 1:
      raise ValueError(f'skeleton layout {self.name!r}: the inward edges do not form a tree rooted at the '
                       f'centre {self.center}, so bone pairs cannot be derived; give bones=[(v1, v2), ...]')
    return tuple(sorted(pairs.items()))

  def align_3d(self) -> tuple[Edge | tuple[()], Edge | tuple[()]]:
    """``(zaxis, xaxis)`` of 3D pre-normalisation with the defaults filled in; ``ValueError`` when a default
    names joints this layout does not have."""
    axes = []
    for key, default in DEFAULT_ALIGN_3D.items():
      axis = getattr(self, key)
      if axis is None and max(default) >= self.num_node:
        raise ValueError(f'skeleton layout {self.name!r}: 3D pre-normalisation aligns joints {key}={default} by '
                         f"default (NTU RGB+D's), but the layout has {self.num_node} joints; give the layout "
                         f'{key}=(joint, joint) for this skeleton, or {key}=() to skip that rotation')
      axes.append(default if axis is None else axis)
    return axes[0], axes[1]


# mmaction2 PreNormalize3D's defaults: NTU RGB+D's hip -> spine, and right -> left shoulder.
DEFAULT_ALIGN_3D = {'zaxis': (0, 1), 'xaxis': (8, 4)}


def _validate(layout: Layout) -> None:
  v = layout.num_node
  where = f'skeleton layout {layout.name!r}'
  if not isinstance(v, (int, np.integer)) or v < 1:
    raise ValueError(f'{where}: num_node must be a positive integer, got {v!r}')
  if not 0 <= layout.center < v:
    raise ValueError(f'{where}: center {layout.center} is out of range for {v} joints; use 0..{v - 1}')
  seen = set()
  for edge in layout.inward:
    if len(edge) != 2:
      raise ValueError(f'{where}: edge {edge!r} is not a (child, parent) pair')
    i, j = edge
    if not (0 <= i < v and 0 <= j < v):
      raise ValueError(f'{where}: edge {edge} has a joint index out of range for {v} joints (0..{v - 1})')
    if i == j:
      raise ValueError(f'{where}: edge {edge} is a self loop; self links are added automatically')
    key = frozenset(edge)
    if key in seen:
      raise ValueError(f'{where}: duplicate edge {edge} (an edge may appear once, in either direction)')
    seen.add(key)
  # Every joint must be reachable from the centre, otherwise it never exchanges information.
  neighbours = {i: set() for i in range(v)}
  for i, j in layout.inward:
    neighbours[i].add(j)
    neighbours[j].add(i)
  reached, frontier = {layout.center}, [layout.center]
  while frontier:
    nxt = [n for f in frontier for n in neighbours[f] if n not in reached]
    reached.update(nxt)
    frontier = nxt
  missing = sorted(set(range(v)) - reached)
  if missing:
    raise ValueError(f'{where}: joints {missing} are not connected to the centre joint {layout.center}; '
                     'add edges that link them to the skeleton')
  for key in ('zaxis', 'xaxis'):
    axis = getattr(layout, key)
    if axis is not None and axis != () and (len(axis) != 2 or axis[0] == axis[1]
                                            or not all(0 <= j < v for j in axis)):
      raise ValueError(f'{where}: {key}={axis!r} must be two different joints in 0..{v - 1}, () to skip that '
                       '3D rotation, or None for the default')
  if layout.bones is not None:
    firsts = sorted(b[0] for b in layout.bones)
    if firsts != list(range(v)) or any(not 0 <= b[1] < v for b in layout.bones):
      raise ValueError(f'{where}: bone pairs must name every joint 0..{v - 1} exactly once as v1, with v2 in range')


def _one_based(edges: Sequence[Edge]) -> tuple[Edge, ...]:
  return tuple((i - 1, j - 1) for i, j in edges)


# The built-in layouts. nturgb+d edges are given 1-based in the Kinect documentation and in the references.
LAYOUTS: dict[str, Layout] = {
    'coco': Layout(
        name='coco', num_node=17, center=0,
        inward=((15, 13), (13, 11), (16, 14), (14, 12), (11, 5), (12, 6), (9, 7), (7, 5), (10, 8), (8, 6),
                (5, 0), (6, 0), (1, 0), (3, 1), (2, 0), (4, 2)),
        bones=((0, 0), (1, 0), (2, 0), (3, 1), (4, 2), (5, 0), (6, 0), (7, 5), (8, 6), (9, 7), (10, 8),
               (11, 0), (12, 0), (13, 11), (14, 12), (15, 13), (16, 14))),
    'nturgb+d': Layout(
        name='nturgb+d', num_node=25, center=21 - 1,
        inward=_one_based(((1, 2), (2, 21), (3, 21), (4, 3), (5, 21), (6, 5), (7, 6), (8, 7), (9, 21),
                           (10, 9), (11, 10), (12, 11), (13, 1), (14, 13), (15, 14), (16, 15), (17, 1),
                           (18, 17), (19, 18), (20, 19), (22, 8), (23, 8), (24, 12), (25, 12))),
        # mmaction2's JointToBone pairs: joint 21 takes its bone from 22 and 23 from 24 (not from the hand).
        bones=((0, 1), (1, 20), (2, 20), (3, 2), (4, 20), (5, 4), (6, 5), (7, 6), (8, 20), (9, 8), (10, 9),
               (11, 10), (12, 0), (13, 12), (14, 13), (15, 14), (16, 0), (17, 16), (18, 17), (19, 18),
               (21, 22), (20, 20), (22, 7), (23, 24), (24, 11))),
    'openpose': Layout(
        name='openpose', num_node=18, center=1,
        inward=((4, 3), (3, 2), (7, 6), (6, 5), (13, 12), (12, 11), (10, 9), (9, 8), (11, 5), (8, 2), (5, 1),
                (2, 1), (0, 1), (15, 0), (14, 0), (17, 15), (16, 14)),
        bones=((0, 0), (1, 0), (2, 1), (3, 2), (4, 3), (5, 1), (6, 5), (7, 6), (8, 2), (9, 8), (10, 9),
               (11, 5), (12, 11), (13, 12), (14, 0), (15, 0), (16, 14), (17, 15))),
    'handmp': Layout(
        name='handmp', num_node=21, center=0,
        inward=((1, 0), (2, 1), (3, 2), (4, 3), (5, 0), (6, 5), (7, 6), (8, 7), (9, 0), (10, 9), (11, 10),
                (12, 11), (13, 0), (14, 13), (15, 14), (16, 15), (17, 0), (18, 17), (19, 18), (20, 19))),
}

MODES = ('spatial', 'stgcn_spatial')


def get_layout(layout: str | Layout | Mapping) -> Layout:
  """Returns a :class:`Layout` from a built-in name, a ``Layout`` or a mapping ``{num_node, inward, center}``."""
  if isinstance(layout, Layout):
    return layout
  if isinstance(layout, str):
    if layout not in LAYOUTS:
      raise ValueError(f'unknown skeleton layout {layout!r}; use one of {sorted(LAYOUTS)} or a user-defined '
                       'layout given as dict(num_node=..., inward=[(child, parent), ...], center=...)')
    return LAYOUTS[layout]
  if isinstance(layout, Mapping):
    unknown = set(layout) - {'name', 'num_node', 'inward', 'center', 'bones', 'zaxis', 'xaxis'}
    missing = {'num_node', 'inward', 'center'} - set(layout)
    if unknown or missing:
      raise ValueError(f'a user-defined layout needs keys num_node, inward, center (optional name, bones, zaxis, '
                       f'xaxis); missing {sorted(missing)}, unknown {sorted(unknown)}')
    bones = layout.get('bones')
    axes = {k: None if layout.get(k) is None else tuple(int(j) for j in layout[k]) for k in ('zaxis', 'xaxis')}
    return Layout(name=str(layout.get('name', 'custom')), num_node=int(layout['num_node']),
                  inward=tuple((int(i), int(j)) for i, j in layout['inward']), center=int(layout['center']),
                  bones=None if bones is None else tuple((int(i), int(j)) for i, j in bones), **axes)
  raise TypeError(f'layout must be a name, a Layout or a mapping, got {type(layout).__name__}')


def edge2mat(edges: Sequence[Edge], num_node: int) -> np.ndarray:
  """``A[j, i] = 1`` for every edge ``(i, j)``."""
  a = np.zeros((num_node, num_node))
  for i, j in edges:
    a[j, i] = 1
  return a


def normalize_digraph(a: np.ndarray) -> np.ndarray:
  """``A @ D^-1`` with ``D`` the column sums; all-zero columns stay zero."""
  col = a.sum(0)
  inv = np.divide(1.0, col, out=np.zeros_like(col), where=col > 0)
  return a * inv[None, :]


def hop_distance(num_node: int, edges: Sequence[Edge], max_hop: int = 1) -> np.ndarray:
  """Hop distance between joints, ``inf`` beyond ``max_hop`` (as in the references)."""
  a = np.eye(num_node)
  for i, j in edges:
    a[i, j] = a[j, i] = 1
  dist = np.full((num_node, num_node), np.inf)
  reach = [np.linalg.matrix_power(a, d) > 0 for d in range(max_hop + 1)]
  for d in range(max_hop, -1, -1):
    dist[reach[d]] = d
  return dist


def adjacency(layout: str | Layout | Mapping, mode: str = 'spatial', max_hop: int = 1) -> np.ndarray:
  """The adjacency stack ``A`` of shape ``(K, V, V)`` in float32 (``A[k, v, w]``: from joint v to joint w)."""
  layout = get_layout(layout)
  v = layout.num_node
  if mode == 'spatial':
    a = np.stack([np.eye(v), normalize_digraph(edge2mat(layout.inward, v)),
                  normalize_digraph(edge2mat(layout.outward, v))])
  elif mode == 'stgcn_spatial':
    hop = hop_distance(v, layout.inward, max_hop)
    norm = normalize_digraph((hop <= max_hop).astype(np.float64))
    subsets = []
    for h in range(max_hop + 1):
      on = hop == h                                     # on[j, i]: j and i are h hops apart
      closer = hop[:, layout.center][:, None] >= hop[:, layout.center][None, :]  # [j, i]: d(j,c) >= d(i,c)
      subsets.append(np.where(on & closer, norm, 0.0))
      if h > 0:
        subsets.append(np.where(on & ~closer, norm, 0.0))
    a = np.stack(subsets)
  else:
    raise ValueError(f'unknown adjacency mode {mode!r}; use one of {MODES}')
  return a.astype(np.float32)
