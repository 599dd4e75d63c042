"""Read PyTorch checkpoints (`torch.save`, `torch.jit.save`) without torch.

Three layouts are understood:
  zip (torch >= 1.6 default)   `<name>/data.pkl` plus one file per storage,
                               `<name>/data/<key>`;
  TorchScript zip              the same, but data.pkl pickles the module tree
                               (OpenAI's CLIP `.pt` files are these);
  legacy stream (torch < 1.6)  magic number, protocol, sys info, the pickle,
                               the storage keys, then each storage's bytes.

The unpickler is restricted: it never imports the module a pickle names.
Tensors and dicts are rebuilt by the few functions below; any other class
(argparse.Namespace, optimizer classes, TorchScript modules, ...) becomes an
inert `Opaque` record of its arguments and state, so a checkpoint cannot run
code, and tensors nested inside such records are still found. A pickle that
names a function which runs code or touches the system (os.system, eval,
subprocess, ...) is refused outright: no checkpoint needs one. The legacy
header (magic, protocol, sys info, storage keys) is plain data and may name no
global at all.

Sizes are checked before memory is spent: every storage's declared size must
match the bytes the file holds for it, and all storages together (and the
tensors viewed from them) must stay under `max_bytes`, the bound the caller
derives from the model being filled (`histojax.convert`).
"""

from __future__ import annotations

import codecs
import collections
import io
import math
import os
import pickle
import struct
import zipfile
from typing import Any

import jax.numpy as jnp
import numpy as np

STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": jnp.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
# Without a caller's bound: more than any published backbone's training checkpoint
# (ViT-g/14 with Adam state is ~18 GB), so only absurd declarations are refused.
DEFAULT_MAX_BYTES = 32 << 30
# data.pkl holds names and shapes, not weights: a few MB for the largest TorchScript model.
MAX_PICKLE_BYTES = 256 << 20
# Modules whose functions run code or reach the system: a pickle naming one is hostile.
_HOSTILE_MODULES = {"os", "posix", "nt", "subprocess", "sys", "shutil", "socket", "importlib", "runpy",
                    "pickle", "_pickle", "marshal", "ctypes", "code", "codeop", "pty", "webbrowser",
                    "multiprocessing", "threading", "_thread", "signal", "asyncio", "io", "_io", "pathlib",
                    "tempfile", "glob", "urllib", "http", "ftplib", "smtplib", "commands", "popen2",
                    "platform", "pdb", "timeit", "trace", "profile", "cProfile", "zipimport", "pkgutil"}
_HOSTILE_BUILTINS = {"eval", "exec", "compile", "open", "__import__", "getattr", "setattr", "delattr",
                     "globals", "locals", "vars", "input", "breakpoint", "exit", "quit", "help", "memoryview",
                     "super", "type", "classmethod", "staticmethod", "property", "print", "dir"}


class CheckpointReadError(ValueError):
  """A checkpoint that this reader cannot turn into arrays; the message names the file."""


class HostileCheckpointError(CheckpointReadError):
  """The pickle names a function that would run code; it was refused and nothing ran."""


class Opaque:
  """Stand-in for a class the unpickler refuses to import: keeps args and state only."""
  qualname = "?"

  def __new__(cls, *args, **kwargs):
    obj = super().__new__(cls)
    obj.args, obj.state, obj.items, obj.list = args, None, {}, []
    return obj

  def __init__(self, *args, **kwargs):
    pass

  def __setstate__(self, state):
    self.state = state

  def __setitem__(self, key, value):
    self.items[key] = value

  def append(self, value):
    self.list.append(value)

  def extend(self, values):
    self.list.extend(values)

  def __repr__(self):
    return f"<opaque {self.qualname}>"


def _opaque_class(module: str, name: str) -> type:
  return type(name, (Opaque,), {"qualname": f"{module}.{name}"})


class Storage:
  """One flat typed buffer; its bytes arrive from the zip entry or the legacy stream."""

  def __init__(self, dtype, numel: int, key: str):
    self.dtype, self.numel, self.key, self.data = np.dtype(dtype), numel, key, None


