"""Checkpoint files -> flat state dicts {"layer1.0.conv1.weight": numpy array}.

`.safetensors` and `.npz` hold flat dicts already. PyTorch files (`.pt`,
`.pth`, `.bin`, `.ckpt`, `.tar`) are read without torch (`torch_pickle`);
training checkpoints wrap the weights in a dict ({"model": ..., "optimizer":
...}), which `key` selects or, by default, the usual names do. TorchScript
archives hold a module tree, flattened here the way `state_dict()` names it.
"""

from __future__ import annotations

import os
import zipfile

import numpy as np
from safetensors import SafetensorError, safe_open

from histojax.weights import torch_pickle

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")
SUFFIXES = (".safetensors", ".npz") + TORCH_SUFFIXES
# Where training scripts put the weights, tried in this order (DINO's
# evaluation network is its teacher).
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module", "teacher", "net")


def read_state_dict(path: str, key: str = "", prefix: str = "", max_bytes: int | None = None) -> dict[str, np.ndarray]:
  """All tensors of `path` by name.

  key: dotted path to the weights inside a wrapping dict ("model",
    "ema.state_dict"); "" finds the usual wrappers.
  prefix: keep only names starting with it, with it removed ("visual.").
  max_bytes: refuse (CheckpointReadError) a file whose tensors declare more bytes,
    before reading them; default torch_pickle.DEFAULT_MAX_BYTES.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint {path} does not exist")
  suffix = next((s for s in SUFFIXES if path.endswith(s)), None)
  if suffix is None:
    raise ValueError(f"{path}: unknown checkpoint type; known suffixes: {', '.join(SUFFIXES)}")
  max_bytes = torch_pickle.DEFAULT_MAX_BYTES if max_bytes is None else max_bytes
  if suffix == ".safetensors":
    tensors = _read_safetensors(path, max_bytes)
  elif suffix == ".npz":
    tensors = _read_npz(path, max_bytes)
  else:
    tensors = flatten_tensors(_select(torch_pickle.load(path, max_bytes=max_bytes), key, path))
  tensors = _strip_data_parallel(tensors)
  if prefix:
    tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
  if not tensors:
    raise ValueError(f"{path}: no tensors found" + (f" under prefix {prefix!r}" if prefix else ""))
  return tensors


def _read_safetensors(path: str, max_bytes: int) -> dict[str, np.ndarray]:
  """The library validates the header (length, JSON, offsets inside the file, no overlap);
  its errors are named here. Tensors are file bytes, so the file size bounds them."""
  if os.path.getsize(path) > max_bytes + (100 << 20):  # + the largest header the format allows
    raise torch_pickle.CheckpointReadError(f"{path}: {os.path.getsize(path):,} bytes, over the bound of "
                                           f"{max_bytes:,} for the model being filled")
  try:
    with safe_open(path, framework="numpy") as f:
      return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (safe_open is not a dict)
  except (SafetensorError, ValueError, TypeError, OSError, OverflowError) as e:
    raise torch_pickle.CheckpointReadError(f"cannot read {path} as safetensors: {type(e).__name__}: {e}") from e


def _read_npz(path: str, max_bytes: int) -> dict[str, np.ndarray]:
  """Arrays of a .npz, pickled objects refused; compressed members may not inflate past max_bytes."""
  try:
    with zipfile.ZipFile(path) as z:
      declared = sum(i.file_size for i in z.infolist())
    if declared > max_bytes:
      raise torch_pickle.CheckpointReadError(f"{path}: its arrays declare {declared:,} bytes, over the bound of "
                                             f"{max_bytes:,} for the model being filled")
    with np.load(path, allow_pickle=False) as f:
      return dict(f)
  except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
    if isinstance(e, torch_pickle.CheckpointReadError):
      raise
    raise torch_pickle.CheckpointReadError(f"cannot read {path} as .npz arrays: {type(e).__name__}: {e}") from e


def _is_state_dict(obj) -> bool:
  return isinstance(obj, dict) and any(isinstance(v, np.ndarray) for v in obj.values())


def _select(obj, key: str, path: str):
  """The part of an unpickled checkpoint that holds the weights."""
  if key:
    for part in key.split("."):
      if not isinstance(obj, dict) or part not in obj:
        have = sorted(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise KeyError(f"{path}: no {part!r} in the checkpoint (while selecting key {key!r}); found {have}")
      obj = obj[part]
    return obj
  if _is_state_dict(obj) or isinstance(obj, torch_pickle.Opaque):
    return obj
  if isinstance(obj, dict):
    for name in WRAPPER_KEYS:
      if name in obj and (_is_state_dict(obj[name]) or isinstance(obj[name], torch_pickle.Opaque)):
        return obj[name]
    raise ValueError(f"{path}: no weights at the top level and none of {WRAPPER_KEYS} holds them; "
                     f"top-level keys: {sorted(map(str, obj))}; pass the right one as --key")
  raise ValueError(f"{path}: holds a {type(obj).__name__}, not a state dict or module")


def flatten_tensors(obj, prefix: str = "") -> dict[str, np.ndarray]:
  """Arrays in nested dicts and TorchScript module records, named with dots."""
  out = {}
  if isinstance(obj, np.ndarray):
    out[prefix[:-1]] = obj
  elif isinstance(obj, dict):
    for k, v in obj.items():
      out.update(flatten_tensors(v, f"{prefix}{k}."))
  elif isinstance(obj, torch_pickle.Opaque) and isinstance(obj.state, dict):
    out.update(flatten_tensors(obj.state, prefix))  # a scripted module's attributes
  return out


def _strip_data_parallel(tensors: dict) -> dict:
  """nn.DataParallel saves every name with "module."; the weights are the same."""
  if tensors and all(k.startswith("module.") for k in tensors):
    return {k[len("module."):]: v for k, v in tensors.items()}
  return tensors
