"""Temporary files for atomic writes (written beside their destination, then renamed into place) that end up
with the permissions a plain ``open(path, 'w')`` would give.

``tempfile.mkstemp`` creates its file with mode 0600 whatever the umask, so a file renamed from it stays
readable by its owner only: a results dump, a download or the annotation cache beside a shared dataset
pickle would then be unreadable to the other users of a shared folder.
"""

from __future__ import annotations

import os
import tempfile


def umask() -> int:
  """The process's file-mode creation mask, read without changing it where the system allows."""
  try:
    with open('/proc/self/status', encoding='ascii') as f:
      for line in f:
        if line.startswith('Umask:'):
          return int(line.split()[1], 8)
  except (OSError, ValueError, IndexError):
    pass
  mask = os.umask(0o022)      # elsewhere: set and restore (briefly process-wide)
  os.umask(mask)
  return mask


def mkstemp(**kwargs) -> tuple[int, str]:
  """``tempfile.mkstemp(**kwargs)`` whose file has mode ``0666 & ~umask``, as ``open()`` creates files."""
  fd, path = tempfile.mkstemp(**kwargs)
  try:
    os.fchmod(fd, 0o666 & ~umask())
  except BaseException:
    os.close(fd)
    os.remove(path)
    raise
  return fd, path
