"""Whole slides in the query path: a slide -> its mosaic, cut at the gallery's magnification ->
the index's model -> neighbours -> the top gallery slides, photos and patches.

The gallery's magnification is its manifest's `gallery_mpp` (microns per pixel of the
patches as the model saw them), else the mpp its slides were added at (`index add
--slides --gallery_mpp`, kept in the manifest's slides record); an index with neither
refuses slides (`NoGalleryMppError`) unless the caller gives one (`--gallery_mpp`). A query slide is
cut as the slide routes cut gallery slides (`slides.choose_patches`): the tissue mask,
patches of the gallery's patch size (its tiling record, or its slides record) at
`gallery_mpp`, then the query's mosaic (`QUERY_MOSAIC`, 5%, unless asked otherwise),
each patch centre-cropped to the model input as photos' tiles are. Patches stream
through the model in batches, so a slide of any size takes bounded memory.

A query slide is never answered by itself: gallery rows with its slide id are taken
out of every list before the top k (and, asked, rows of its case/patient too: the
query's case from the caller, else from the gallery's own rows for that slide id).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator

import numpy as np

from histojax import metrics, slides
from histojax.data import augment
from histojax.query import QueryEngine

QUERY_MOSAIC = slides.MosaicSettings()  # 9 colour clusters, 5% spatial sampling (Yottixel, SISH)
MIN_TISSUE = 0.5  # of a patch, when the gallery's own record does not say
READ_BATCH = 64  # patches read and embedded together


class NoGalleryMppError(ValueError):
  """The index does not record the microns per pixel its patches were cut at, so a slide
  cannot be cut to match; give it (`--gallery_mpp`)."""


@dataclasses.dataclass(frozen=True)
class SlideCut:
  """How slides are cut for an index: `patch_px` px at `mpp` um/px with `min_tissue` tissue,
  reduced to `mosaic`, each patch centre-cropped to the model's `image_size`."""
  patch_px: int
  mpp: float
  min_tissue: float
  mosaic: slides.MosaicSettings
  image_size: int

  def record(self) -> dict:
    return {"patch_px": self.patch_px, "mpp": self.mpp, "min_tissue": self.min_tissue,
            "mosaic": self.mosaic.record(), "model_input": self.image_size}


def slide_cut(engine: QueryEngine, gallery_mpp: float | None = None, mosaic_fraction: float | None = None,
              mosaic: slides.MosaicSettings = QUERY_MOSAIC) -> SlideCut:
  """The cut for slides against `engine`'s index; `gallery_mpp` replaces (or stands in for) the
  manifest's, `mosaic_fraction` the mosaic's fraction (1: every patch)."""
  manifest = engine.manifest
  record = manifest.get("slides") or {}
  # The gallery's slides were cut at its slides record's mpp (`index add --slides --gallery_mpp`).
  mpp = next((m for m in (gallery_mpp, manifest.get("gallery_mpp"), record.get("mpp")) if m is not None), None)
  if mpp is None:
    raise NoGalleryMppError(
        f"index {engine.index_dir}: its manifest records no gallery_mpp (the microns per pixel its patches were "
        "cut at; indexes built before magnification was recorded, or from a dataset of unknown resolution), so "
        "slides cannot be cut to match it. Pass --gallery_mpp (e.g. 1.68 for bach/x5_64), or rebuild the index.")
  if not 0 < float(mpp) <= 50:
    raise ValueError(f"gallery_mpp must be microns per pixel in (0, 50], got {mpp}")
  patch_px = int(record.get("patch_px") or engine.tiling.get("patch_size") or engine.image_size)
  if patch_px < engine.image_size:
    raise ValueError(f"the gallery's patches ({patch_px} px) are smaller than the model input {engine.image_size}")
  if mosaic_fraction is not None:
    mosaic = dataclasses.replace(mosaic, fraction=mosaic_fraction)
  return SlideCut(patch_px, float(mpp), float(record.get("min_tissue", MIN_TISSUE)), mosaic, engine.image_size)


@dataclasses.dataclass
class SlideFacts:
  slide_id: str
  path: str
  dimensions: tuple[int, int]  # level 0 (width, height)
  mpp: tuple[float, float]
  mpp_source: str
  patches_in_grid: int


