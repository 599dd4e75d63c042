"""Checkpoint state + TFDS split -> embeddings and metadata on disk.

An export folder holds `embeddings.npy` [n, d] (float32, unit rows, in split
order), `metadata.npz` (label, source_id, coords) and `manifest.json`. It is
written to a staging folder and renamed into place, so a reader never sees a
half-written export, and it is reused when its manifest matches.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
from etils import epath
from flax import nnx

from histojax import mesh as mesh_lib
from histojax import step as step_lib
from histojax.data import pipeline, sources


@dataclasses.dataclass
class Export:
  embeddings: np.ndarray
  label: np.ndarray
  source_id: np.ndarray
  coords: np.ndarray
  manifest: dict


def embed_source(trainer: step_lib.Trainer, state: nnx.State, source, image_size: int,
                 global_batch: int, num_workers: int = 0) -> np.ndarray:
  """Eval-mode embeddings of every example of `source`, in order.

  Every process runs the same number of padded batches; each row is placed
  by its example index, and the count check proves no example was dropped
  or written twice.
  """
  mesh = trainer.mesh
  mesh_lib.local_batch_size(global_batch, mesh, "input.eval_batch_size")
  embed = step_lib.jit_embed(trainer)
  n = len(source)
  out, seen = None, np.zeros(n, np.int32)
  for batch in pipeline.eval_dataset(source, image_size, global_batch, jax.process_index(),
                                     jax.process_count(), num_workers):
    arrays = mesh_lib.to_global({"image": batch["image"], "index": batch["index"]}, mesh)
    emb, index = mesh_lib.to_host((embed(state, arrays["image"]), arrays["index"]))
    if out is None:
      out = np.zeros((n, emb.shape[1]), np.float32)
    real = index >= 0
    out[index[real]] = emb[real]
    np.add.at(seen, index[real], 1)
  if n == 0 or not np.all(seen == 1):
    raise RuntimeError(f"export covered {np.sum(seen > 0)} of {n} examples "
                       f"({np.sum(seen > 1)} more than once)")
  return out


def export_split(trainer: step_lib.Trainer, state: nnx.State, config, split: str,
                 directory: epath.PathLike, step: int) -> Export:
  """Embeds one split and writes it to `directory` (reused if already there)."""
  directory = epath.Path(directory)
  manifest = {"dataset": config.dataset.name, "split": split, "step": step,
              "model": config.model.to_dict(), "image_size": config.input.image_size}
  existing = _load_if_matching(directory, manifest)
  if existing is not None:
    return existing
  source = sources.open_split(config.dataset.name, split, config.dataset.data_dir)
  meta = sources.read_metadata(source)
  embeddings = embed_source(trainer, state, source, config.input.image_size,
                            config.input.eval_batch_size, config.input.num_workers)
  manifest.update(count=int(embeddings.shape[0]), dim=int(embeddings.shape[1]), normalized=True)
  result = Export(embeddings, meta["label"], meta["source_id"], meta["coords"], manifest)
  if jax.process_index() == 0:
    _write(directory, result)
  return result


def _write(directory: epath.Path, export: Export) -> None:
  staging = directory.parent / f".{directory.name}.partial"
  if staging.exists():
    staging.rmtree()
  staging.mkdir(parents=True)
  with (staging / "embeddings.npy").open("wb") as f:
    np.save(f, export.embeddings)
  with (staging / "metadata.npz").open("wb") as f:
    np.savez(f, label=export.label, source_id=export.source_id, coords=export.coords)
  (staging / "manifest.json").write_text(json.dumps(export.manifest, indent=2, sort_keys=True))
  if directory.exists():
    directory.rmtree()
  staging.rename(directory)


def load(directory: epath.PathLike) -> Export:
  directory = epath.Path(directory)
  if not (directory / "manifest.json").exists():
    raise FileNotFoundError(f"{directory} holds no export (no manifest.json)")
  manifest = json.loads((directory / "manifest.json").read_text())
  with (directory / "embeddings.npy").open("rb") as f:
    embeddings = np.load(f)
  with (directory / "metadata.npz").open("rb") as f:
    meta = dict(np.load(f))
  return Export(embeddings, meta["label"], meta["source_id"], meta["coords"], manifest)


def _load_if_matching(directory: epath.Path, manifest: dict) -> Export | None:
  if not (directory / "manifest.json").exists():
    return None
  existing = load(directory)
  same = all(existing.manifest.get(k) == v for k, v in manifest.items())
  return existing if same else None
