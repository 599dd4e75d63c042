"""Files on any `etils.epath` path: local disk or an object store (gs://, s3://).

Object stores differ from a disk in three ways that matter here: a file
cannot be appended to (only written whole), some libraries (ScaNN, NumPy's
`np.load(str)`) read only local paths, and a folder rename is a copy. The
helpers below cover the first two; renames go through epath, which copies.
"""

from __future__ import annotations

import contextlib
import os
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
