"""Whole-slide images: reading through OpenSlide, tissue, patches at a physical resolution, mosaics.

    slide = open_slide(path)                      # or open_slide(path, mpp=0.25)
    mask = tissue_mask(slide)                     # NoTissueError for glass
    grid = patch_grid(slide, mask, patch_px=224, mpp=0.5)
    mosaic = build_mosaic(slide, grid)            # tens of patches instead of thousands
    # or all three steps at once: mosaic = choose_patches(slide, patch_px=224, mpp=0.5)
    for batch in read_patches(slide, mosaic.grid):
      ...                                         # batch.images (b, 224, 224, 3) uint8, batch.coords level-0 (x, y)

Every refusal is a `SlideError` subclass naming the file. `read_slide_table` reads a
slides.csv (slide id, case id, label, split).
"""

from histojax.slides.errors import (DamagedSlideError, NoResolutionError, NoTissueError, NotASlideError,
                                    ResolutionTooCoarseError, SlideError, SlideTooLargeError, TruncatedSlideError)
from histojax.slides.mosaic import (Mosaic, MosaicSettings, build_mosaic, choose_patches, colour_histograms,
                                    select_mosaic)
from histojax.slides.patches import PatchBatch, PatchGrid, ReadStats, patch_grid, read_patches, tissue_fraction
from histojax.slides.reading import Overview, Slide, SlideLimits, best_level, open_slide, slide_id
from histojax.slides.table import SlideRow, SlideTableError, read_slide_table
from histojax.slides.tissue import TissueMask, TissueSettings, segment_tissue, tissue_mask
from histojax.slides.walk import SLIDE_SUFFIXES, SlideWalk, find_slides, slide_paths

__all__ = [
    "DamagedSlideError", "NoResolutionError", "NoTissueError", "NotASlideError", "ResolutionTooCoarseError",
    "SlideError", "SlideTooLargeError", "TruncatedSlideError",
    "Mosaic", "MosaicSettings", "build_mosaic", "choose_patches", "colour_histograms", "select_mosaic",
    "PatchBatch", "PatchGrid", "ReadStats", "patch_grid", "read_patches", "tissue_fraction",
    "Overview", "Slide", "SlideLimits", "best_level", "open_slide", "slide_id",
    "SlideRow", "SlideTableError", "read_slide_table",
    "TissueMask", "TissueSettings", "segment_tissue", "tissue_mask",
    "SLIDE_SUFFIXES", "SlideWalk", "find_slides", "slide_paths",
]
