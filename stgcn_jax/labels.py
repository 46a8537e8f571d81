"""Action class names: the NTU RGB+D 60 and 120 label lists, and user label files.

Label ``i`` (0-based, as in the annotation files) is the dataset's action ``A{i+1}``. NTU RGB+D 60 is the first
60 actions of NTU RGB+D 120 (Shahroudy et al. CVPR 2016; Liu et al. TPAMI 2019).
"""

from __future__ import annotations

import os

__all__ = ['NTU120_CLASSES', 'NTU60_CLASSES', 'class_names', 'read_labels_file']

NTU120_CLASSES: tuple[str, ...] = (
    'drink water',  # A1
    'eat meal/snack',  # A2
    'brushing teeth',  # A3
    'brushing hair',  # A4
    'drop',  # A5
    'pickup',  # A6
    'throw',  # A7
    'sitting down',  # A8
    'standing up (from sitting position)',  # A9
    'clapping',  # A10
    'reading',  # A11
    'writing',  # A12
    'tear up paper',  # A13
    'wear jacket',  # A14
    'take off jacket',  # A15
    'wear a shoe',  # A16
    'take off a shoe',  # A17
    'wear on glasses',  # A18
    'take off glasses',  # A19
    'put on a hat/cap',  # A20
    'take off a hat/cap',  # A21
    'cheer up',  # A22
    'hand waving',  # A23
    'kicking something',  # A24
    'reach into pocket',  # A25
    'hopping (one foot jumping)',  # A26
    'jump up',  # A27
    'make a phone call/answer phone',  # A28
    'playing with phone/tablet',  # A29
    'typing on a keyboard',  # A30
    'pointing to something with finger',  # A31
    'taking a selfie',  # A32
    'check time (from watch)',  # A33
    'rub two hands together',  # A34
    'nod head/bow',  # A35
    'shake head',  # A36
    'wipe face',  # A37
    'salute',  # A38
    'put the palms together',  # A39
    'cross hands in front (say stop)',  # A40
    'sneeze/cough',  # A41
    'staggering',  # A42
    'falling',  # A43
    'touch head (headache)',  # A44
    'touch chest (stomachache/heart pain)',  # A45
    'touch back (backache)',  # A46
    'touch neck (neckache)',  # A47
    'nausea or vomiting condition',  # A48
    'use a fan (with hand or paper)/feeling warm',  # A49
    'punching/slapping other person',  # A50
    'kicking other person',  # A51
    'pushing other person',  # A52
    'pat on back of other person',  # A53
    'point finger at the other person',  # A54
    'hugging other person',  # A55
    'giving something to other person',  # A56
    "touch other person's pocket",  # A57
    'handshaking',  # A58
    'walking towards each other',  # A59
    'walking apart from each other',  # A60
    'put on headphone',  # A61
    'take off headphone',  # A62
    'shoot at the basket',  # A63
    'bounce ball',  # A64
    'tennis bat swing',  # A65
    'juggling table tennis balls',  # A66
    'hush (quite)',  # A67
    'flick hair',  # A68
    'thumb up',  # A69
    'thumb down',  # A70
    'make ok sign',  # A71
    'make victory sign',  # A72
    'staple book',  # A73
    'counting money',  # A74
    'cutting nails',  # A75
    'cutting paper (using scissors)',  # A76
    'snapping fingers',  # A77
    'open bottle',  # A78
    'sniff (smell)',  # A79
    'squat down',  # A80
    'toss a coin',  # A81
    'fold paper',  # A82
    'ball up paper',  # A83
    'play magic cube',  # A84
    'apply cream on face',  # A85
    'apply cream on hand back',  # A86
    'put on bag',  # A87
    'take off bag',  # A88
    'put something into a bag',  # A89
    'take something out of a bag',  # A90
    'open a box',  # A91
    'move heavy objects',  # A92
    'shake fist',  # A93
    'throw up cap/hat',  # A94
    'hands up (both hands)',  # A95
    'cross arms',  # A96
    'arm circles',  # A97
    'arm swings',  # A98
    'running on the spot',  # A99
    'butt kicks (kick backward)',  # A100
    'cross toe touch',  # A101
    'side kick',  # A102
    'yawn',  # A103
    'stretch oneself',  # A104
    'blow nose',  # A105
    'hit other person with something',  # A106
    'wield knife towards other person',  # A107
    'knock over other person (hit with body)',  # A108
    "grab other person's stuff",  # A109
    'shoot at other person with a gun',  # A110
    'step on foot',  # A111
    'high-five',  # A112
    'cheers and drink',  # A113
    'carry something with other person',  # A114
    'take a photo of other person',  # A115
    'follow other person',  # A116
    "whisper in other person's ear",  # A117
    'exchange things with other person',  # A118
    'support somebody with hand',  # A119
    'finger-guessing game (playing rock-paper-scissors)',  # A120
)
NTU60_CLASSES: tuple[str, ...] = NTU120_CLASSES[:60]

_BUILT_IN = {60: NTU60_CLASSES, 120: NTU120_CLASSES}


def class_names(num_classes: int) -> list[str] | None:
  """The built-in names for a head of ``num_classes`` outputs (60: NTU60, 120: NTU120), else None."""
  names = _BUILT_IN.get(int(num_classes))
  return None if names is None else list(names)


def read_labels_file(path: str | os.PathLike, num_classes: int | None = None) -> list[str]:
  """Reads class names, one per line (line ``i`` is label ``i``); surrounding spaces and trailing blank lines
  are dropped.

  Raises:
    FileNotFoundError: ``path`` does not exist.
    ValueError: the file is empty, has a blank line between names, repeats a name, or (when ``num_classes`` is
      given) does not hold exactly ``num_classes`` names.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'labels file {path!r} does not exist; give a text file with one class name per line')
  try:
    with open(path, encoding='utf-8-sig') as f:   # -sig: a byte-order mark (Windows editors) is not a name
      names = [line.strip() for line in f.read().splitlines()]
  except UnicodeDecodeError as e:
    raise ValueError(f'{path}: not UTF-8 text ({e.reason} at byte {e.start}); save the labels file as UTF-8') from None
  while names and not names[-1]:
    names.pop()
  if not names:
    raise ValueError(f'{path}: holds no class names; expected one name per line')
  blank = [i + 1 for i, name in enumerate(names) if not name]
  if blank:
    raise ValueError(f'{path}: line(s) {blank[:5]} are blank; every line up to the last name must hold a name '
                     '(line i is label i-1)')
  seen: dict[str, int] = {}
  for i, name in enumerate(names):
    if name in seen:
      raise ValueError(f'{path}: the name {name!r} appears on lines {seen[name] + 1} and {i + 1}; names must be '
                       'unique')
    seen[name] = i
  if num_classes is not None and len(names) != num_classes:
    raise ValueError(f'{path}: holds {len(names)} class names but the model has {num_classes} classes')
  return names
