"""Files on any `etils.epath` path: local disk or an object store (gs://, s3://).

Object stores differ from a disk in three ways that matter here: a file
cannot be appended to (only written whole), some libraries (ScaNN, NumPy's
`np.load(str)`) read only local paths, and a folder rename is a copy. The
helpers below cover the first two; renames go through epath, which copies.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import shutil
import tempfile
from typing import Iterator

from etils import epath


def is_local(path: epath.PathLike) -> bool:
  """True for a path on this machine's filesystem, False for gs://, s3://, ..."""
  return "://" not in os.fspath(path)


def copy_tree(src: epath.PathLike, dst: epath.PathLike) -> None:
  """Copies folder `src` to `dst` (created), between any two epath locations."""
  src, dst = epath.Path(src), epath.Path(dst)
  dst.mkdir(parents=True, exist_ok=True)
  for item in src.iterdir():
    if item.is_dir():
      copy_tree(item, dst / item.name)
    else:
      (dst / item.name).write_bytes(item.read_bytes())


@contextlib.contextmanager
def local_copy(path: epath.PathLike) -> Iterator[epath.Path]:
  """`path` itself if local; else a temporary local copy of the folder, removed afterwards."""
  path = epath.Path(path)
  if is_local(path):
    yield path
    return
  with tempfile.TemporaryDirectory(prefix="histojax-") as tmp:
    local = epath.Path(tmp) / path.name
    copy_tree(path, local)
    yield local


# --- Replacing a local folder whole ---------------------------------------------
# A new version is written complete into `.<name>.next` beside the folder, then
# swapped in by one atomic exchange of the two names (Linux renameat2); where
# that is missing, two renames, and `recover_folder` finishes or undoes a swap
# cut between them.

def sibling(directory: str, tag: str) -> str:
  parent, name = os.path.split(os.path.abspath(directory))
  return os.path.join(parent, f".{name}.{tag}")


@contextlib.contextmanager
def folder_lock(directory: str):
  """An exclusive lock beside `directory` (`.<name>.lock`): one writer at a time, a second waits."""
  with open(sibling(directory, "lock"), "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def exchange(a: str, b: str) -> bool:
  """Swaps two folder names in one step (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = libc.renameat2
  except (OSError, AttributeError):
    return False
  at_fdcwd, rename_exchange = -100, 2
  return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def recover_folder(directory: str, written_last: str = "manifest.json") -> None:
  """Finishes or undoes a swap that was cut short, and clears what an interrupted write
  left; a `.next` folder holding `written_last` is whole."""
  nxt, old = sibling(directory, "next"), sibling(directory, "old")
  if not os.path.exists(directory):
    if os.path.exists(os.path.join(nxt, written_last)):  # written whole: the swap was under way
      os.rename(nxt, directory)
    elif os.path.exists(old):
      os.rename(old, directory)
  for leftover in (nxt, old):
    if os.path.exists(leftover):
      shutil.rmtree(leftover)


def link_or_copy(src: str, dst: str) -> None:
  try:
    os.link(src, dst)
  except OSError:  # another filesystem, or no hard links there
    shutil.copy2(src, dst)


def swap_in(directory: str, nxt: str) -> None:
  """Puts the complete folder `nxt` in the place of `directory` (see `exchange`), then
  removes the previous one."""
  if exchange(nxt, directory):
    shutil.rmtree(nxt)  # now the previous version
    return
  old = sibling(directory, "old")
  os.rename(directory, old)
  os.rename(nxt, directory)
  shutil.rmtree(old)
