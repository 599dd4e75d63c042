"""Checkpoint state + TFDS split -> embeddings (+ PQ codes) and metadata on disk.

An export folder holds `embeddings.npy` [n, d] (float32, unit rows, in split
order), `metadata.npz` (label, source_id, coords; for whole-slide datasets case_id and
region too), `manifest.json` and, for a
model with PQ codebooks (SPQ), `codes.npy` [n, M] + `codebooks.npy` [M, K, d/M].

Writing is resumable and atomic. Rows are embedded in chunks of whole global
batches; each finished chunk is saved into a staging folder next to the
export, under a manifest naming the checkpoint it came from, so a run
interrupted after hours restarts at the first missing chunk. Only when every
row is there is the export assembled and renamed into place: a reader never
sees a half-written export, and an export already there is reused when its
manifest matches (same dataset, split, step, model and weights).

The PQ hook: an objective whose `codebooks(model)` gives codebooks
[M, K, d/M] and a metric (SPQ) gets its gallery encoded with `pq.encode`
(hard nearest codeword per sub-vector).
"""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from histojax import fileio, health, identity, models, pq, untrusted
from histojax import mesh as mesh_lib
from histojax import step as step_lib
from histojax.data import pipeline, sources, stain, tiling

CHUNK_EXAMPLES = 16_384  # rows per resumable chunk, rounded to whole global batches


@dataclasses.dataclass
class Export:
  embeddings: np.ndarray
  label: np.ndarray
  source_id: np.ndarray
  coords: np.ndarray
  manifest: dict
  codes: np.ndarray | None = None
  codebooks: np.ndarray | None = None
  extra: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # slides: case_id, region

  def rows(self) -> dict[str, np.ndarray]:
    return {"label": self.label, "source_id": self.source_id, "coords": self.coords, **self.extra}


# --- What identifies an export -------------------------------------------------

def dataset_tiling(name: str, data_dir: str = "", split: str = "train") -> dict | None:
  """Exactly how the dataset's builder cut `split`'s source images (`tiling.record`),
  for the query path to cut query images alike.

  Archive builders (`tfds_builders.common.TiledBuilder`, which may cut splits
  differently, as kimia_path24's scans) say it through `image_spec(split)`:
  patch, stride, resize, tissue threshold, minimum tissue fraction, or whole
  images with their resize, and a stain spec where the builder has one.
  synthetic_tissue cuts non-overlapping `tile_size` tiles and keeps them all.
  None when a builder says neither.
  """
  return builder_tiling(sources.builder(name, data_dir), split)


def builder_tiling(builder, split: str = "train") -> dict | None:
  """`dataset_tiling` of a builder object (any config, registered by name or not)."""
  cfg = builder.builder_config
  if hasattr(builder, "image_spec"):
    spec = builder.image_spec(split)
    return tiling.record(spec.tiles, spec.resize, spec.image_size, _stain_spec(spec, cfg))
  size = getattr(cfg, "tile_size", None)
  if size is None:
    return None
  return tiling.record(tiling.TilingConfig(patch_size=int(size), stride=int(size), min_tissue_fraction=0.0))


def dataset_gallery_mpp(name: str, data_dir: str = "", split: str = "train") -> float | None:
  """Microns per pixel of `split`'s examples as the model sees them (the gallery's
  magnification, `tiling.gallery_mpp`); None when the builder does not know its images'."""
  builder = sources.builder(name, data_dir)
  if hasattr(builder, "gallery_mpp"):
    return builder.gallery_mpp(split)
  # A builder read back from its files (a config not in the code): what its build recorded.
  metadata = builder.info.metadata or {}
  if (metadata.get("slides") or {}).get("mpp"):  # a slide dataset: its patches were cut at this mpp
    return float(metadata["slides"]["mpp"])
  recorded = metadata.get("config") or {}
  return tiling.gallery_mpp(recorded.get("mpp"), recorded.get("resize", 1.0), recorded.get("image_size"))


def dataset_slides(name: str, data_dir: str = "") -> dict | None:
  """A whole-slide dataset's record (`tfds_builders.slides`: where its slides are, the cut and
  the mosaic), for the index's manifest: the service shows a result slide from its file. None
  for datasets of photos or patches."""
  return (sources.builder(name, data_dir).info.metadata or {}).get("slides")