class LazyTensor:
  """A strided view into a Storage, materialised once the storage has its bytes."""

  def __init__(self, storage: Storage, offset: int, size, stride):
    self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

  def materialize(self, budget: list[int]) -> np.ndarray:
    """`budget`: [bytes left]; a view cannot make more bytes than the bound allows
    (a stride-0 view of one element could otherwise claim terabytes)."""
    data = self.storage.data
    if data is None:
      raise CheckpointReadError(f"storage {self.storage.key} has no data")
    if not all(isinstance(n, int) and n >= 0 for n in self.size + self.stride) or not isinstance(self.offset, int):
      raise CheckpointReadError(f"tensor of storage {self.storage.key}: bad size {self.size} or stride {self.stride}")
    nbytes = math.prod(self.size) * data.dtype.itemsize
    if nbytes > budget[0]:
      raise CheckpointReadError(f"tensor of storage {self.storage.key} ({self.size}) would exceed the size bound "
                                f"of the checkpoint; refused before allocating")
    budget[0] -= nbytes
    if any(s == 0 for s in self.size):
      return np.zeros(self.size, self.storage.dtype)
    last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
    if self.offset < 0 or last >= data.size:
      raise CheckpointReadError(f"tensor view exceeds storage {self.storage.key} ({data.size} elements)")
    itemsize = data.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(data[self.offset:], self.size, [s * itemsize for s in self.stride])
    return np.array(view)  # contiguous, owned copy


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  return LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *unused):
  return data


def _rebuild_from_type(func, new_type, args, state):
  return func(*args)


def _numpy_scalar(dtype, data=None):
  dtype = np.dtype(dtype)
  if dtype.kind not in "biufc?" or dtype.itemsize > 16:
    raise pickle.UnpicklingError(f"numpy scalar of dtype {dtype} is not plain numeric data")
  if data is None:
    return np.zeros((), dtype)[()]
  if not isinstance(data, bytes) or len(data) != dtype.itemsize:
    raise pickle.UnpicklingError(f"numpy scalar of dtype {dtype} with {len(data)} bytes of data")
  return np.frombuffer(data, dtype)[0]


def _latin1_bytes(text, encoding="latin1"):
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
    raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r}: only latin1 text spells bytes")
  return codecs.encode(text, "latin1")


def _refuse(what):
  def fail(*args):
    raise CheckpointReadError(f"{what} tensors are not supported by the torch-free reader")
  return fail


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch._utils", "_rebuild_qtensor"): _refuse("quantized"),
    ("torch._utils", "_rebuild_sparse_tensor"): _refuse("sparse"),
    ("torch._utils", "_rebuild_meta_tensor_no_storage"): _refuse("meta"),
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_bytes,  # how protocol-2 pickles spell bytes
}


class _StorageType:
  def __init__(self, name):
    self.name = name


class _PlainUnpickler(pickle.Unpickler):
  """For the legacy header: ints, strings, lists and dicts only; any global is refused."""

  def find_class(self, module, name):
    raise HostileCheckpointError(f"the legacy header names {module}.{name}; a header holds plain data only, "
                                 "so the file was refused (nothing was run)")

  def persistent_load(self, pid):
    raise pickle.UnpicklingError("the legacy header holds a persistent id; it holds plain data only")


def _is_hostile(module: str, name: str) -> bool:
  top = module.split(".")[0]
  return top in _HOSTILE_MODULES or (top in ("builtins", "__builtin__") and name in _HOSTILE_BUILTINS)


class _Unpickler(pickle.Unpickler):
  def __init__(self, file, storage_factory):
    super().__init__(file)
    self._storage_factory = storage_factory

  def find_class(self, module, name):
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    if module == "torch" and name in STORAGE_DTYPES:
      return _StorageType(name)
    if _is_hostile(module, name):
      raise HostileCheckpointError(f"the pickle names {module}.{name}, a function that runs code or reaches the "
                                   "system; no checkpoint needs one, so the file was refused (nothing was run)")
    return _opaque_class(module, name)

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
      raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
    storage_type, key, numel = pid[1], str(pid[2]), pid[4]
    if not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
      raise pickle.UnpicklingError(f"storage {key} declares {numel!r} elements")
    if len(pid) > 5 and pid[5] is not None:  # legacy storage views (torch < 1.0)
      raise pickle.UnpicklingError(f"storage views are not supported (storage {key})")
    if isinstance(storage_type, _StorageType):
      dtype = STORAGE_DTYPES[storage_type.name]
    else:
      raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r}")
    return self._storage_factory(dtype, numel, key)


