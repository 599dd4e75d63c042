"""The index folder on disk, read: its layout, and the one reader of it (`writer` writes it).

    manifest.json   what the index is of (checkpoint, model, data, tiling, knobs), its mode,
                    row count and dim, and the growth record; written LAST, so a folder
                    holding it is whole
    rows.npz        per-row metadata: label, source_id, coords, and where each row's picture
                    is (ORIGIN_FIELDS: `dataset_row` in the split the index was built from,
                    or `patch_file`/`patch_offset`/`patch_bytes` for a row added later);
                    rows of whole-slide patches also carry SLIDE_FIELDS: `case_id` and
                    `region` (level-0 x, y, width, height; source_id is the slide id).
                    Indexes without them load with none of their rows a slide.
    gallery.npy     mode 'exact': the unit float rows
    codes.npy, codebooks.npy   mode 'adc': PQ codes and the model's codebooks
    scann/          ScaNN modes: the serialised searcher (relocatable)
    patches/<batch>.pngs       pictures of added rows: PNGs concatenated

Readers (the query path, the service's search and picture routes) import this module
and never `writer`, `growth` or `curator`.
"""

from __future__ import annotations

import os

import numpy as np
import scann
from etils import epath

from histojax import fileio, health, untrusted
from histojax.indexing.searcher import Index

FORMAT_VERSION = 2  # written by `writer`; read here
ORIGIN_FIELDS = ("dataset_row", "patch_file", "patch_offset", "patch_bytes")
SLIDE_FIELDS = ("case_id", "region")
# What `writer.write_contents` puts in scann/; anything else (scann_docids.pkl, which ScaNN would
# unpickle) is refused on load.
_SCANN_SUFFIXES = (".pb", ".pbtxt", ".npy")
_MODES_ON_DISK = ("exact", "adc", "brute_force", "ah", "tree_ah")


class ManifestMismatch(ValueError):
  """The index was built for something other than what is asking (model, step, data)."""


def mismatches(manifest: dict, expected: dict) -> list[str]:
  """'field: index has A, query has B' for each field of `expected` that differs."""
  return [f"{key}: index has {manifest.get(key)!r}, query has {value!r}"
          for key, value in expected.items() if manifest.get(key) != value]


def check_manifest(manifest: dict, expected: dict, directory, what: str = "query model") -> None:
  """Raises `ManifestMismatch` naming every field where `expected` differs from the index's manifest."""
  wrong = mismatches(manifest, expected)
  if wrong:
    raise ManifestMismatch(f"index {directory} does not match the {what}:\n  " + "\n  ".join(wrong))


# --- Reading ---------------------------------------------------------------------------

def read_manifest(directory: epath.PathLike) -> dict:
  directory = epath.Path(directory)
  path = directory / "manifest.json"
  if not path.exists():
    raise FileNotFoundError(f"{directory} is not an index: it has no manifest.json")
  manifest = untrusted.read_json(path, "index manifest")
  if manifest.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{path}: index format version {manifest.get('format_version')!r}, this code reads "
                     f"{FORMAT_VERSION}; rebuild it with `python -m histojax.evaluate --workdir ...`")
  wrong = [f"{k}={manifest.get(k)!r}" for k, ok in (
      ("mode", lambda v: v in _MODES_ON_DISK),
      ("count", lambda v: isinstance(v, int) and v > 0), ("dim", lambda v: isinstance(v, int) and v > 0),
      ("params", lambda v: v is None or isinstance(v, dict))) if not ok(manifest.get(k))]
  if wrong:
    raise untrusted.CorruptFileError(f"{path}: damaged index manifest ({', '.join(wrong)}); rebuild the index")
  return manifest


def load(directory: epath.PathLike) -> tuple[Index, dict]:
  directory = epath.Path(directory)
  manifest = read_manifest(directory)
  mode = manifest["mode"]
  gallery = codes = codebooks = searcher = None
  if mode == "adc":
    codes, codebooks = fileio.load_npy(directory / "codes.npy"), fileio.load_npy(directory / "codebooks.npy")
  elif mode == "exact":
    gallery = fileio.load_npy(directory / "gallery.npy")
  else:
    searcher = _load_searcher(directory / "scann")
  _check_shapes(directory, manifest, gallery, codes)
  health.warn(manifest.get("spread"), f"index {directory}")  # recorded at export; none in older manifests
  return Index(mode, gallery, searcher, codes, codebooks, dict(manifest.get("params", {})),
               manifest["count"], manifest["dim"]), manifest


