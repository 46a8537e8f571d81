"""The embedded demo dataset: synthetic skeleton actions in the NTU annotation format, generated on first use.

A newcomer without the NTU download still gets a real learning problem. :func:`generate_demo_dataset`
animates a kinematic 3D body model (bone lengths scaled by a random body size, joint angles that are
functions of time) through eight actions (:data:`DEMO_CLASSES`), places it in a scene, and writes an
annotation pickle in exactly the mmaction2/pyskl ``PoseDataset`` format that
:func:`stgcn_jax.data.annotations.load_annotations` reads:

* ``kind='2d'``: the COCO-17 layout (``layout='coco'``), pixel coordinates of a perspective camera in a
  1080x1920 image, with ``keypoint_score``, as a pose detector would give them;
* ``kind='3d'``: the NTU RGB+D 25-joint layout (``layout='nturgb+d'``), metres in a Kinect-like camera
  frame (x to the sensor's left, y up, z away from the sensor), no score.

The file is ``{'split': {'xsub_train': [...], 'xsub_val': [...]}, 'annotations': [...], 'demo_meta': {...}}``.
Each annotation has ``frame_dir``, ``label``, ``img_shape``, ``original_shape``, ``total_frames`` and float32
``keypoint`` ``(M, T, V, C)`` (plus float32 ``keypoint_score`` ``(M, T, V)`` for 2D). An absent joint (2D),
and a frame in which a person is absent, are exact zeros (score 0), as the detectors and the published
pickles store them. ``demo_meta`` (ignored by the loader) records the generator version and arguments, so
:func:`ensure_demo_dataset` can tell a current demo file from a stale one.

**Why it is not trivially separable.** Every sample draws its own nuisances: speed (frequency x0.8-1.25),
phase and drift, amplitude, body size and proportions, start frame (an idle lead-in of up to an eighth of the
sequence, sometimes an idle tail), sequence length (40-120 frames at 30 fps), left/right handedness (waving,
kicking), how much the idle limbs move, per-joint jitter, and in a quarter of the samples a second person who
idles or does the same action (the actor is not always person 0). The spatial ones (:data:`_NUISANCE`:
position, distance, facing direction, camera height, tilt and focal length, missing joints and lost frames)
are deliberately mild: STGCN++ sees 2D joints in image coordinates (``PreNormalize2D`` does not centre the
person), so large spatial variation mostly teaches invariances and slows learning without testing action
recognition. Temporal misalignment, the second person and the confusable pairs (waving / arm raise, jumping /
squatting, kicking / walking in place, bowing / squatting) keep a 1-nearest-neighbour classifier on raw,
time-resampled frames well below the network (about 60% in 2D and 70% in 3D against >= 90%;
``tests/test_synthetic.py`` measures it).

Everything is a pure function of ``(seed, kind, split, index)`` (a ``numpy.random.Generator`` seeded per
sample; the global RNG is never touched): the same arguments give identical arrays with the same numpy
build; another platform's ``sin``/``cos`` may differ in the last bit.
"""

from __future__ import annotations

import inspect
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from stgcn_jax import files

__all__ = ['DEMO_CLASSES', 'DEMO_VERSION', 'DEMO_SPLITS', 'LAYOUTS_BY_KIND', 'generate_demo_dataset',
           'ensure_demo_dataset', 'default_demo_path', 'is_current_demo_file', 'demo_sample']

# Bump whenever the generated content changes: ensure_demo_dataset then regenerates old files.
DEMO_VERSION = 3

DEMO_CLASSES = ('waving', 'clapping', 'jumping', 'squatting', 'kicking', 'walking_in_place', 'arms_raise',
                'bowing')
DEMO_SPLITS = ('xsub_train', 'xsub_val')
LAYOUTS_BY_KIND = {'2d': 'coco', '3d': 'nturgb+d'}
IMG_SHAPE = (1080, 1920)          # (h, w) of the 2D camera, mmaction2's default PreNormalize2D size
FPS = 30.0

_KIND_IDS = {'2d': 2, '3d': 3}
_SPLIT_IDS = {'xsub_train': 0, 'xsub_val': 1}


# ----------------------------------------------------------------------------------------------------------
# Rotations, vectorised over frames


