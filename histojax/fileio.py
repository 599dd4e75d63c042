"""Files on any `etils.epath` path: local disk or an object store (gs://, s3://).

Object stores differ from a disk in three ways that matter here: a file
cannot be appended to (only written whole), some libraries (ScaNN, NumPy's
`np.load(str)`) read only local paths, and a folder rename is a copy. The
helpers below cover the first two; renames go through epath, which copies.
Every file the project writes whole goes through `atomic_open` and the
helpers built on it, and every `.npy`/`.npz` it reads through `load_npy`/`load_npz`.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import shutil
import tempfile
from typing import Iterator

import numpy as np
from etils import epath

from histojax import untrusted


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


class FolderBusy(BlockingIOError):
  """Another writer holds the folder's lock (`folder_lock(..., wait=False)`)."""


@contextlib.contextmanager
def folder_lock(directory: str, wait: bool = True):
  """An exclusive lock beside `directory` (`.<name>.lock`): one writer at a time. A second
  waits, or with `wait=False` raises `FolderBusy` at once (a server answers 409 rather than
  hold a request open for as long as another write takes). The lock is flock(2)'s, per open
  file: two threads of one process exclude each other as two processes do."""
  with open(sibling(directory, "lock"), "w") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise FolderBusy(f"{directory} is being changed by another writer (it holds {sibling(directory, 'lock')}); "
                       "try again when that change is done") from None
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


# --- Whole files, written atomically ---------------------------------------------
# A reader (another process, a resumed run) sees the old file or the new one, never
# half of one: each file is written beside its destination under `.NAME.partial`
# and renamed over it. On an object store the rename is a copy, but an object
# appears whole or not at all there anyway.

def staging_path(path: epath.PathLike) -> epath.Path:
  """Where `path` is written before being renamed into place."""
  path = epath.Path(path)
  return path.parent / f".{path.name}.partial"


@contextlib.contextmanager
def atomic_open(path: epath.PathLike, mode: str = "wb") -> Iterator:
  """A file opened on `staging_path(path)`, renamed to `path` when the block ends
  without an error (and removed when it raises). The parent folder is created."""
  if mode not in ("w", "wb"):
    raise ValueError(f"atomic_open writes whole files: mode 'w' or 'wb', got {mode!r}")
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  staging = staging_path(path)
  try:
    with staging.open(mode) as f:
      yield f
    staging.replace(path)
  except BaseException:
    if staging.exists():
      staging.unlink()
    raise


def write_atomic(path: epath.PathLike, data: str | bytes) -> None:
  """Writes text (UTF-8) or bytes to `path` atomically."""
  with atomic_open(path, "w" if isinstance(data, str) else "wb") as f:
    f.write(data)


def write_json(path: epath.PathLike, value) -> None:
  """`value` as indented, key-sorted JSON, atomically."""
  write_atomic(path, json.dumps(value, indent=2, sort_keys=True))


def save_npy(path: epath.PathLike, array: np.ndarray) -> None:
  """`np.save` to any epath location, atomically: a chunk is either whole or absent."""
  with atomic_open(path) as f:
    np.save(f, np.asarray(array))


def save_npz(path: epath.PathLike, **arrays: np.ndarray) -> None:
  """`np.savez` to any epath location, atomically."""
  with atomic_open(path) as f:
    np.savez(f, **arrays)


def load_npy(path: epath.PathLike) -> np.ndarray:
  """A `.npy` array read through epath (gs:// too; `np.load(str)` reads local paths only)
  by `untrusted.load_npy`: header checked against the file's size, object arrays
  (pickles) refused, a damaged file named (`untrusted.CorruptFileError`)."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist")
  return untrusted.load_npy(path)


def load_npz(path: epath.PathLike) -> dict[str, np.ndarray]:
  """Every array of an `.npz` file, as a dict, read through epath by `untrusted.load_npz`
  (member sizes checked, object arrays refused)."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist")
  return untrusted.load_npz(path)