def _load_searcher(folder: epath.Path):
  if not (folder / "scann_assets.pbtxt").exists():  # else ScaNN would rewrite the folder itself
    raise FileNotFoundError(f"{folder} has no scann_assets.pbtxt: not a searcher saved by histojax; rebuild the index")
  strange = sorted(p.name for p in folder.iterdir() if not p.name.endswith(_SCANN_SUFFIXES))
  if strange:
    raise untrusted.CorruptFileError(f"{folder} holds files no histojax index has ({', '.join(strange)}); "
                                     "refused without loading (a .pkl there would be unpickled by ScaNN)")
  with fileio.local_copy(folder) as local:  # ScaNN reads local folders only
    for npy in local.glob("*.npy"):  # the very bytes ScaNN will read, checked first:
      untrusted.check_npy(npy)  # sizes against the file, object arrays refused
    try:
      return scann.scann_ops_pybind.load_searcher(str(local), assets_backcompat_shim=False)
    except (RuntimeError, IndexError, ValueError, UnicodeDecodeError, OSError) as e:
      raise untrusted.CorruptFileError(f"{folder}: ScaNN cannot load this searcher (damaged?): "
                                       f"{type(e).__name__}: {e}; rebuild the index") from None


def _check_shapes(directory, manifest: dict, gallery, codes) -> None:
  n = len(gallery) if gallery is not None else len(codes) if codes is not None else None
  if n is not None and (n != manifest["count"] or (gallery is not None and gallery.shape[1:] != (manifest["dim"],))):
    raise untrusted.CorruptFileError(f"{directory}: the arrays hold {n} rows, the manifest says {manifest['count']} "
                                     f"of dim {manifest['dim']}; rebuild the index")


def load_if_matching(directory: epath.PathLike, expected: dict) -> tuple[Index, dict] | None:
  """The index in `directory` if its manifest agrees with `expected` on every field, else None."""
  try:
    manifest = read_manifest(directory)
  except (FileNotFoundError, ValueError):
    return None
  return load(directory) if not mismatches(manifest, expected) else None


# --- Rows and where their pictures are ----------------------------------------------------

def with_origin(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """`rows` with the picture fields; an index never grown has row i = split row i."""
  n = len(rows["label"])
  defaults = {"dataset_row": np.arange(n, dtype=np.int64), "patch_file": np.full(n, "", dtype="<U1"),
              "patch_offset": np.zeros(n, np.int64), "patch_bytes": np.zeros(n, np.int64)}
  return {**defaults, **rows}


def with_slide_fields(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """`rows` with SLIDE_FIELDS; an index written before them (or without slides) has no case
  ids and no slide regions (width 0: not a slide patch)."""
  n = len(rows["label"])
  defaults = {"case_id": np.full(n, "", dtype="<U1"), "region": np.zeros((n, 4), np.int32)}
  found = {**defaults, **rows}
  region = np.asarray(found["region"])
  if region.shape != (n, 4) or len(found["case_id"]) != n:
    raise untrusted.CorruptFileError(f"rows.npz: region {region.shape} / case_id {np.shape(found['case_id'])} "
                                     f"do not fit {n} rows; rebuild the index")
  return found


def slide_mask(rows: dict[str, np.ndarray]) -> np.ndarray:
  """True for the rows that are patches of a whole-slide image (they have a level-0 region)."""
  return np.asarray(rows["region"])[:, 2] > 0 if "region" in rows else np.zeros(len(rows["label"]), bool)


def stored_rows(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The rows as written: SLIDE_FIELDS only when some row uses them (a photo index stays as it was)."""
  if "region" in rows and not slide_mask(rows).any() and not np.char.str_len(rows["case_id"].astype(str)).any():
    return {k: v for k, v in rows.items() if k not in SLIDE_FIELDS}
  return rows


def load_rows(directory: epath.PathLike) -> dict[str, np.ndarray]:
  """Per-row metadata saved with the index (label, source_id, coords), with the picture
  fields (`with_origin`) filled in for an index never grown, and the slide fields
  (`with_slide_fields`) for one that holds no slide."""
  path = epath.Path(directory) / "rows.npz"
  if not path.exists():
    raise FileNotFoundError(f"index {directory} has no rows.npz (labels and ids of its gallery rows)")
  return with_slide_fields(with_origin(fileio.load_npz(path)))


def added_patch_png(directory, rows: dict, row: int) -> bytes | None:
  """The PNG an added row was embedded from; None for a row of the dataset."""
  name = str(rows["patch_file"][row]) if "patch_file" in rows else ""
  if not name:
    return None
  with open(os.path.join(os.fspath(directory), name), "rb") as f:
    f.seek(int(rows["patch_offset"][row]))
    return f.read(int(rows["patch_bytes"][row]))