def _rot(axis: int, angle: np.ndarray) -> np.ndarray:
  """``(T, 3, 3)`` right-handed rotations by ``angle`` (radians, ``(T,)``) about coordinate axis 0, 1 or 2."""
  angle = np.asarray(angle, dtype=np.float64)
  c, s = np.cos(angle), np.sin(angle)
  r = np.zeros(angle.shape + (3, 3))
  i, j = [(1, 2), (2, 0), (0, 1)][axis]          # the plane the rotation turns: i -> j for a positive angle
  r[..., axis, axis] = 1
  r[..., i, i] = c
  r[..., j, j] = c
  r[..., i, j] = -s
  r[..., j, i] = s
  return r


def _apply(r: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Rotate ``v`` (``(3,)`` or ``(T, 3)``) by ``r`` ``(T, 3, 3)`` -> ``(T, 3)``."""
  return np.einsum('tij,tj->ti', r, np.broadcast_to(v, r.shape[:-1]))


def _mm(*rs: np.ndarray) -> np.ndarray:
  out = rs[0]
  for r in rs[1:]:
    out = out @ r
  return out


_MIRROR = np.array([-1.0, 1.0, 1.0])              # body left <-> right (the body frame's x axis)


# ----------------------------------------------------------------------------------------------------------
# The body model
#
# Body frame: metres, origin at the hip centre, +x the person's left, +y up, +z the direction they face.
# Limbs are computed for the left side; the right side uses its own angles and is mirrored in x.


class _Angles:
  """Joint angles (radians) as ``(T,)`` arrays; unset ones are held at a neutral pose."""

  def __init__(self, t: int):
    z = lambda: np.zeros(t)
    self.trunk_pitch, self.trunk_lean, self.trunk_twist, self.head_nod = z(), z(), z(), z()
    # arms: flexion (forward), abduction (sideways), horizontal adduction (towards the midline),
    # humeral rotation, elbow flexion; legs: hip flexion, hip abduction, knee flexion
    self.arm = {side: dict(flex=z(), abd=z(), hadd=z(), rot=z(), elbow=z()) for side in 'lr'}
    self.leg = {side: dict(flex=z(), abd=z(), knee=z()) for side in 'lr'}
    self.lift = z()                                 # extra height of the body above the floor (jumps), metres


def _bones(size: float, rng: np.random.Generator) -> dict[str, float]:
  """Segment lengths (metres) of a body ``size`` times a 1.75 m adult, with small individual proportions."""
  p = lambda base: base * size * rng.uniform(0.94, 1.06)
  return dict(spine1=p(0.24), spine2=p(0.24), neck=p(0.07), head=p(0.16), shoulder_w=p(0.18), hip_w=p(0.09),
              upper_arm=p(0.29), forearm=p(0.25), hand=p(0.08), fingers=p(0.07), thigh=p(0.43), shank=p(0.42),
              foot=p(0.14), face=p(0.09))


def _arm(a: dict[str, np.ndarray], b: dict[str, float]) -> dict[str, np.ndarray]:
  """Left-arm joints relative to the shoulder, in the trunk frame."""
  down = np.array([0.0, -1.0, 0.0])
  upper = _mm(_rot(1, -a['hadd']), _rot(2, a['abd']), _rot(0, -a['flex']), _rot(1, a['rot']))
  fore = upper @ _rot(0, -a['elbow'])
  elbow = _apply(upper, down * b['upper_arm'])
  wrist = elbow + _apply(fore, down * b['forearm'])
  hand = wrist + _apply(fore, down * b['hand'])
  tip = wrist + _apply(fore, down * (b['hand'] + b['fingers']))
  thumb = wrist + _apply(fore, np.array([-0.35, -0.75, 0.35]) * b['hand'])
  return dict(elbow=elbow, wrist=wrist, hand=hand, handtip=tip, thumb=thumb)


def _leg(a: dict[str, np.ndarray], b: dict[str, float]) -> dict[str, np.ndarray]:
  """Left-leg joints relative to the hip joint, in the body frame."""
  down = np.array([0.0, -1.0, 0.0])
  thigh = _rot(2, a['abd']) @ _rot(0, -a['flex'])
  shank = thigh @ _rot(0, a['knee'])
  knee = _apply(thigh, down * b['thigh'])
  ankle = knee + _apply(shank, down * b['shank'])
  foot = ankle + _apply(shank, np.array([0.0, -0.35, 0.94]) * b['foot'])
  return dict(knee=knee, ankle=ankle, foot=foot)


def _pose(ang: _Angles, b: dict[str, float]) -> dict[str, np.ndarray]:
  """Named joint positions ``(T, 3)`` in the body frame (hip centre at the origin before the floor shift)."""
  trunk = _mm(_rot(1, ang.trunk_twist), _rot(2, ang.trunk_lean), _rot(0, ang.trunk_pitch))
  up = np.array([0.0, 1.0, 0.0])
  j: dict[str, np.ndarray] = {'pelvis': np.zeros((len(ang.lift), 3))}
  j['spine_mid'] = _apply(trunk, up * b['spine1'])
  j['spine_shoulder'] = _apply(trunk, up * (b['spine1'] + b['spine2']))
  j['neck'] = _apply(trunk, up * (b['spine1'] + b['spine2'] + b['neck']))
  head = trunk @ _rot(0, ang.head_nod)
  j['head'] = j['neck'] + _apply(head, up * b['head'] * 0.6)
  j['nose'] = j['head'] + _apply(head, np.array([0.0, -0.1, 1.0]) * b['face'])
  for side, sign in (('l', 1.0), ('r', -1.0)):
    m = np.array([sign, 1.0, 1.0])
    j[f'{side}_eye'] = j['head'] + _apply(head, m * np.array([0.35, 0.3, 0.85]) * b['face'])
    j[f'{side}_ear'] = j['head'] + _apply(head, m * np.array([0.8, 0.15, 0.0]) * b['face'])
    shoulder = _apply(trunk, np.array([sign * b['shoulder_w'], b['spine1'] + b['spine2'] - 0.03, 0.0]))
    j[f'{side}_shoulder'] = shoulder
    for name, rel in _arm(ang.arm[side], b).items():
      j[f'{side}_{name}'] = shoulder + _apply(trunk, rel if side == 'l' else rel * _MIRROR)
    hip = np.array([sign * b['hip_w'], -0.04, 0.0])
    j[f'{side}_hip'] = np.broadcast_to(hip, j['pelvis'].shape).copy()
    for name, rel in _leg(ang.leg[side], b).items():
      j[f'{side}_{name}'] = hip + (rel if side == 'l' else rel * _MIRROR)
  # Stand on the floor (y = 0): the lowest foot point touches it, plus the jump height.
  lowest = np.minimum.reduce([j[f'{s}_{n}'][:, 1] for s in 'lr' for n in ('ankle', 'foot')]) - 0.05
  shift = np.stack([np.zeros_like(lowest), ang.lift - lowest, np.zeros_like(lowest)], axis=-1)
  return {k: v + shift for k, v in j.items()}


# Joint names of each layout, in the layout's joint order.
_COCO_JOINTS = ('nose', 'l_eye', 'r_eye', 'l_ear', 'r_ear', 'l_shoulder', 'r_shoulder', 'l_elbow', 'r_elbow',
                'l_wrist', 'r_wrist', 'l_hip', 'r_hip', 'l_knee', 'r_knee', 'l_ankle', 'r_ankle')
_NTU_JOINTS = ('pelvis', 'spine_mid', 'neck', 'head', 'l_shoulder', 'l_elbow', 'l_wrist', 'l_hand',
               'r_shoulder', 'r_elbow', 'r_wrist', 'r_hand', 'l_hip', 'l_knee', 'l_ankle', 'l_foot',
               'r_hip', 'r_knee', 'r_ankle', 'r_foot', 'spine_shoulder', 'l_handtip', 'l_thumb',
               'r_handtip', 'r_thumb')


# ----------------------------------------------------------------------------------------------------------
# The actions: each fills the joint angles of an _Angles for the frames where the action is active


def _envelope(t: int, rng: np.random.Generator, min_active: int) -> np.ndarray:
  """``(T,)`` in [0, 1]: 0 during an idle lead-in (and sometimes a tail), 1 while acting, smooth ramps."""
  lead = int(rng.integers(0, max(1, min(t - min_active, t // 8) + 1)))
  tail = int(rng.integers(0, max(1, (t - lead - min_active) // 8 + 1))) if rng.random() < 0.3 else 0
  ramp = 6.0
  f = np.arange(t, dtype=np.float64)
  up = np.clip((f - lead) / ramp, 0, 1)
  down = np.clip((t - tail - f) / ramp, 0, 1)
  e = up * down
  return e * e * (3 - 2 * e)                      # smoothstep


def _phase(t: int, hz: float, rng: np.random.Generator) -> np.ndarray:
  """Cycle phase (radians) at each frame for ``hz`` cycles per second, with a random start and drift."""
  f = np.arange(t) / FPS
  drift = 1 + 0.08 * np.sin(2 * np.pi * f / rng.uniform(2, 5) + rng.uniform(0, 2 * np.pi))
  return 2 * np.pi * hz * np.cumsum(drift) / FPS + rng.uniform(0, 2 * np.pi)


def _idle(ang: _Angles, rng: np.random.Generator, t: int, amount: float = 1.0) -> None:
  """A person standing: arms hanging slightly apart, small sways and a breathing-like trunk motion."""
  f = np.arange(t) / FPS
  slow = lambda amp: amount * amp * np.sin(2 * np.pi * rng.uniform(0.1, 0.4) * f + rng.uniform(0, 2 * np.pi))
  ang.trunk_pitch += np.radians(rng.uniform(-4, 6)) + slow(np.radians(2))
  ang.trunk_lean += slow(np.radians(2))
  ang.trunk_twist += slow(np.radians(5))
  ang.head_nod += np.radians(rng.uniform(-10, 15)) + slow(np.radians(5))
  for side in 'lr':
    a = ang.arm[side]
    a['abd'] += np.radians(rng.uniform(4, 18)) + slow(np.radians(4))
    a['flex'] += np.radians(rng.uniform(-8, 15)) + slow(np.radians(5))
    a['elbow'] += np.radians(rng.uniform(5, 30)) + slow(np.radians(6))
    a['rot'] += np.radians(rng.uniform(-10, 10))
    leg = ang.leg[side]
    leg['abd'] += np.radians(rng.uniform(1, 7))
    leg['knee'] += np.radians(rng.uniform(0, 8)) + np.abs(slow(np.radians(3)))
    leg['flex'] += leg['knee'] * 0.5


def _waving(ang, rng, t, env, speed, amp):
  side = 'l' if rng.random() < 0.5 else 'r'
  a = ang.arm[side]
  ph = _phase(t, 1.4 * speed, rng)
  a['abd'] += env * np.radians(rng.uniform(85, 130))
  a['flex'] += env * np.radians(rng.uniform(-5, 35))
  a['rot'] += env * np.radians(90)
  a['elbow'] += env * (np.radians(rng.uniform(55, 85)) + amp * np.radians(28) * np.sin(ph))
  ang.head_nod += env * np.radians(rng.uniform(-5, 5))


def _clapping(ang, rng, t, env, speed, amp):
  ph = _phase(t, 1.5 * speed, rng)
  open_ = 0.5 * (1 + np.sin(ph))                    # 0: hands together, 1: apart
  flex = np.radians(rng.uniform(45, 80))
  for side in 'lr':
    a = ang.arm[side]
    a['flex'] += env * flex
    a['abd'] += env * np.radians(rng.uniform(-5, 5))
    a['elbow'] += env * np.radians(rng.uniform(40, 70))
    a['rot'] += env * np.radians(rng.uniform(-25, -10))
    a['hadd'] += env * (np.radians(38) - amp * np.radians(40) * open_)


def _jumping(ang, rng, t, env, speed, amp):
  ph = _phase(t, 1.0 * speed, rng)
  s = np.sin(ph)
  air = np.clip(s, 0, None) ** 1.5                  # airborne part of the cycle
  crouch = np.clip(-s, 0, None)                     # knees bend before take-off and after landing
  ang.lift += env * amp * rng.uniform(0.12, 0.28) * air
  knee = env * amp * np.radians(rng.uniform(35, 65)) * crouch
  for side in 'lr':
    ang.leg[side]['knee'] += knee
    ang.leg[side]['flex'] += knee * 0.55
    ang.arm[side]['flex'] += env * amp * (np.radians(rng.uniform(20, 70)) * air - np.radians(25) * crouch)
  ang.trunk_pitch += knee * 0.35


def _squatting(ang, rng, t, env, speed, amp):
  ph = _phase(t, 0.5 * speed, rng)
  depth = env * amp * np.radians(rng.uniform(80, 115)) * 0.5 * (1 - np.cos(ph))
  arms_forward = rng.random() < 0.6
  for side in 'lr':
    ang.leg[side]['knee'] += depth
    ang.leg[side]['flex'] += depth * 0.75
    ang.leg[side]['abd'] += env * np.radians(rng.uniform(3, 12))
    if arms_forward:
      ang.arm[side]['flex'] += depth * rng.uniform(0.6, 0.9)
  ang.trunk_pitch += depth * rng.uniform(0.3, 0.5)


def _kicking(ang, rng, t, env, speed, amp):
  side = 'l' if rng.random() < 0.5 else 'r'
  leg = ang.leg[side]
  ph = np.mod(_phase(t, 0.7 * speed, rng), 2 * np.pi)
  active = (ph < np.pi).astype(np.float64)
  lift = active * np.sin(ph)                        # hip swings forward and back during half of the cycle
  leg['flex'] += env * amp * np.radians(rng.uniform(60, 90)) * lift
  # The knee is cocked on the way up and snaps straight at the top of the kick.
  leg['knee'] += env * np.radians(rng.uniform(50, 80)) * active * np.clip(np.sin(2 * ph), 0, None)
  other = 'r' if side == 'l' else 'l'
  ang.leg[other]['knee'] += env * np.radians(8) * lift
  ang.trunk_pitch -= env * np.radians(rng.uniform(5, 15)) * lift
  for s in 'lr':
    ang.arm[s]['abd'] += env * np.radians(rng.uniform(10, 30)) * lift


def _walking(ang, rng, t, env, speed, amp):
  ph = _phase(t, 0.8 * speed, rng)
  lift_amp = amp * np.radians(rng.uniform(35, 65))
  swing = amp * np.radians(rng.uniform(15, 35))
  for side, offset in (('l', 0.0), ('r', np.pi)):
    s = np.sin(ph + offset)
    ang.leg[side]['flex'] += env * lift_amp * np.clip(s, 0, None)
    ang.leg[side]['knee'] += env * 1.6 * lift_amp * np.clip(s, 0, None)
    ang.arm[side]['flex'] -= env * swing * s        # the opposite arm swings forward
    ang.arm[side]['elbow'] += env * np.radians(20)
  ang.trunk_twist += env * np.radians(5) * np.sin(ph)


def _arms_raise(ang, rng, t, env, speed, amp):
  ph = _phase(t, 0.5 * speed, rng)
  raise_ = env * 0.5 * (1 - np.cos(ph))
  top = amp * np.radians(rng.uniform(130, 170))
  frontal = rng.uniform(0.4, 1.0)                   # mostly sideways, partly forward
  for side in 'lr':
    a = ang.arm[side]
    a['abd'] += raise_ * top * frontal
    a['flex'] += raise_ * top * (1 - frontal) * 0.8
    a['rot'] += raise_ * np.radians(60)
    a['elbow'] += raise_ * np.radians(rng.uniform(0, 25))


def _bowing(ang, rng, t, env, speed, amp):
  ph = _phase(t, 0.4 * speed, rng)
  bow = env * amp * np.radians(rng.uniform(40, 80)) * 0.5 * (1 - np.cos(ph))
  ang.trunk_pitch += bow
  ang.head_nod += bow * rng.uniform(0.1, 0.4)
  hang = rng.uniform(0.5, 1.0)                      # arms hang towards the floor as the trunk bends
  for side in 'lr':
    ang.arm[side]['flex'] += bow * hang
    ang.leg[side]['flex'] += bow * rng.uniform(0.0, 0.15)


_ACTIONS: tuple[Callable[..., None], ...] = (_waving, _clapping, _jumping, _squatting, _kicking, _walking,
                                             _arms_raise, _bowing)


def _animate(label: int | None, t: int, rng: np.random.Generator, lead_env: np.ndarray | None = None
             ) -> dict[str, np.ndarray]:
  """Body-frame joints of one person doing ``label`` (None: idling) over ``t`` frames."""
  size = rng.uniform(*_NUISANCE['size'])
  bones = _bones(size, rng)
  ang = _Angles(t)
  _idle(ang, rng, t, amount=rng.uniform(0.5, 1.0))
  if label is not None:
    env = _envelope(t, rng, min_active=min(t, 36)) if lead_env is None else lead_env
    _ACTIONS[label](ang, rng, t, env, rng.uniform(0.8, 1.25), rng.uniform(0.9, 1.15))
  return _pose(ang, bones)


# ----------------------------------------------------------------------------------------------------------
# Scene and camera


def _place(joints: dict[str, np.ndarray], names: tuple[str, ...], rng: np.random.Generator, x0: float,
           z0: float, yaw: float) -> np.ndarray:
  """``(T, V, 3)`` world coordinates (y up, the camera looks along +z) of the body, facing the camera."""
  body = np.stack([joints[n] for n in names], axis=1)                     # (T, V, 3)
  t = body.shape[0]
  f = np.arange(t) / FPS
  sway = 0.03 * np.sin(2 * np.pi * rng.uniform(0.05, 0.2) * f + rng.uniform(0, 2 * np.pi))
  facing = np.pi + yaw + np.radians(3) * np.sin(2 * np.pi * rng.uniform(0.05, 0.2) * f)
  world = np.einsum('tij,tvj->tvi', _rot(1, facing), body)
  world[..., 0] += x0 + sway[:, None]
  world[..., 2] += z0 + 0.5 * sway[:, None]
  return world


class _Camera:
  def __init__(self, rng: np.random.Generator, kind: str):
    self.height = rng.uniform(0.9, 1.1) if kind == '3d' else rng.uniform(1.1, 1.4)
    self.tilt = np.radians(rng.uniform(-3, 3) if kind == '3d' else rng.uniform(2, 8))   # looking down: > 0
    self.focal = rng.uniform(*_NUISANCE['focal'])
    h, w = IMG_SHAPE
    self.center = (w / 2 + rng.uniform(-10, 10), h / 2 + rng.uniform(-10, 10))

  def to_camera(self, world: np.ndarray) -> np.ndarray:
    """World -> camera frame (metres; x to the camera's left, y up, z forward)."""
    p = world - np.array([0.0, self.height, 0.0])
    return p @ _rot(0, np.asarray(self.tilt)).T       # a positive tilt lifts what is below the camera

  def project(self, cam: np.ndarray) -> np.ndarray:
    """Camera frame -> pixels ``(..., 2)`` (u to the right, v down)."""
    z = np.maximum(cam[..., 2], 0.3)
    u = self.center[0] - self.focal * cam[..., 0] / z
    v = self.center[1] - self.focal * cam[..., 1] / z
    return np.stack([u, v], axis=-1)


# Spatial nuisances and missing data (see the module docstring); bump DEMO_VERSION when changing them.
_NUISANCE = dict(x_range=0.05, yaw_deg=5.0, p_second=0.25, p_missing=0.1, p_missing_max=0.01, p_lost=0.05,
                 depth=(3.3, 3.5), focal=(1280, 1320), size=(0.95, 1.05), score_noise=0.005)


def _frame_in_view(px: np.ndarray, present: np.ndarray, margin: float = 30.0) -> np.ndarray:
  """Zooms out (about the image centre) and pans so that every tracked joint lies inside the image: the
  camera operator keeps the people in view."""
  h, w = IMG_SHAPE
  pts = px[present].reshape(-1, 2)
  if not len(pts):
    return px
  low, high = pts.min(axis=0), pts.max(axis=0)
  centre = np.array([w / 2, h / 2])
  zoom = min(1.0, (w - 2 * margin) / (high[0] - low[0]), (h - 2 * margin) / (high[1] - low[1]))
  px = centre + (px - centre) * zoom
  low, high = centre + (low - centre) * zoom, centre + (high - centre) * zoom
  shift = np.maximum(margin - low, 0) - np.maximum(high - (np.array([w, h]) - margin), 0)
  return px + shift


def demo_sample(kind: str, label: int, rng: np.random.Generator, min_frames: int = 40, max_frames: int = 120
                ) -> dict[str, Any]:
  """One annotation dict (without ``frame_dir``) of class ``label`` drawn from ``rng``."""
  t = int(rng.integers(min_frames, max_frames + 1))
  names = _COCO_JOINTS if kind == '2d' else _NTU_JOINTS
  cam = _Camera(rng, kind)
  z0 = rng.uniform(*_NUISANCE['depth'])
  x0 = rng.uniform(-1, 1) * _NUISANCE['x_range'] * z0 / 3.5
  yaw = _NUISANCE['yaw_deg']
  people = [_place(_animate(label, t, rng), names, rng, x0, z0, np.radians(rng.uniform(-yaw, yaw)))]
  if rng.random() < _NUISANCE['p_second']:                          # a second person beside the actor
    side = 1.0 if rng.random() < 0.5 else -1.0
    same = rng.random() < 0.4
    people.append(_place(_animate(label if same else None, t, rng), names, rng,
                         x0 + side * rng.uniform(0.8, 1.4), z0 + rng.uniform(-0.6, 0.8),
                         np.radians(rng.uniform(-60, 60))))
    if rng.random() < 0.3:
      people.reverse()
  world = np.stack(people)                                                 # (M, T, V, 3)
  m, _, v, _ = world.shape
  cam_xyz = cam.to_camera(world)
  present = np.ones((m, t), bool)
  for p in range(m):                                # a few frames where the tracker lost the person
    if rng.random() < _NUISANCE['p_lost']:
      start, length = int(rng.integers(0, t)), int(rng.integers(1, 7))
      present[p, start:start + length] = False
  if kind == '3d':
    noise = rng.normal(0, rng.uniform(0.004, 0.015), cam_xyz.shape)
    kp = (cam_xyz + noise) * present[..., None, None]
    return dict(label=int(label), img_shape=IMG_SHAPE, original_shape=IMG_SHAPE, total_frames=t,
                keypoint=kp.astype(np.float32))
  px = _frame_in_view(cam.project(cam_xyz), present)                      # (M, T, V, 2)
  height_px = np.ptp(px[..., 1], axis=-1).mean(axis=1)                     # (M,) person size in pixels
  jitter = rng.uniform(0.003, 0.012) * height_px[:, None, None, None]
  px = px + rng.normal(0, 1, px.shape) * jitter
  score = np.clip(rng.uniform(0.75, 0.95) + rng.normal(0, _NUISANCE['score_noise'], (m, t, v)), 0.3, 1.0)
  miss = rng.uniform(0.0, _NUISANCE['p_missing_max']) if rng.random() < _NUISANCE['p_missing'] else 0.0
  visible = (rng.random((m, t, v)) >= miss) & present[..., None]
  kp = px * visible[..., None]
  return dict(label=int(label), img_shape=IMG_SHAPE, original_shape=IMG_SHAPE, total_frames=t,
              keypoint=kp.astype(np.float32), keypoint_score=(score * visible).astype(np.float32))


# ----------------------------------------------------------------------------------------------------------
# Files


def _check_kind(kind: str) -> str:
  if kind not in LAYOUTS_BY_KIND:
    raise ValueError(f"demo dataset kind must be '2d' (COCO-17 pixels) or '3d' (NTU-25 metres), got {kind!r}")
  return kind


def _meta(kind: str, seed: int, num_train: int, num_val: int, min_frames: int, max_frames: int) -> dict[str, Any]:
  return dict(demo_version=DEMO_VERSION, kind=kind, layout=LAYOUTS_BY_KIND[kind], classes=list(DEMO_CLASSES),
              seed=int(seed), num_train=int(num_train), num_val=int(num_val), min_frames=int(min_frames),
              max_frames=int(max_frames))


def default_demo_path(kind: str, root: str | os.PathLike | None = None) -> Path:
  """``<root>/demo_<kind>_v<DEMO_VERSION>.pkl``; root defaults to ``$STGCN_DATA_DIR`` or ``~/.cache/stgcn_jax``."""
  _check_kind(kind)
  if root is None:
    root = os.environ.get('STGCN_DATA_DIR', Path.home() / '.cache' / 'stgcn_jax')
  return Path(root).expanduser() / f'demo_{kind}_v{DEMO_VERSION}.pkl'


def generate_demo_dataset(path: str | os.PathLike, kind: str = '2d', *, seed: int = 0, num_train: int = 800,
                          num_val: int = 96, min_frames: int = 40, max_frames: int = 120) -> Path:
  """Writes the demo annotation pickle to ``path`` (atomically: a temporary file renamed into place).

  Args:
    path: the annotation file to write; its directory is created.
    kind: ``'2d'`` (COCO-17 pixels with scores, ``layout='coco'``) or ``'3d'`` (NTU-25 metres,
      ``layout='nturgb+d'``).
    seed: the content is a pure function of ``(seed, kind)`` and the sample's split and index, so a larger
      ``num_train`` keeps the first samples identical.
    num_train, num_val: samples in ``xsub_train`` / ``xsub_val``; labels cycle through the
      ``len(DEMO_CLASSES)`` classes, so every class is equally frequent (given multiples of 8).
    min_frames, max_frames: the sequence length range (frames at 30 fps, inclusive).

  Returns:
    the path written (load it with ``load_annotations(path, split, layout=LAYOUTS_BY_KIND[kind],
    num_classes=len(DEMO_CLASSES))``).
  """
  _check_kind(kind)
  for name, value, low in (('num_train', num_train, 1), ('num_val', num_val, 1), ('min_frames', min_frames, 1)):
    if not isinstance(value, (int, np.integer)) or value < low:
      raise ValueError(f'generate_demo_dataset: {name} must be an integer >= {low}, got {value!r}')
  if max_frames < min_frames:
    raise ValueError(f'generate_demo_dataset: max_frames ({max_frames}) must be >= min_frames ({min_frames})')
  annotations, split = [], {}
  for split_name, count in (('xsub_train', num_train), ('xsub_val', num_val)):
    names = []
    for i in range(count):
      rng = np.random.default_rng([int(seed), _KIND_IDS[kind], _SPLIT_IDS[split_name], i])
      sample = demo_sample(kind, i % len(DEMO_CLASSES), rng, min_frames, max_frames)
      frame_dir = f'demo{kind}_{split_name.split("_")[1]}_{i:05d}'
      annotations.append({'frame_dir': frame_dir, **sample})
      names.append(frame_dir)
    split[split_name] = names
  data = {'split': split, 'annotations': annotations,
          'demo_meta': _meta(kind, seed, num_train, num_val, min_frames, max_frames)}
  path = Path(path).expanduser()
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = files.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      pickle.dump(data, f, protocol=4)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def is_current_demo_file(path: str | os.PathLike, kind: str, **kwargs: Any) -> bool:
  """True when ``path`` is a demo file of this generator version, ``kind`` and arguments (``kwargs`` as in
  :func:`generate_demo_dataset`, defaults filled in)."""
  from stgcn_jax.safe_pickle import load_pickle   # deferred: only needed when a file exists

  path = Path(path).expanduser()
  if not path.is_file():
    return False
  try:
    data = load_pickle(path)
  except (ValueError, OSError, EOFError):
    return False
  expected = _meta(kind, **{**_GENERATE_DEFAULTS, **kwargs})
  return isinstance(data, dict) and data.get('demo_meta') == expected


# generate_demo_dataset's keyword arguments and their defaults (what a demo file's metadata records).
_GENERATE_DEFAULTS = {name: p.default for name, p in inspect.signature(generate_demo_dataset).parameters.items()
                      if p.kind is p.KEYWORD_ONLY}


def ensure_demo_dataset(path: str | os.PathLike | None = None, kind: str = '2d', **kwargs: Any) -> Path:
  """The demo annotation file at ``path`` (default :func:`default_demo_path`), generated if it is absent or
  was made by another generator version or with other arguments; returns the path."""
  _check_kind(kind)
  unknown = set(kwargs) - set(_GENERATE_DEFAULTS)
  if unknown:
    raise ValueError(f'ensure_demo_dataset: unknown argument(s) {sorted(unknown)}; expected some of '
                     f'{sorted(_GENERATE_DEFAULTS)}')
  path = default_demo_path(kind) if path is None else Path(path).expanduser()
  if not is_current_demo_file(path, kind, **kwargs):
    generate_demo_dataset(path, kind, **{**_GENERATE_DEFAULTS, **kwargs})
  return path
