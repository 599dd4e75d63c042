"""The index and neighbours stages of evaluation: a gallery export -> a searchable index
(`<workdir>/index`, reused when built from the same export with the same knobs) -> each
query's top-k gallery rows after exclusions (a query's own source image, or itself)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from etils import epath

from histojax import export, indexing, metrics, monitor
from histojax.indexing import writer

IDENTITY = ("dataset", "split", "step", "fingerprint", "model", "image_size", "index_config", "build_k")


def index_manifest(config, workdir: epath.Path, gallery: export.Export, k: int) -> dict:
  """What the index is of: checkpoint, model, data, normalisation, tiling, knobs."""
  man = gallery.manifest
  return {"checkpoint": {"workdir": str(workdir.absolute()), "step": man["step"], "fingerprint": man["fingerprint"]},
          **{key: man.get(key) for key in ("dataset", "split", "step", "model", "image_size", "fingerprint",
                                            "normalization", "class_names", "tiling", "gallery_mpp", "slides", "pq", "spread")},
          "index_config": dataclasses.asdict(indexing.IndexConfig.from_config(config.eval.index)), "build_k": k}


def build_or_reuse_index(config, workdir: epath.Path, gallery: export.Export, k: int):
  """(index, manifest): the one in `<workdir>/index` when it was built from this very
  gallery export with these knobs, else a new one (saved by process 0)."""
  wanted = index_manifest(config, workdir, gallery, k)
  identity = {key: wanted[key] for key in IDENTITY}
  found = indexing.load_if_matching(workdir / "index", {**identity, "count": len(gallery.label)})
  if found is not None:
    monitor.info("reusing the index in %s", workdir / "index")
    return found
  # With PQ codes, 'auto' searches them (ADC); a float mode named in config uses the embeddings.
  idx = indexing.build(gallery.embeddings, config.eval.index, k=k, codes=gallery.codes, codebooks=gallery.codebooks)
  manifest = wanted
  if grown_by_hand(workdir / "index"):
    # Cases a user added with `histojax index add` exist nowhere else: never
    # overwrite them. Evaluation scores the export against this in-memory index.
    monitor.info("warning: %s holds cases added with `histojax index add`; evaluation searched a fresh in-memory "
                 "index of the export and left that folder as it is", workdir / "index")
  elif jax.process_index() == 0:
    manifest = writer.save(idx, workdir / "index", wanted, gallery.rows())
  return idx, manifest


def grown_by_hand(directory: epath.Path) -> bool:
  """True when the index folder was changed by `histojax index add|remove` (its manifest's growth log)."""
  if not (directory / "manifest.json").exists():
    return False
  try:
    return bool(indexing.read_manifest(directory).get("growth", {}).get("generation", 0))
  except (ValueError, OSError):
    return False  # a damaged manifest is rebuilt, as before


def exclusion_keys(gallery: export.Export, query: export.Export, same_split: bool,
                   exclude_same_source: bool):
  """Keys whose equality removes a gallery row from a query's results, or None.

  With `exclude_same_source`, a query never sees its own source image. Without
  it, a query searched against its own split still never sees itself.
  """
  if exclude_same_source:
    return gallery.source_id, query.source_id
  if same_split:
    rows = np.arange(len(query.label))
    return rows, rows
  return None


def retrieve(idx: indexing.Index, query: export.Export, k: int, keys):
  """Top-k (neighbours, scores) of every query after exclusions."""
  if keys is None:
    return indexing.search(idx, query.embeddings, k)
  extra = metrics.max_shared_source(*keys)
  neighbors, scores = indexing.search(idx, query.embeddings, k + extra)
  columns = metrics.kept_columns(neighbors, keys[0], keys[1], k)
  safe = np.maximum(columns, 0)
  return (np.where(columns >= 0, np.take_along_axis(neighbors, safe, 1), -1),
          np.where(columns >= 0, np.take_along_axis(scores, safe, 1), -np.inf).astype(np.float32))