def _resolve(obj, budget: list[int]):
  """Replaces every LazyTensor in dicts/lists/tuples/Opaque records by an array."""
  if isinstance(obj, LazyTensor):
    return obj.materialize(budget)
  if isinstance(obj, dict):
    return type(obj)((k, _resolve(v, budget)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(_resolve(v, budget) for v in obj)
  if isinstance(obj, Opaque):
    obj.args, obj.state = _resolve(obj.args, budget), _resolve(obj.state, budget)
    obj.items, obj.list = _resolve(obj.items, budget), _resolve(obj.list, budget)
  return obj


def _check_total(path: str, storages: dict, max_bytes: int) -> None:
  total = sum(s.numel * s.dtype.itemsize for s in storages.values())
  if total > max_bytes:
    raise CheckpointReadError(
        f"{path}: its storages declare {total:,} bytes, over the bound of {max_bytes:,} for the model being "
        "filled; refused before reading them (raise the bound with convert --max_checkpoint_gb if genuine)")


def _frombuffer(raw: bytes, dtype: np.dtype, byteorder: str) -> np.ndarray:
  if byteorder == "little":
    return np.frombuffer(raw, dtype)
  return np.frombuffer(raw, dtype.newbyteorder(">")).astype(dtype)


def _load_zip(path: str, max_bytes: int) -> Any:
  with zipfile.ZipFile(path) as archive:
    names = set(archive.namelist())
    pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
      raise CheckpointReadError(f"{path}: a torch zip checkpoint holds one <name>/data.pkl, found {pickles}")
    prefix = pickles[0][: -len("data.pkl")]
    byteorder = (_read_entry(archive, prefix + "byteorder", 16, path).decode("ascii", "replace").strip()
                 if prefix + "byteorder" in names else "little")
    if byteorder not in ("little", "big"):
      raise CheckpointReadError(f"{path}: byteorder entry says {byteorder!r}")
    storages: dict[str, Storage] = {}

    def storage(dtype, numel, key):
      return storages.setdefault(key, Storage(dtype, numel, key))

    data_pkl = _read_entry(archive, pickles[0], MAX_PICKLE_BYTES, path)
    obj = _Unpickler(io.BytesIO(data_pkl), storage).load()
    _check_total(path, storages, max_bytes)
    for s in storages.values():  # only now, each read bounded by the size its pickle declared
      raw = _read_entry(archive, f"{prefix}data/{s.key}", s.numel * s.dtype.itemsize, path, exact=True)
      s.data = _frombuffer(raw, s.dtype, byteorder)
  return _resolve(obj, [max_bytes])


def _read_entry(archive: zipfile.ZipFile, name: str, size: int, path: str, exact: bool = False) -> bytes:
  """An entry's bytes, refused unless its declared and its decompressed size are `size`
  (exact) or at most `size`: a deflated entry cannot inflate past what was declared."""
  try:
    info = archive.getinfo(name)
  except KeyError:
    raise CheckpointReadError(f"{path}: entry {name} is missing") from None
  if info.file_size > size or (exact and info.file_size != size):
    raise CheckpointReadError(f"{path}: entry {name} declares {info.file_size:,} bytes, expected "
                              f"{'' if exact else 'at most '}{size:,}; refused before decompressing")
  with archive.open(info) as f:
    raw = f.read(size + 1)  # +1: an entry longer than it declared is caught, never read whole
  if len(raw) != info.file_size:
    raise CheckpointReadError(f"{path}: entry {name} holds {len(raw):,} bytes but declares {info.file_size:,}")
  return raw


def _plain(value, what: str, path: str):
  """The legacy header's values: ints, strings, bools, and lists/dicts of them."""
  ok = (isinstance(value, (int, str, bytes, float)) or value is None
        or (isinstance(value, (list, tuple)) and all(isinstance(v, (int, str, bytes)) for v in value))
        or (isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, (int, str, bool, float, dict))
                                            for k, v in value.items())))
  if not ok:
    raise CheckpointReadError(f"{path}: the legacy header's {what} is a {type(value).__name__}, not plain data")
  return value


