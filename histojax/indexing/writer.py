"""The index folder on disk, written: one writer per mode, used by both ways an index is
written. `save` writes a new index whole (assembled locally, copied beside its
destination on any epath location, renamed into place: `evaluate`); `growth` writes a
changed one into a sibling folder through `write_contents` and swaps it in. The layout
is `store`'s docstring.
"""

from __future__ import annotations

import io
import json
import os
import tempfile

import numpy as np
import PIL.Image
from etils import epath

from histojax import fileio
from histojax.indexing.searcher import Index
from histojax.indexing.store import FORMAT_VERSION, stored_rows


def _write_exact(folder: str, idx: Index) -> None:
  np.save(os.path.join(folder, "gallery.npy"), idx.gallery)  # ScaNN modes keep their own copy


def _write_adc(folder: str, idx: Index) -> None:
  np.save(os.path.join(folder, "codes.npy"), idx.codes)
  np.save(os.path.join(folder, "codebooks.npy"), idx.codebooks)


def _write_scann(folder: str, idx: Index) -> None:
  os.makedirs(os.path.join(folder, "scann"))
  idx.searcher.serialize(os.path.join(folder, "scann"), relative_path=True)  # relocatable


def _writer(mode: str):
  return {"exact": _write_exact, "adc": _write_adc}.get(mode, _write_scann)


def full_manifest(idx: Index, manifest: dict) -> dict:
  """`manifest` with what the searcher itself says: format, mode, knobs, rows, dim, metric."""
  metric = idx.params.get("pq_metric", "dot_product") if idx.mode == "adc" else "dot_product"
  return {**manifest, "format_version": FORMAT_VERSION, "mode": idx.mode, "params": idx.params,
          "count": idx.size, "dim": idx.dim, "metric": metric}


def write_contents(folder: str, idx: Index, manifest: dict, rows: dict[str, np.ndarray] | None) -> dict:
  """Writes the mode's arrays, rows.npz, then manifest.json (fsynced) into the local
  `folder`, which must exist and be new. Returns the manifest written."""
  _writer(idx.mode)(folder, idx)
  if rows is not None:
    np.savez(os.path.join(folder, "rows.npz"), **stored_rows(rows))
  manifest = full_manifest(idx, manifest)
  with open(os.path.join(folder, "manifest.json"), "w") as f:  # last: a folder with it is whole
    json.dump(manifest, f, indent=2, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  return manifest


def save(idx: Index, directory: epath.PathLike, manifest: dict, rows: dict[str, np.ndarray] | None = None) -> dict:
  """Writes a new index whole, replacing an older one, so a reader never sees half of one.
  Returns the manifest written.

  ScaNN serialises to a local folder, so the index is assembled in a local temporary
  folder, copied next to its destination (any epath location: a local folder,
  gs://...), then renamed into place.
  """
  directory = epath.Path(directory)
  with tempfile.TemporaryDirectory() as tmp:
    manifest = write_contents(tmp, idx, manifest, rows)
    staging = fileio.staging_path(directory)
    if staging.exists():
      staging.rmtree()
    directory.parent.mkdir(parents=True, exist_ok=True)
    fileio.copy_tree(epath.Path(tmp), staging)
    if directory.exists():
      directory.rmtree()
    staging.rename(directory)
  return manifest


def encode_patches(patches: np.ndarray) -> tuple[bytes, np.ndarray, np.ndarray]:
  """PNG of each uint8 patch, concatenated, as a `patches/<batch>.pngs` file holds them;
  (data, offsets, lengths)."""
  blobs = []
  for patch in patches:
    buf = io.BytesIO()
    PIL.Image.fromarray(patch).save(buf, format="PNG")
    blobs.append(buf.getvalue())
  lengths = np.array([len(b) for b in blobs], np.int64)
  offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if len(blobs) else lengths
  return b"".join(blobs), offsets, lengths
