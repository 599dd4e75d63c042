"""Hub weight folders: `config.json` beside `model.safetensors` or `pytorch_model.bin` (or their shards).

This is how timm (`hf-hub:` models with `config.json` holding `architecture`,
`model_args`, `pretrained_cfg`) and transformers (`save_pretrained`) publish
weights, and what a user downloads. Every file is read through the bounded,
torch-free readers (`readers.read_state_dict`); shard names from an index file
must be plain file names inside the folder.
"""

from __future__ import annotations

import hashlib
import os

from histojax import untrusted
from histojax.weights import readers, torch_pickle

# Checked in this order; an index (sharded weights) before the single file it replaces.
WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                "pytorch_model.bin")
MAX_CONFIG_BYTES = 1 << 20  # a config.json holds a few dozen fields


def sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 24), b""):
      digest.update(chunk)
  return digest.hexdigest()


def read_config(folder: str) -> dict:
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"{folder} is not a folder: --input must be a weight folder holding config.json "
                            f"and one of {', '.join(WEIGHT_FILES)}")
  return untrusted.read_json(os.path.join(folder, "config.json"), "model config.json", max_bytes=MAX_CONFIG_BYTES)


def weight_files(folder: str) -> list[str]:
  """The weight files of `folder`, shards in index order."""
  name = next((n for n in WEIGHT_FILES if os.path.isfile(os.path.join(folder, n))), None)
  if name is None:
    raise FileNotFoundError(f"{folder} holds none of {', '.join(WEIGHT_FILES)}")
  path = os.path.join(folder, name)
  if not name.endswith(".index.json"):
    return [path]
  index = untrusted.read_json(path, "weight index", max_bytes=64 << 20)
  weight_map = index.get("weight_map")
  if not isinstance(weight_map, dict) or not weight_map:
    raise untrusted.CorruptFileError(f"{path}: no weight_map in the weight index")
  shards = list(dict.fromkeys(weight_map.values()))
  for shard in shards:
    if not isinstance(shard, str) or os.path.basename(shard) != shard or shard in ("", ".", ".."):
      raise untrusted.CorruptFileError(f"{path}: shard {shard!r} is not a file name inside the folder")
  return [os.path.join(folder, s) for s in shards]


def read_weights(folder: str, max_bytes: int) -> tuple[dict, list[str]]:
  """(all tensors by name, the files read); `max_bytes` bounds all shards together."""
  files = weight_files(folder)
  total = sum(os.path.getsize(f) for f in files if os.path.isfile(f))
  if total > max_bytes + (100 << 20) * len(files):  # + each file's largest header
    raise torch_pickle.CheckpointReadError(f"{folder}: its weight files hold {total:,} bytes, over the bound of "
                                           f"{max_bytes:,} for the model being filled")
  tensors: dict = {}
  for path in files:
    part = readers.read_state_dict(path, max_bytes=max_bytes)
    clash = sorted(set(part) & set(tensors))
    if clash:
      raise torch_pickle.CheckpointReadError(f"{path}: tensors {clash[:5]} also appear in another shard")
    tensors.update(part)
  return tensors, files


def fingerprint(files: list[str]) -> tuple[str, dict[str, str]]:
  """(one sha256 for the weights, {file name: sha256}); a single file's is its own."""
  per_file = {os.path.basename(f): sha256(f) for f in files}
  if len(per_file) == 1:
    return next(iter(per_file.values())), per_file
  joined = "\n".join(f"{k}:{v}" for k, v in sorted(per_file.items()))
  return hashlib.sha256(joined.encode()).hexdigest(), per_file
