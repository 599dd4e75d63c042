"""One whole-slide image -> its examples: the per-slide work of a slide build, shared by both
routes (the local route in `tfds_builders.slides`, the Beam route in `beam_route`, one slide
per element).

A slide is a source: its patches carry the slide id as `source_id`, its case (patient) id
as `case_id`, and their level-0 box as `region` (x, y, width, height), the frame OpenSlide
and the viewer read in; `coords` is the box's (y, x), as tiles of photos give theirs.

Work is in two steps so that a slide that cannot be used is refused before any of its
examples is written: `plan_slide` opens the slide, finds its tissue, lays the patch grid
and picks the mosaic (reading only the coarse previews); `SlidePlan.examples` then reads
the chosen patches at full resolution in threads, streaming them (a slide of 50,000
patches is never held whole). A refusal in the first step (a `SlideError` naming the
file) can be skipped and counted; a slide with no tissue keeps no example and is counted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np

from histojax import slides
from histojax.data import tiling
from tfds_builders.source_images import ImageSpec, SourceImage, encode

# A slide's tissue is found by `slides.tissue_mask` (saturation 0.05 on an ~8 um/px overview); photo
# queries against a slide gallery are tiled with the same saturation threshold.
SLIDE_SATURATION = slides.TissueSettings().saturation


@dataclasses.dataclass(frozen=True)
class SlideSpec(ImageSpec):
  """What a worker needs to cut one slide: the patch (`tiles.patch_size` px at `target_mpp`
  microns per pixel, kept with `tiles.min_tissue_fraction` tissue), the mosaic, and an mpp
  override for slides that declare none (`prepare --mpp`)."""
  target_mpp: float = 0.5
  mosaic: slides.MosaicSettings = slides.MosaicSettings(fraction=1.0)
  slide_mpp: float | None = None
  read_workers: int = 4


def slide_spec(patch_px: int, target_mpp: float, mosaic_fraction: float, min_tissue: float, encoding: str,
               slide_mpp: float | None = None) -> SlideSpec:
  if not 0 < target_mpp <= 50:
    raise ValueError(f"target_mpp must be microns per pixel in (0, 50], got {target_mpp}")
  tiles = tiling.TilingConfig(patch_px, patch_px, 1.0, SLIDE_SATURATION, min_tissue)
  return SlideSpec(tiles, 1.0, None, encoding, None, float(target_mpp), slides.MosaicSettings(fraction=mosaic_fraction),
                   slide_mpp)


@dataclasses.dataclass
class SlidePlan:
  """An open slide with its grid and mosaic, ready to read."""
  source: SourceImage
  spec: SlideSpec
  slide: slides.Slide
  mosaic: slides.Mosaic

  @property
  def dropped(self) -> int:
    """Patches with tissue left out by the mosaic."""
    return self.mosaic.patches - self.mosaic.rows

  def examples(self) -> Iterator[tuple[str, dict[str, Any]]]:
    """(key, example) of every mosaic patch, in grid order; closes the slide when done."""
    s, grid = self.source, self.mosaic.grid
    width, height = grid.size
    try:
      for batch in slides.read_patches(self.slide, grid, batch_size=32, workers=self.spec.read_workers):
        for (x, y), image in zip(batch.coords.tolist(), batch.images):
          example = {"image": encode(image, self.spec.encoding), "label": s.label, "source_id": s.source_id,
                     "coords": np.array([y, x], np.int32), "original_split": s.original_split, **dict(s.extra),
                     "region": np.array([x, y, width, height], np.int32)}
          yield f"{s.source_id}:{y}:{x}", example
    finally:
      self.slide.close()


def plan_slide(source: SourceImage, spec: SlideSpec) -> SlidePlan:
  """Opens the slide and picks its patches; raises a `SlideError` subclass naming the file
  (NoTissueError for a slide of glass), with the slide closed again."""
  slide = slides.open_slide(source.path, mpp=spec.slide_mpp)
  try:
    mosaic = slides.choose_patches(slide, patch_px=spec.tiles.patch_size, mpp=spec.target_mpp, settings=spec.mosaic,
                                   min_tissue=spec.tiles.min_tissue_fraction, workers=spec.read_workers)
  except BaseException:
    slide.close()
    raise
  return SlidePlan(source, spec, slide, mosaic)


def stop_message(source: SourceImage, error: Exception) -> str:
  """The stop of a build on a slide, worded the same on both routes."""
  return (f"{error}\nNothing was marked prepared. Replace or remove slide {source.source_id!r} "
          f"({source.path}), or pass --skip_corrupt to leave out slides that cannot be opened and count them.")
