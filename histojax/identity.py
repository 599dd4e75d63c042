"""What identifies a model beside its checkpoint: the weights' fingerprint and the input and
embedding normalisation it was trained with.

Exports and indexes record both (`manifest.json`), and the query path refuses a model
whose fingerprint or normalisation differs from the index's. This module needs JAX and
Flax only: the query path reads it without the data pipeline (Grain, TFDS).
"""

from __future__ import annotations

import hashlib

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from histojax.models import embedder

# What every export and index recorded before the normalisation was read from the model
# config: ImageNet statistics, whatever `model.input_norm` said.
LEGACY_NORMALIZATION = {"input": "imagenet_mean_std", "input_mean": list(embedder.IMAGENET_MEAN),
                        "input_std": list(embedder.IMAGENET_STD), "embedding": "l2"}


def normalization(model_cfg) -> dict:
  """The input statistics (0..255 scale) the model divides out, and the embedding's norm.

  ImageNet models give exactly the record earlier exports wrote."""
  name = model_cfg.get("input_norm", "imagenet") if hasattr(model_cfg, "get") else "imagenet"
  mean, std = embedder.input_stats(name)
  return {"input": f"{name}_mean_std", "input_mean": list(mean), "input_std": list(std), "embedding": "l2"}


def normalization_matches(recorded, model_cfg) -> bool:
  """Whether an index's recorded normalisation is this model's. A legacy record (ImageNet for
  every model) is accepted for any model: the fingerprint already pins the weights."""
  return recorded == normalization(model_cfg) or recorded == LEGACY_NORMALIZATION


def host_value(leaf) -> np.ndarray:
  """The whole value of a (possibly sharded, possibly multi-process) array, on this host.

  A leaf split over `fsdp` across processes is gathered from all of them
  (a collective: every process calls this for the same leaves in the same
  order); a leaf this process holds whole is read locally.
  """
  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
  return np.asarray(jax.device_get(leaf))


def fingerprint(trainer, state: nnx.State) -> str:
  """sha256 (16 hex) of the model's parameters and batch statistics, path by path.

  Two checkpoints with the same step but different weights (a rerun) differ
  here, so neither an export nor an index is reused across them. The whole
  value of each array is hashed, not this process's shard of it, so every
  process (and any layout: replicated or split over fsdp) gets the same hash.
  `trainer` is a `step.Trainer` (its `graphdef`).
  """
  model, _ = nnx.merge(trainer.graphdef, state)
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))):
    array = host_value(leaf)
    digest.update(f"{jax.tree_util.keystr(path)}|{array.dtype}|{array.shape}|".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
  if jax.process_count() > 1:  # a reuse decision taken on some processes only would deadlock them
    multihost_utils.assert_equal(np.frombuffer(digest.digest(), np.uint8),
                                 "weights fingerprint differs between processes")
  return digest.hexdigest()[:16]
