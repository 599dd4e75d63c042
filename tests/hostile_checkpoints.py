"""PyTorch-layout checkpoints written without torch, honest or hostile, for the reader's tests.

Tensors are pickled the way torch does (`torch._utils._rebuild_tensor_v2` over a
persistent storage id); the names resolve to stand-ins registered only while
pickling, so no `torch` module is left behind.
"""

from __future__ import annotations

import collections
import contextlib
import io
import os
import pickle
import struct
import sys
import types
import zipfile
from unittest import mock

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
SYS_INFO = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}


class Payload:
  """Runs `touch marker` when unpickled by a plain unpickler (the issue's exploit)."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


class Tensor:
  """A float32 tensor as torch pickles it: a view (offset, size, stride) of a storage."""

  def __init__(self, array, key, size=None, stride=None, offset=0, numel=None):
    self.array = np.ascontiguousarray(array, np.float32).ravel()
    self.key, self.offset = key, offset
    self.size = tuple(np.shape(array)) if size is None else tuple(size)
    self.stride = tuple(int(s) // 4 for s in np.asarray(array).strides) if stride is None else tuple(stride)
    self.numel = self.array.size if numel is None else numel

  def __reduce__(self):
    rebuild = sys.modules["torch._utils"]._rebuild_tensor_v2
    return (rebuild, (_StorageRef(self), self.offset, self.size, self.stride, False, collections.OrderedDict()))


class _StorageRef:
  def __init__(self, tensor):
    self.tensor = tensor


class _Pickler(pickle.Pickler):
  def persistent_id(self, obj):
    if isinstance(obj, _StorageRef):
      t = obj.tensor
      return ("storage", sys.modules["torch"].FloatStorage, t.key, "cpu", t.numel)
    return None


@contextlib.contextmanager
def _torch_names():
  torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")

  def _rebuild_tensor_v2(*args):
    raise AssertionError("never called: only its name is pickled")

  _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
  storage = type("FloatStorage", (), {"__module__": "torch"})
  torch.FloatStorage, utils._rebuild_tensor_v2 = storage, _rebuild_tensor_v2
  with mock.patch.dict(sys.modules, {"torch": torch, "torch._utils": utils}):
    yield


def dumps(obj) -> bytes:
  with _torch_names():
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def tensors_in(obj) -> list[Tensor]:
  if isinstance(obj, Tensor):
    return [obj]
  if isinstance(obj, dict):
    return [t for v in obj.values() for t in tensors_in(v)]
  if isinstance(obj, (list, tuple)):
    return [t for v in obj for t in tensors_in(v)]
  return []


def write_zip(path, obj, *, prefix="archive", storage_bytes=None, extra=None, compression=zipfile.ZIP_STORED):
  """`storage_bytes`: {key: bytes} replacing what a storage's entry holds."""
  with zipfile.ZipFile(path, "w", compression) as z:
    z.writestr(f"{prefix}/data.pkl", dumps(obj))
    z.writestr(f"{prefix}/byteorder", "little")
    for t in {t.key: t for t in tensors_in(obj)}.values():
      z.writestr(f"{prefix}/data/{t.key}", (storage_bytes or {}).get(t.key, t.array.tobytes()))
    for name, data in (extra or {}).items():
      z.writestr(f"{prefix}/{name}", data)
  return str(path)


def write_legacy(path, obj, *, magic=LEGACY_MAGIC, protocol=1001, sys_info=None, keys=None, numels=None,
                 storage_bytes=None):
  """torch < 1.6's stream; any header part can be replaced (e.g. by a Payload)."""
  tensors = {t.key: t for t in tensors_in(obj)}
  with open(path, "wb") as f:
    for part in (magic, protocol, SYS_INFO if sys_info is None else sys_info):
      pickle.dump(part, f, protocol=2)
    f.write(dumps(obj))
    pickle.dump(list(tensors) if keys is None else keys, f, protocol=2)
    for key, t in tensors.items():
      f.write(struct.pack("<q", (numels or {}).get(key, t.array.size)))
      f.write((storage_bytes or {}).get(key, t.array.tobytes()))
  return str(path)
