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
code, and tensors nested inside such records are still found.
"""

from __future__ import annotations

import codecs
import collections
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


class CheckpointReadError(ValueError):
  """A checkpoint that this reader cannot turn into arrays; the message names the file."""


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

  def materialize(self) -> np.ndarray:
    data = self.storage.data
    if data is None:
      raise CheckpointReadError(f"storage {self.storage.key} has no data")
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
  return np.frombuffer(data, dtype)[0] if data is not None else np.zeros((), dtype)[()]


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
    ("_codecs", "encode"): codecs.encode,  # how protocol-2 pickles spell bytes
}


class _StorageType:
  def __init__(self, name):
    self.name = name


class _Unpickler(pickle.Unpickler):
  def __init__(self, file, storage_factory):
    super().__init__(file)
    self._storage_factory = storage_factory

  def find_class(self, module, name):
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    if module == "torch" and name in STORAGE_DTYPES:
      return _StorageType(name)
    return _opaque_class(module, name)

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
      raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
    storage_type, key, numel = pid[1], str(pid[2]), pid[4]
    if len(pid) > 5 and pid[5] is not None:  # legacy storage views (torch < 1.0)
      raise pickle.UnpicklingError(f"storage views are not supported (storage {key})")
    if isinstance(storage_type, _StorageType):
      dtype = STORAGE_DTYPES[storage_type.name]
    else:
      raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r}")
    return self._storage_factory(dtype, numel, key)


def _resolve(obj):
  """Replaces every LazyTensor in dicts/lists/tuples/Opaque records by an array."""
  if isinstance(obj, LazyTensor):
    return obj.materialize()
  if isinstance(obj, dict):
    return type(obj)((k, _resolve(v)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(_resolve(v) for v in obj)
  if isinstance(obj, Opaque):
    obj.args, obj.state = _resolve(obj.args), _resolve(obj.state)
    obj.items, obj.list = _resolve(obj.items), _resolve(obj.list)
  return obj


def _load_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
      raise CheckpointReadError(f"{path}: a torch zip checkpoint holds one <name>/data.pkl, found {pickles}")
    prefix = pickles[0][: -len("data.pkl")]
    byteorder = archive.read(prefix + "byteorder").decode().strip() if prefix + "byteorder" in names else "little"
    storages: dict[str, Storage] = {}

    def storage(dtype, numel, key):
      if key not in storages:
        s = Storage(dtype, numel, key)
        raw = archive.read(f"{prefix}data/{key}")
        s.data = (np.frombuffer(raw, s.dtype) if byteorder == "little"
                  else np.frombuffer(raw, s.dtype.newbyteorder(">")).astype(s.dtype))
        storages[key] = s
      return storages[key]

    with archive.open(pickles[0]) as f:
      obj = _Unpickler(f, storage).load()
  return _resolve(obj)


def _load_legacy(path: str) -> Any:
  with open(path, "rb") as f:
    if pickle.load(f) != _LEGACY_MAGIC:
      raise CheckpointReadError(f"{path} is neither a zip nor a legacy torch checkpoint")
    pickle.load(f)  # protocol version
    sys_info = pickle.load(f)
    if not sys_info.get("little_endian", True):
      raise CheckpointReadError(f"{path}: big-endian legacy checkpoints are not supported")
    storages: dict[str, Storage] = {}

    def storage(dtype, numel, key):
      return storages.setdefault(key, Storage(dtype, numel, key))

    obj = _Unpickler(f, storage).load()
    for key in pickle.load(f):
      s = storages[str(key)]
      (numel,) = struct.unpack("<q", f.read(8))
      s.data = np.frombuffer(f.read(numel * s.dtype.itemsize), s.dtype)
      if s.data.size != numel:
        raise CheckpointReadError(f"{path} is truncated (storage {key})")
  return _resolve(obj)


def load(path: str) -> Any:
  """The unpickled object, with tensors as numpy arrays (bf16 as ml_dtypes' bfloat16)."""
  try:
    if zipfile.is_zipfile(path):
      return _load_zip(path)
    return _load_legacy(path)
  except (pickle.UnpicklingError, EOFError, KeyError, struct.error) as e:
    raise CheckpointReadError(f"cannot read {path} as a PyTorch checkpoint: {e}") from e