def slide_batches(path, cut: SlideCut, mpp: float | None = None, workers: int = 4
                  ) -> tuple[SlideFacts, Iterator[tuple[np.ndarray, np.ndarray]]]:
  """(facts, batches of (level-0 regions [b, 4], model-input crops [b, s, s, 3] uint8)) of a slide
  cut as `cut` says; the slide closes when the batches are done. `mpp` overrides the slide's."""
  slide = slides.open_slide(path, mpp=mpp)
  try:
    mosaic = slides.choose_patches(slide, patch_px=cut.patch_px, mpp=cut.mpp, settings=cut.mosaic,
                                   min_tissue=cut.min_tissue, workers=workers)
  except BaseException:
    slide.close()
    raise
  facts = SlideFacts(slide.slide_id, str(path), slide.dimensions, slide.mpp, slide.mpp_source, mosaic.patches)

  def batches():
    size = mosaic.grid.size
    try:
      for batch in slides.read_patches(slide, mosaic.grid, batch_size=READ_BATCH, workers=workers):
        regions = np.column_stack([batch.coords, np.tile(size, (len(batch.coords), 1))]).astype(np.int64)
        crops = np.stack([augment.center_crop(image, cut.image_size) for image in batch.images])
        yield regions, crops
    finally:
      slide.close()
  return facts, batches()


def embed_slide(engine: QueryEngine, path, cut: SlideCut, mpp: float | None = None, workers: int = 4):
  """(facts, regions [n, 4], embeddings [n, d], seconds by stage) of a slide's patches."""
  start = time.perf_counter()
  facts, batches = slide_batches(path, cut, mpp, workers)
  chosen = time.perf_counter()
  regions, embeddings, embed_s = [], [], 0.0
  for region, crops in batches:
    t = time.perf_counter()
    embeddings.append(engine.model.embed(crops))
    embed_s += time.perf_counter() - t
    regions.append(region)
  total = time.perf_counter() - start
  timing = {"choose_s": round(chosen - start, 3), "read_s": round(total - (chosen - start) - embed_s, 3),
            "embed_s": round(embed_s, 3)}
  return (facts, np.concatenate(regions), np.concatenate(embeddings), timing)


def answer_slide(engine: QueryEngine, path, k: int, cut: SlideCut, *, mpp: float | None = None,
                 case_id: str | None = None, exclude_case: bool = False, workers: int = 4) -> dict:
  """The JSON-ready answer for one query slide (`search --slides --json`); see the module."""
  if k <= 0:
    raise ValueError(f"k must be positive, got {k}")
  facts, regions, embeddings, timing = embed_slide(engine, path, cut, mpp, workers)
  rows = engine.rows
  case = case_id if case_id is not None else _gallery_case(rows, facts.slide_id)
  dropped = rows["source_id"] == facts.slide_id
  if exclude_case and case:
    dropped = dropped | (rows["case_id"] == case)
  start = time.perf_counter()
  wide = min(k + int(dropped.sum()), engine.num_rows)
  neighbors, scores = metrics.drop_rows(*engine.search(embeddings, max(wide, 1)), dropped, k)
  timing["search_s"] = round(time.perf_counter() - start, 4)
  pooled = {"slides": [], **engine.pooled(neighbors, scores)}  # a gallery of photos only has no slide to give
  tiles = [{**dict(zip(("x", "y", "width", "height"), (int(c) for c in region))),
            "results": engine.results(found, score)} for region, found, score in zip(regions, neighbors, scores)]
  return {"query": str(path), "kind": "slide", "slide_id": facts.slide_id, "case_id": case or None,
          "width": int(facts.dimensions[0]), "height": int(facts.dimensions[1]),
          "mpp": [round(float(m), 6) for m in facts.mpp], "mpp_source": facts.mpp_source, "cut": cut.record(),
          "patches_in_grid": facts.patches_in_grid, "patches_searched": len(tiles),
          "excluded": {"slide": facts.slide_id, "case": case if exclude_case and case else None,
                       "gallery_rows": int(dropped.sum())},
          **pooled, "seconds": timing, "tiles": tiles}


def _gallery_case(rows: dict, slide_id: str) -> str:
  """The case the gallery records for a slide id ('' when the slide is not in the gallery)."""
  mine = np.flatnonzero(rows["source_id"] == slide_id)
  return str(rows["case_id"][mine[0]]) if len(mine) else ""