def _stain_spec(spec, cfg) -> dict | None:
  """The builder's stain normalisation as a JSON dict (null without one): the image
  spec's own when it has one, else the config's `stain` method name."""
  found = getattr(spec, "stain", None)
  if found is None:
    found = getattr(cfg, "stain", None)
  if found is None or isinstance(found, dict):
    return found
  if isinstance(found, str):  # a method name: its full spec, the numbers the builder used
    return stain.spec(found)
  return dataclasses.asdict(found)


def reuse_identity(config, split: str, step: int, fingerprint_: str) -> dict:
  """The fields an export is reused on, as they read back from JSON (tuples become lists)."""
  return json.loads(json.dumps({"dataset": config.dataset.name, "split": split, "step": step,
                                "model": models.identity(config.model), "image_size": config.input.image_size,
                                "tta": config.eval.get("tta", "none"), "fingerprint": fingerprint_}))


# --- Embedding ------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Rows:
  """Rows [start, stop) of a random-access source, renumbered from 0."""
  source: object
  start: int
  stop: int

  def __len__(self):
    return self.stop - self.start

  def __getitem__(self, i):
    return self.source[self.start + int(i)]


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


def chunk_ranges(n: int, global_batch: int, chunk_examples: int) -> list[tuple[int, int]]:
  """[start, stop) per chunk; chunks are whole global batches, so only the last one pads."""
  size = max(1, chunk_examples // global_batch) * global_batch
  return [(start, min(start + size, n)) for start in range(0, n, size)]


def _chunk_path(staging: epath.Path, start: int, stop: int) -> epath.Path:
  return staging / "chunks" / f"{start:010d}-{stop:010d}.npy"


def _open_staging(staging: epath.Path, manifest: dict, ranges) -> np.ndarray:
  """Which chunks a previous run of the same export finished (bool per range).

  A staging folder left by a different checkpoint or chunking is wiped.
  Process 0 decides and broadcasts, so every process skips the same chunks.
  """
  done = np.zeros(len(ranges), bool)
  if jax.process_index() == 0:
    marker = staging / "manifest.json"
    if marker.exists() and _recorded(marker) == manifest:
      done = np.array([_chunk_path(staging, *r).exists() for r in ranges], bool)
    else:
      if staging.exists():
        staging.rmtree()
      (staging / "chunks").mkdir(parents=True)
      marker.write_text(json.dumps(manifest, indent=2, sort_keys=True))
  if jax.process_count() > 1:
    done = np.asarray(multihost_utils.broadcast_one_to_all(done))
  return done


def _recorded(marker: epath.Path) -> dict | None:
  """The staging folder's manifest; a damaged one reads as none, so the export starts over."""
  try:
    return untrusted.read_json(marker, "export staging manifest")
  except untrusted.CorruptFileError:
    return None


def embed_resumable(trainer, state, source, input_cfg, staging: epath.Path, manifest: dict,
                    chunk_examples: int = CHUNK_EXAMPLES) -> np.ndarray:
  """`embed_source` chunk by chunk, saving each chunk to `staging` and skipping saved ones."""
  ranges = chunk_ranges(len(source), input_cfg.eval_batch_size, chunk_examples)
  done = _open_staging(staging, {**manifest, "chunks": [list(r) for r in ranges]}, ranges)
  parts = []
  for (start, stop), finished in zip(ranges, done):
    path = _chunk_path(staging, start, stop)
    if finished:
      parts.append(fileio.load_npy(path))
      continue
    part = embed_source(trainer, state, _Rows(source, start, stop), input_cfg.image_size,
                        input_cfg.eval_batch_size, input_cfg.num_workers)
    if jax.process_index() == 0:
      fileio.save_npy(path, part)
    parts.append(part)
  if not parts:
    raise RuntimeError("export of an empty split: nothing to embed")
  return np.concatenate(parts)


# --- PQ hook ----------------------------------------------------------------------

def model_codebooks(trainer: step_lib.Trainer, state: nnx.State) -> tuple[np.ndarray | None, str]:
  """(codebooks [M, K, d/M] or None, PQ metric): what the objective says (`Objective.codebooks`)."""
  model, _ = nnx.merge(trainer.graphdef, state)
  found = trainer.objective.codebooks(model)
  return (None, "dot_product") if found is None else (pq.check_codebooks(identity.host_value(found[0])), found[1])


# --- The export ---------------------------------------------------------------------

def export_split(trainer: step_lib.Trainer, state: nnx.State, config, split: str,
                 directory: epath.PathLike, step: int, fingerprint_: str | None = None,
                 chunk_examples: int = CHUNK_EXAMPLES) -> Export:
  """Embeds one split and writes it to `directory` (reused if already there)."""
  directory = epath.Path(directory)
  wanted = reuse_identity(config, split, step, fingerprint_ or identity.fingerprint(trainer, state))
  existing = _load_if_matching(directory, wanted)
  if existing is not None:
    return existing
  source = sources.open_split(config.dataset.name, split, config.dataset.data_dir)
  meta = sources.read_metadata(source)
  staging = fileio.staging_path(directory)
  embeddings = embed_resumable(trainer, state, source, config.input, staging, wanted, chunk_examples)
  codebooks, metric = model_codebooks(trainer, state)
  codes = None if codebooks is None else pq.encode(embeddings, codebooks, metric)
  manifest = {**wanted, "count": int(embeddings.shape[0]), "dim": int(embeddings.shape[1]), "normalized": True,
              "spread": health.spread(embeddings),  # how widely the rows cover the sphere (histojax.health)
              "normalization": identity.normalization(config.model),
              "class_names": sources.class_names(config.dataset.name, config.dataset.data_dir),
              "tiling": dataset_tiling(config.dataset.name, config.dataset.data_dir, split),
              "gallery_mpp": dataset_gallery_mpp(config.dataset.name, config.dataset.data_dir, split),
              "slides": dataset_slides(config.dataset.name, config.dataset.data_dir),
              "pq": None if codebooks is None else {"num_books": int(codebooks.shape[0]),
                                                    "num_codewords": int(codebooks.shape[1]), "metric": metric,
                                                    "bits_per_row": pq.bits_per_row(codebooks)}}
  result = Export(embeddings, meta["label"], meta["source_id"], meta["coords"], manifest, codes, codebooks,
                  _extra(meta))
  if jax.process_index() == 0:
    _write(directory, staging, result)
  return result


def _write(directory: epath.Path, staging: epath.Path, export: Export) -> None:
  """Completes the staging folder and swaps it in; the old export is removed last."""
  fileio.save_npy(staging / "embeddings.npy", export.embeddings)
  fileio.save_npz(staging / "metadata.npz", **export.rows())
  if export.codes is not None:
    fileio.save_npy(staging / "codes.npy", export.codes)
    fileio.save_npy(staging / "codebooks.npy", export.codebooks)
  (staging / "chunks").rmtree()
  fileio.write_json(staging / "manifest.json", export.manifest)
  old = directory.parent / f".{directory.name}.old"
  if old.exists():
    old.rmtree()
  if directory.exists():
    directory.rename(old)
  staging.rename(directory)
  if old.exists():
    old.rmtree()


def load(directory: epath.PathLike) -> Export:
  directory = epath.Path(directory)
  if not (directory / "manifest.json").exists():
    raise FileNotFoundError(f"{directory} holds no export (no manifest.json)")
  manifest = untrusted.read_json(directory / "manifest.json", "export manifest")
  embeddings = fileio.load_npy(directory / "embeddings.npy")
  meta = fileio.load_npz(directory / "metadata.npz")
  missing = sorted({"label", "source_id", "coords"} - set(meta))
  if missing or embeddings.ndim != 2:
    raise untrusted.CorruptFileError(f"{directory}: damaged export (metadata.npz lacks {missing}, embeddings "
                                     f"shape {embeddings.shape}); delete the folder to export again")
  codes = codebooks = None
  if (directory / "codes.npy").exists():
    codes, codebooks = fileio.load_npy(directory / "codes.npy"), fileio.load_npy(directory / "codebooks.npy")
  if len(embeddings) != manifest.get("count", len(embeddings)) or len(meta["label"]) != len(embeddings):
    raise ValueError(f"{directory}: {len(embeddings)} embeddings, {len(meta['label'])} labels, "
                     f"manifest count {manifest.get('count')}; delete the folder to export again")
  return Export(embeddings, meta["label"], meta["source_id"], meta["coords"], manifest, codes, codebooks,
                _extra(meta))


def _extra(meta: dict) -> dict[str, np.ndarray]:
  return {key: meta[key] for key in ("case_id", "region") if key in meta}


def _load_if_matching(directory: epath.Path, wanted: dict) -> Export | None:
  if not (directory / "manifest.json").exists():
    return None
  manifest = untrusted.read_json(directory / "manifest.json", "export manifest")
  if any(manifest.get(k) != v for k, v in wanted.items()):
    return None
  return load(directory)
