"""Reading back files a user may hand us damaged, truncated or hostile: JSON, .npy, .npz.

An index or export folder can be copied between machines, half-synced, or made by
someone else. Every size a file declares is checked against the bytes it holds
before memory is spent; arrays of Python objects (pickles, which run code when
loaded) are refused; and every failure is a `CorruptFileError` naming the file,
not a traceback from inside numpy or json.
"""

from __future__ import annotations

import json
import math
import zipfile
import zlib
from typing import Any

import numpy as np
from etils import epath

# manifest.json / config.json hold names and numbers: megabytes at most.
MAX_JSON_BYTES = 64 << 20
# The bound on the arrays of one .npz (rows.npz, metadata.npz: labels, ids, coordinates).
MAX_NPZ_BYTES = 16 << 30
# Deflate cannot expand data more than 1032-fold: a member declaring more lies.
_MAX_DEFLATE_RATIO = 1032
_NPY_ERRORS = (ValueError, OSError, EOFError, SyntaxError, KeyError, TypeError, zipfile.BadZipFile, zlib.error,
               OverflowError, MemoryError)


class CorruptFileError(ValueError):
  """A damaged, wrong-kind or oversized file; the message names it. Nothing was changed."""


def read_json(path: epath.PathLike, what: str, expect: type | None = dict,
              max_bytes: int | None = None) -> Any:
  """The JSON value in `path` (FileNotFoundError if absent). `what` names it in errors;
  max_bytes defaults to MAX_JSON_BYTES."""
  path = epath.Path(path)
  max_bytes = MAX_JSON_BYTES if max_bytes is None else max_bytes
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist ({what})")
  size = _size(path)
  if size > max_bytes:
    raise CorruptFileError(f"{path}: {size:,} bytes is too large for a {what} (at most {max_bytes:,})")
  try:
    value = json.loads(path.read_bytes().decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
    raise CorruptFileError(f"{path} is not a valid {what} (damaged or not JSON): {e}") from None
  if expect is not None and not isinstance(value, expect):
    raise CorruptFileError(f"{path}: a {what} must be a JSON {expect.__name__}, got {type(value).__name__}")
  return value


def load_npy(path: epath.PathLike) -> np.ndarray:
  """A .npy array whose header agrees with the file's size; object arrays refused."""
  return _npy(path, read=True)


def check_npy(path: epath.PathLike) -> None:
  """What load_npy checks, reading the header alone (for files another library loads)."""
  _npy(path, read=False)


def _npy(path: epath.PathLike, read: bool):
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist")
  try:
    with path.open("rb") as f:
      shape, dtype = _npy_header(f, path)
      held = _size(path) - f.tell()
      _check_bytes(shape, dtype, held, path)
      if not read:
        return None
      f.seek(0)  # read_array reads the header again
      return np.lib.format.read_array(f, allow_pickle=False)
  except CorruptFileError:
    raise
  except _NPY_ERRORS as e:
    raise CorruptFileError(f"{path} is not a readable .npy array: {type(e).__name__}: {e}") from None


def load_npz(path: epath.PathLike, max_bytes: int = MAX_NPZ_BYTES) -> dict[str, np.ndarray]:
  """Every array of a .npz, each member's header checked against its size first."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist")
  try:
    with path.open("rb") as f, zipfile.ZipFile(f) as z:
      members = z.infolist()
      _check_members(members, max_bytes, path)
      out = {}
      for info in members:
        with z.open(info) as m:
          shape, dtype = _npy_header(m, f"{path}:{info.filename}")
          header = m.tell() if m.seekable() else None
        if header is not None:
          _check_bytes(shape, dtype, info.file_size - header, f"{path}:{info.filename}")
        with z.open(info) as m:
          out[info.filename[:-len(".npy")]] = np.lib.format.read_array(m, allow_pickle=False)
      return out
  except CorruptFileError:
    raise
  except _NPY_ERRORS as e:
    raise CorruptFileError(f"{path} is not a readable .npz archive: {type(e).__name__}: {e}") from None


def _check_members(members, max_bytes: int, path) -> None:
  declared = 0
  for info in members:
    if not info.filename.endswith(".npy"):
      raise CorruptFileError(f"{path}: member {info.filename!r} is not a .npy array")
    if info.compress_type != zipfile.ZIP_STORED and info.file_size > _MAX_DEFLATE_RATIO * info.compress_size + 1024:
      raise CorruptFileError(f"{path}: member {info.filename} declares {info.file_size:,} bytes from "
                             f"{info.compress_size:,} compressed, more than deflate can produce")
    declared += info.file_size
  if declared > max_bytes:
    raise CorruptFileError(f"{path}: its arrays declare {declared:,} bytes, over the bound of {max_bytes:,}")


def _npy_header(f, name) -> tuple[tuple[int, ...], np.dtype]:
  version = np.lib.format.read_magic(f)
  if version == (1, 0):
    shape, _, dtype = np.lib.format.read_array_header_1_0(f)
  elif version == (2, 0):
    shape, _, dtype = np.lib.format.read_array_header_2_0(f)
  else:
    raise CorruptFileError(f"{name}: .npy format version {version} is not one numpy.save writes for arrays")
  if dtype.hasobject:
    raise CorruptFileError(f"{name} holds Python objects (a pickle, which could run code); refused "
                           "(allow_pickle is never set)")
  return shape, dtype


def _check_bytes(shape, dtype: np.dtype, held: int, name) -> None:
  declared = math.prod(shape) * dtype.itemsize
  if declared != held:
    raise CorruptFileError(f"{name}: the header declares {shape} {dtype} ({declared:,} bytes) but {held:,} "
                           "bytes follow it (truncated or damaged)")


def _size(path: epath.Path) -> int:
  stat = path.stat()
  return int(getattr(stat, "length", None) or getattr(stat, "st_size", 0) or 0)
