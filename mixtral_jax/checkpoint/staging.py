"""Safe destinations for ``convert`` and ``export``: never inside the source, no temporaries left behind.

``formats.atomic_dir`` writes into a hidden sibling ``.DST.tmp-XXXXXXXX`` and renames it at the end. A
process killed before the rename (SIGKILL, power loss) leaves that sibling, tens of GB for 8x7B. So
the writer holds an exclusive ``flock`` on ``.DST.tmp-*/.owner`` while it writes (:func:`owned`); the
next run at the same destination removes every sibling whose lock it can take, i.e. whose writer is
gone (:func:`remove_stale`). The kernel drops a dead process's locks, so a PID reused since is no
confusion. A sibling without an ``.owner`` (written before this existed) is named, not deleted.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import logging
import os
import shutil

OWNER = ".owner"
log = logging.getLogger("mixtral_jax.checkpoint")


def refuse_inside(src: str | os.PathLike, dst: str | os.PathLike, what: str) -> None:
  """Raises ValueError if ``dst`` is ``src`` or inside it (``--overwrite`` would delete the source)."""
  src_real, dst_real = os.path.realpath(os.fspath(src)), os.path.realpath(os.fspath(dst))
  if dst_real == src_real or dst_real.startswith(src_real.rstrip(os.sep) + os.sep):
    raise ValueError(f"the {what} destination {dst} is the source {src} or inside it; choose a directory outside "
                     "the source")


def remove_stale(dst: str | os.PathLike, say=log.info) -> list[str]:
  """Removes the temporaries of earlier, dead runs writing ``dst``; returns what it removed."""
  dst = os.path.abspath(os.fspath(dst))
  pattern = os.path.join(glob.escape(os.path.dirname(dst)), f".{glob.escape(os.path.basename(dst))}.tmp-*")
  removed = []
  for tmp in sorted(glob.glob(pattern)):
    owner = os.path.join(tmp, OWNER)
    if not os.path.exists(owner):
      say(f"note: {tmp} is a temporary of an older mixtral-jax (no {OWNER} lock); delete it by hand if no "
          "conversion is running")
      continue
    try:
      fd = os.open(owner, os.O_RDWR)
    except FileNotFoundError:  # its writer just finished or cleaned up
      continue
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EAGAIN, errno.EACCES):
        raise
      continue  # a live run holds it
    finally:
      os.close(fd)
    shutil.rmtree(tmp, ignore_errors=True)
    say(f"removed {tmp}, left by an interrupted run")
    removed.append(tmp)
  return removed


@contextlib.contextmanager
def owned(tmp: str):
  """Holds the lock that marks ``tmp`` as being written by a live process; removes the lock file on
  exit so it does not land in the finished directory."""
  path = os.path.join(tmp, OWNER)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, f"{os.getpid()}\n".encode())
    yield tmp
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)
    os.close(fd)
