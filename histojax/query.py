"""The one query path: an image -> tiles cut as the gallery was -> embeddings -> top-k
gallery patches -> a vote and the most similar gallery source images.

Shared by `histojax.search` (files on the command line) and the search service;
both decode with the project's one image reader first. `QueryEngine.open` loads
the index folder once (manifest, searcher, gallery rows) and the checkpoint the
index was built from, refusing a model whose step, weights, architecture,
input size or normalisation differ from the manifest's.

Cutting follows the manifest's `tiling` record (`tiling.record`: exactly what
the dataset's builder did to the gallery split): stain normalisation of the
whole image when the builder had one, then resize and tiles with the tissue
filter, or, for datasets of whole patches, the builder's resize. Every tile is
centre-cropped to the model input as export does.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
from etils import epath

from histojax import checkpoint, fileio, identity, indexing, metrics, models
from histojax import config as config_lib
from histojax import mesh as mesh_lib
from histojax import step as step_lib
from histojax.data import augment, stain, tiling


@dataclasses.dataclass
class Patches:
  images: np.ndarray  # [n, s, s, 3] uint8, model input size
  coords: list  # (y, x) of each tile in the (resized) image
  tissue: list  # tissue fraction of each tile; None for an image taken whole (not filtered)
  dropped: int  # tiles dropped as background


def tiling_record(manifest: dict, image_size: int, resize: float | None = None) -> dict:
  """The gallery's tiling record from the manifest, `resize` replacing its factor when given.

  A manifest without one (an index older than the record) gets tiles of the
  model input size, every tile kept.
  """
  found = manifest.get("tiling") or tiling.record(tiling.TilingConfig(image_size, image_size, min_tissue_fraction=0.0))
  rec = {**tiling.record(None), **found}  # older records lack image_size and stain
  if resize is not None:
    rec["resize"] = float(resize)
  cfg = tiling.config_from_record(rec)
  if cfg is not None and cfg.patch_size < image_size:
    raise ValueError(f"tiling patch_size {cfg.patch_size} is smaller than the model input {image_size}")
  return rec


def cut(image: np.ndarray, rec: dict, image_size: int) -> Patches:
  """Cuts a uint8 RGB image as the record says, each tile centre-cropped to the model input.

  An image no larger than one patch (after resizing) is one patch, as a user's
  single patch query is; smaller than the model input is an error.
  """
  if rec.get("stain") is not None:
    image = stain.normalize(image, rec["stain"])
  cfg = tiling.config_from_record(rec)
  if cfg is None:  # a dataset of whole patches
    resized = tiling.whole_image(image, rec.get("resize", 1.0), rec.get("image_size"))
  else:
    resized = tiling.resize(image, cfg.resize)
  h, w = resized.shape[:2]
  if h < image_size or w < image_size:
    raise ValueError(f"image of {image.shape[1]}x{image.shape[0]} px ({w}x{h} after the gallery's resize) is "
                     f"smaller than the model input {image_size}x{image_size}")
  if cfg is None or min(h, w) < cfg.patch_size or max(h, w) <= cfg.patch_size:  # not even one whole tile more
    return Patches(augment.center_crop(resized, image_size)[None], [(0, 0)], [None], 0)  # not filtered
  tiles, dropped = tiling.tile_image(resized, dataclasses.replace(cfg, resize=1.0))
  images = np.stack([augment.center_crop(t.image, image_size) for t in tiles]) if tiles else \
      np.zeros((0, image_size, image_size, 3), np.uint8)
  return Patches(images, [(t.y, t.x) for t in tiles], [t.tissue_fraction for t in tiles], dropped)


# --- The query model -------------------------------------------------------------------

class QueryModel:
  """A restored checkpoint that embeds uint8 patches, checked against an index manifest."""

  def __init__(self, workdir: epath.PathLike, step: int | None = None):
    workdir = epath.Path(workdir)
    if not (workdir / "config.json").exists():
      raise FileNotFoundError(f"query model workdir {workdir} has no config.json")
    self.config = config_lib.load(workdir / "config.json")
    self.config.mesh.data, self.config.mesh.fsdp = -1, 1  # whatever devices this machine has
    self.trainer, self.state, self.step = checkpoint.restore_for_eval(self.config, workdir, step)
    self.fingerprint = identity.fingerprint(self.trainer, self.state)
    self.image_size = self.config.input.image_size
    self._embed = step_lib.jit_embed(self.trainer)
    probe = jax.ShapeDtypeStruct((self.trainer.mesh.size, self.image_size, self.image_size, 3), np.uint8)
    self.dim = int(jax.eval_shape(self._embed, self.state, probe).shape[1])
    self.identity = json.loads(json.dumps({
        "step": self.step, "fingerprint": self.fingerprint, "model": models.identity(self.config.model),
        "image_size": self.image_size, "normalization": identity.normalization(self.config.model), "dim": self.dim}))

  def expected_by(self, manifest: dict) -> dict:
    """The fields an index's manifest must agree on: `identity`, where a legacy normalisation
    record (ImageNet for every model, before it was read from the config) counts as agreeing."""
    if identity.normalization_matches(manifest.get("normalization"), self.config.model):
      return {**self.identity, "normalization": manifest.get("normalization")}
    return self.identity

  def embed(self, patches: np.ndarray) -> np.ndarray:
    """[n, s, s, 3] uint8 -> [n, d] float32: one padded device call per `input.eval_batch_size`
    patches, padded to a power of two times the device count (few compilations)."""
    out = mesh_lib.map_padded(lambda batch: self._embed(self.state, batch), np.asarray(patches, np.uint8),
                              self.trainer.mesh, self.config.input.eval_batch_size)
    return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)


def model_workdir(index_dir: epath.PathLike, manifest: dict, workdir: str | None = None) -> str:
  """`workdir`, else the workdir the manifest names, else the index's parent folder
  (a workdir copied elsewhere whole still finds its checkpoints)."""
  if workdir:
    return workdir
  recorded = manifest["checkpoint"]["workdir"]
  parent = os.path.dirname(os.path.abspath(os.fspath(index_dir).rstrip("/")))
  for candidate in (recorded, parent):
    if os.path.exists(os.path.join(candidate, "config.json")):
      return candidate
  raise FileNotFoundError(f"the index's model workdir {recorded} is gone (no config.json there nor in {parent}); "
                          "pass --workdir")


# --- Slides among the answers -------------------------------------------------------------

def slide_ranking(rows: dict, is_slide: np.ndarray, neighbors: np.ndarray, scores: np.ndarray, label,
                  regions: int = 10) -> list[dict]:
  """The top gallery slides by the pooled score of `metrics.rank_sources` (the mean over the
  query's patches of the best score any patch of the slide reached in that patch's top k),
  each with its matched regions: its patches found, in level-0 pixels, best first. `is_slide`
  marks the gallery rows that are slide patches; `label(id)` names a class."""
  found = metrics.only_rows(neighbors, is_slide)
  ids, pooled, matched, best = metrics.rank_sources(found, scores, rows["source_id"], top=neighbors.shape[1])
  out = []
  for r, (slide, score, hits, row) in enumerate(zip(ids, pooled, matched, best)):
    where, best_scores = metrics.matched_rows(found, scores, rows["source_id"], slide)
    out.append({"rank": r + 1, "slide_id": str(slide), "case_id": str(rows["case_id"][row]),
                "label": label(int(rows["label"][row])), "label_id": int(rows["label"][row]),
                "score": round(float(score), 6), "patches_matched": int(hits),
                "regions": [{**dict(zip(("x", "y", "width", "height"), (int(c) for c in rows["region"][g]))),
                             "score": round(float(s), 6), "gallery_row": int(g)}
                            for g, s in zip(where[:regions], best_scores[:regions])]})
  return out


# --- The engine ---------------------------------------------------------------------------

def _file_stamp(path: epath.Path) -> tuple | None:
  if not path.exists():
    return None
  if fileio.is_local(path):  # nanoseconds here; an object store gives whole seconds
    st = os.stat(path)
    return st.st_mtime_ns, st.st_size
  st = path.stat()
  return st.mtime, st.length


class QueryEngine:
  """An index folder and its query model, loaded once, answering images."""

  def __init__(self, index_dir: epath.PathLike, model: QueryModel, workdir: str | None = None,
               step: int | None = None, resize: float | None = None):
    self.index_dir, self.model = epath.Path(index_dir), model
    self._workdir, self._step, self._resize = workdir, step, resize
    self._load()

  @classmethod
  def open(cls, index_dir: epath.PathLike, workdir: str | None = None, step: int | None = None,
           resize: float | None = None) -> QueryEngine:
    """Loads manifest, model, searcher and rows. `resize` replaces the gallery's resize
    factor, for query images scanned at another magnification."""
    manifest = indexing.read_manifest(index_dir)
    model = QueryModel(model_workdir(index_dir, manifest, workdir),
                       step if step is not None else manifest["checkpoint"]["step"])
    return cls(index_dir, model, workdir, step, resize)

  def _load(self, tries: int = 3) -> None:
    """Reads the index folder whole or not at all. A growth swapping in its next generation
    (`index add|remove`, the service's curator routes) while the files are read moves their
    stamps: the read is redone, and what is in use changes only once every part is of one
    generation (a failed read leaves the index in use as it was)."""
    for _ in range(tries):
      stamp = self._disk_stamp()
      try:
        searcher, manifest, rows = self._read()
      except (OSError, ValueError):  # e.g. a file of the generation swapped out, already removed
        if self._disk_stamp() == stamp:
          raise
        continue
      if self._disk_stamp() != stamp:
        continue
      if len(rows["label"]) != searcher.size:
        raise ValueError(f"index {self.index_dir}: rows.npz has {len(rows['label'])} rows, the searcher "
                         f"{searcher.size}; rebuild the index")
      break
    else:
      raise ValueError(f"index {self.index_dir} changed {tries} times while being read; try again")
    self._searcher, self.manifest, self.rows = searcher, manifest, rows
    self.slide_rows = indexing.slide_mask(rows)  # rows that are patches of whole-slide images
    self.has_slides = bool(self.slide_rows.any())
    self.class_names = list(manifest.get("class_names") or [])
    self.image_size = self.model.image_size
    self.num_rows = int(searcher.size)
    self.tiling = tiling_record(manifest, self.image_size, self._resize)
    self._stamp = stamp

  def _read(self) -> tuple:
    manifest = indexing.read_manifest(self.index_dir)
    indexing.check_manifest(manifest, self.model.expected_by(manifest), self.index_dir)
    searcher, manifest = indexing.load(self.index_dir)
    return searcher, manifest, indexing.load_rows(self.index_dir)

  def _disk_stamp(self) -> tuple:
    """(modification time, size) of the files an index swap or growth rewrites."""
    return tuple(_file_stamp(self.index_dir / name) for name in ("manifest.json", "rows.npz"))

  def reload_if_changed(self) -> bool:
    """Re-reads the index folder if it changed on disk since it was loaded (a rebuilt or
    grown index); the model is reloaded too when the index names another checkpoint."""
    if self._disk_stamp() == self._stamp:
      return False
    manifest = indexing.read_manifest(self.index_dir)
    moved = self._step is None and manifest["checkpoint"]["step"] != self.model.step
    if moved or manifest.get("fingerprint") != self.model.fingerprint:
      self.model = QueryModel(model_workdir(self.index_dir, manifest, self._workdir),
                              self._step if self._step is not None else manifest["checkpoint"]["step"])
    self._load()
    return True

  def cut(self, image: np.ndarray) -> Patches:
    """The image's tiles as the gallery was cut (stain transform, resize, tissue filter)."""
    return cut(image, self.tiling, self.image_size)

  def answer_batch(self, queries: list[tuple[str, np.ndarray]], k: int) -> list[dict]:
    """Answers for (name, uint8 RGB image) pairs, in order. The tiles of all images are
    embedded together (shared padded device calls) and searched in one index call; a
    query that cannot be cut gets {"query": name, "error": "..."}."""
    if k <= 0:
      raise ValueError(f"k must be positive, got {k}")
    cut_or_error = []
    for name, image in queries:
      try:
        cut_or_error.append(self.cut(image))
      except ValueError as e:
        cut_or_error.append(str(e))
    patches = [p for p in cut_or_error if isinstance(p, Patches)]
    tiles = np.concatenate([p.images for p in patches]) if patches else np.zeros((0,), np.uint8)
    neighbors, scores = self.search(self.model.embed(tiles) if len(tiles) else None, k)
    answers, start = [], 0
    for (name, image), found in zip(queries, cut_or_error):
      if not isinstance(found, Patches):
        answers.append({"query": name, "error": found})
        continue
      stop = start + len(found.images)
      answers.append(self._answer(name, image.shape, found, neighbors[start:stop], scores[start:stop]))
      start = stop
    return answers

  def answer(self, name: str, image: np.ndarray, k: int) -> dict:
    return self.answer_batch([(name, image)], k)[0]

  def search(self, embeddings: np.ndarray | None, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(neighbors [n, k], scores [n, k]) of the gallery for embeddings [n, d] (None: no query)."""
    if embeddings is None or not len(embeddings):
      return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    return indexing.search(self._searcher, embeddings, k)

  def _label(self, label: int) -> str:
    return self.class_names[label] if 0 <= label < len(self.class_names) else str(label)

  def results(self, found: np.ndarray, score: np.ndarray) -> list[dict]:
    """One query patch's ranked gallery rows; a slide's patch also says its case and level-0 region."""
    rows, label, out = self.rows, self._label, []
    for r, (n, s) in enumerate(zip(found, score)):
      if n < 0:
        continue
      out.append({"rank": r + 1, "gallery_row": int(n), "label": label(int(rows["label"][n])),
                  "label_id": int(rows["label"][n]), "source_id": str(rows["source_id"][n]),
                  "coords": [int(c) for c in rows["coords"][n]], "score": round(float(s), 6)})
      if self.slide_rows[n]:
        out[-1].update(case_id=str(rows["case_id"][n]), region=[int(c) for c in rows["region"][n]])
    return out

  def pooled(self, neighbors: np.ndarray, scores: np.ndarray) -> dict:
    """What all of a query's patches say together: the vote, the top source photos and, when the
    gallery holds slides, the top slides (`slide_ranking`)."""
    out = {"vote": self._vote(neighbors)}
    if not self.has_slides:  # an answer exactly as before slides existed
      return {**out, "sources": self._sources(neighbors, scores)}
    photos = metrics.only_rows(neighbors, ~self.slide_rows)
    return {**out, "sources": self._sources(photos, scores), "slides": self.slide_ranking(neighbors, scores)}

  def slide_ranking(self, neighbors: np.ndarray, scores: np.ndarray, regions: int = 10) -> list[dict]:
    return slide_ranking(self.rows, self.slide_rows, neighbors, scores, self._label, regions)

  def _answer(self, name: str, shape, patches: Patches, neighbors: np.ndarray, scores: np.ndarray) -> dict:
    """The JSON-ready answer for one query image (the `search --json` object)."""
    tiles = []
    for (y, x), tissue, found, score in zip(patches.coords, patches.tissue, neighbors, scores):
      tiles.append({"y": int(y), "x": int(x), "results": self.results(found, score),
                    "tissue_fraction": None if tissue is None else round(float(tissue), 4)})
    return {"query": name, "height": int(shape[0]), "width": int(shape[1]), "tiling": dict(self.tiling),
            "tiles_searched": len(tiles), "tiles_dropped": int(patches.dropped),
            **self.pooled(neighbors, scores), "tiles": tiles}

  def _vote(self, neighbors: np.ndarray) -> dict | None:
    if not len(neighbors):
      return None
    retrieved = metrics.neighbor_labels(neighbors, self.rows["label"])
    _, winner, counts = metrics.pooled_vote(retrieved, np.zeros(len(retrieved), np.int64), neighbors.shape[1])
    if winner[0] < 0:
      return None
    return {"label": self._label(int(winner[0])), "label_id": int(winner[0]),
            "fraction": round(int(counts[0, winner[0]]) / int(counts[0].sum()), 4),
            "votes": {self._label(c): int(v) for c, v in enumerate(counts[0]) if v}}

  def _sources(self, neighbors: np.ndarray, scores: np.ndarray) -> list[dict]:
    """The top gallery source images by pooled similarity (`metrics.rank_sources`)."""
    ids, pooled, matched, row = metrics.rank_sources(neighbors, scores, self.rows["source_id"],
                                                     top=neighbors.shape[1])
    return [{"rank": r + 1, "source_id": str(s), "label": self._label(int(self.rows["label"][g])),
             "label_id": int(self.rows["label"][g]), "score": round(float(p), 6), "tiles_matched": int(m)}
            for r, (s, p, m, g) in enumerate(zip(ids, pooled, matched, row))]