def _load_legacy(path: str, max_bytes: int) -> Any:
  file_size = os.path.getsize(path)
  with open(path, "rb") as f:
    if _plain(_PlainUnpickler(f).load(), "magic number", path) != _LEGACY_MAGIC:
      raise CheckpointReadError(f"{path} is neither a zip nor a legacy torch checkpoint")
    _plain(_PlainUnpickler(f).load(), "protocol version", path)
    sys_info = _plain(_PlainUnpickler(f).load(), "sys info", path)
    if not isinstance(sys_info, dict) or not sys_info.get("little_endian", True):
      raise CheckpointReadError(f"{path}: big-endian or unlabelled legacy checkpoints are not supported")
    storages: dict[str, Storage] = {}

    def storage(dtype, numel, key):
      return storages.setdefault(key, Storage(dtype, numel, key))

    obj = _Unpickler(_Clamped(f, file_size), storage).load()
    _check_total(path, storages, max_bytes)
    keys = _plain(_PlainUnpickler(f).load(), "storage keys", path)
    if not isinstance(keys, (list, tuple)):
      raise CheckpointReadError(f"{path}: the legacy storage keys are a {type(keys).__name__}, not a list")
    for key in keys:
      s = storages.get(str(key))
      if s is None:
        raise CheckpointReadError(f"{path}: storage {key} is listed but no tensor uses it")
      (numel,) = struct.unpack("<q", _read_exact(f, 8, path, key))
      nbytes = numel * s.dtype.itemsize
      if numel != s.numel or nbytes > file_size - f.tell():
        raise CheckpointReadError(f"{path}: storage {key} declares {numel:,} elements ({s.numel:,} in the pickle) "
                                  f"but {file_size - f.tell():,} bytes are left in the file")
      s.data = np.frombuffer(_read_exact(f, nbytes, path, key), s.dtype)
  return _resolve(obj, [max_bytes])


class _Clamped:
  """The file as the unpickler sees it: no read asks for more than the file still holds
  (a pickle declaring a 32 TB bytes object reads as truncated, allocating nothing)."""

  def __init__(self, f, size: int):
    self._f, self._size = f, size

  def _left(self, n) -> int:
    left = max(0, self._size - self._f.tell())
    return left if n is None or n < 0 else min(n, left)

  def read(self, n=-1) -> bytes:
    return self._f.read(self._left(n))

  def readline(self, n=-1) -> bytes:
    return self._f.readline(self._left(n))

  def readinto(self, buffer) -> int:
    return self._f.readinto(memoryview(buffer)[: self._left(len(buffer))])


def _read_exact(f, n: int, path: str, key) -> bytes:
  raw = f.read(n)
  if len(raw) != n:
    raise CheckpointReadError(f"{path} is truncated (storage {key})")
  return raw


# What a damaged or hostile pickle can make the unpickler or numpy raise.
_READ_ERRORS = (pickle.UnpicklingError, EOFError, KeyError, struct.error, zipfile.BadZipFile, ValueError,
                TypeError, IndexError, AttributeError, OverflowError, UnicodeDecodeError, RecursionError,
                NotImplementedError, zipfile.LargeZipFile, OSError, MemoryError)


def load(path: str, *, max_bytes: int | None = None) -> Any:
  """The unpickled object, with tensors as numpy arrays (bf16 as ml_dtypes' bfloat16).

  max_bytes: bound on the storages' bytes (and on the arrays viewed from them), checked
    before they are read; default DEFAULT_MAX_BYTES.
  """
  max_bytes = DEFAULT_MAX_BYTES if max_bytes is None else int(max_bytes)
  try:
    if zipfile.is_zipfile(path):
      return _load_zip(path, max_bytes)
    return _load_legacy(path, max_bytes)
  except CheckpointReadError as e:
    if path in str(e):
      raise
    raise type(e)(f"{path}: {e}") from e
  except _READ_ERRORS as e:
    raise CheckpointReadError(f"cannot read {path} as a PyTorch checkpoint: {type(e).__name__}: {e}") from e
