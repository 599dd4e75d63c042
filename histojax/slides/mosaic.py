"""A slide's mosaic: a few patches that stand for all of its tissue (Yottixel, SISH).

A slide cut at 0.5 um/px gives thousands of patches; indexing them all costs
thousands of rows per slide. Yottixel (Kalra et al., 2020) and SISH (Chen et
al., 2022) keep a mosaic instead, in two stages:

1. k-means on the patches' colour histograms (9 clusters in both), which
   groups tissue types that stain alike;
2. within each colour cluster, k-means on the patches' positions with
   `fraction` of the cluster's size as the number of clusters (SISH: 5%),
   which spreads the kept patches over the slide.

Here each spatial cluster keeps the real patch nearest its centre (SISH's code
keeps the centre itself, a position off the patch grid), and a colour cluster
too small for `fraction` keeps one patch (SISH keeps all of it). Histograms
come from small previews of the patches (`preview_px`, read from a coarse
level: 64 px for a 224 px patch at 0.5 um/px is 1.75 um/px, about SISH's 5x),
so only the mosaic is read at full resolution. `fraction=1` keeps every patch.
Both k-means runs are seeded: the same slide gives the same mosaic.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
from scipy.cluster import vq
from scipy.spatial import distance

from histojax.slides.patches import PatchGrid, patch_grid, read_patches
from histojax.slides.reading import Slide
from histojax.slides.tissue import TissueSettings, tissue_mask

_BINS = (2, 4, 8, 16, 32, 64, 128, 256)


@dataclasses.dataclass(frozen=True)
class MosaicSettings:
  fraction: float = 0.05  # of each colour cluster, as spatial clusters (SISH, Yottixel: 5%); 1 keeps every patch
  colour_clusters: int = 9  # SISH, Yottixel: 9
  preview_px: int = 64  # side the histograms are computed at
  bins: int = 16  # histogram bins per RGB channel
  iterations: int = 20  # k-means iterations per stage
  seed: int = 0

  def __post_init__(self):
    if not 0 < self.fraction <= 1:
      raise ValueError(f"mosaic fraction must be in (0, 1], got {self.fraction}")
    if self.colour_clusters < 1 or self.preview_px < 1 or self.iterations < 1:
      raise ValueError(f"colour_clusters, preview_px and iterations must be >= 1: {self}")
    if self.bins not in _BINS:
      raise ValueError(f"bins must be one of {_BINS} (a divisor of 256), got {self.bins}")

  @property
  def keeps_all(self) -> bool:
    return self.fraction >= 1

  def record(self) -> dict:
    """The settings as the manifest records them."""
    if self.keeps_all:
      return {"method": "all_patches"}
    return {"method": "colour_kmeans_then_spatial_kmeans", **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class Mosaic:
  indices: np.ndarray  # positions in the full grid, ascending
  grid: PatchGrid  # the full grid's subset: the patches to read at full resolution and embed
  patches: int  # patches in the full grid

  @property
  def rows(self) -> int:
    return len(self.indices)


def build_mosaic(slide: Slide, grid: PatchGrid, settings: MosaicSettings = MosaicSettings(), *,
                 workers: int = 4, batch_size: int = 256) -> Mosaic:
  """Reads the grid's previews, clusters their histograms, and keeps the mosaic (see the module)."""
  if settings.keeps_all:
    return Mosaic(np.arange(len(grid)), grid, len(grid))
  histograms = np.empty((len(grid), 3 * settings.bins), np.float32)
  for batch in read_patches(slide, grid.at(settings.preview_px), batch_size=batch_size, workers=workers):
    histograms[batch.indices] = colour_histograms(batch.images, settings.bins)
  indices = select_mosaic(histograms, grid.coords, settings)
  return Mosaic(indices, grid.subset(indices), len(grid))


def choose_patches(slide: Slide, *, patch_px: int, mpp: float, settings: MosaicSettings = MosaicSettings(),
                   min_tissue: float = 0.5, tissue: TissueSettings = TissueSettings(), workers: int = 4) -> Mosaic:
  """A slide's patches to embed, as every slide route cuts them (builder, `search --slides`, `index add
  --slides`): the tissue mask, the grid of `patch_px` px patches at `mpp` um/px with `min_tissue`
  tissue, and the mosaic (`settings`). NoTissueError for a slide of glass."""
  grid = patch_grid(slide, tissue_mask(slide, tissue), patch_px=patch_px, mpp=mpp, min_tissue=min_tissue)
  return build_mosaic(slide, grid, settings, workers=workers)


def colour_histograms(images: np.ndarray, bins: int = 16) -> np.ndarray:
  """(n, 3 * bins) float32: each image's R, G and B histograms, each summing to 1."""
  n, h, w, _ = images.shape
  values = (images.reshape(n, h * w, 3) // (256 // bins)).astype(np.int64)
  flat = values + np.arange(3) * bins + (np.arange(n) * 3 * bins)[:, None, None]
  counts = np.bincount(flat.ravel(), minlength=n * 3 * bins).reshape(n, 3 * bins)
  return (counts / (h * w)).astype(np.float32)


def select_mosaic(histograms: np.ndarray, coords: np.ndarray, settings: MosaicSettings) -> np.ndarray:
  """Indices of the mosaic's patches, ascending: colour k-means, then spatial k-means per colour cluster."""
  n = len(coords)
  if settings.keeps_all or n == 0:
    return np.arange(n)
  rng = np.random.default_rng(settings.seed)
  labels = _kmeans(histograms.astype(np.float64), min(settings.colour_clusters, n), settings.iterations, rng)[1]
  chosen = []
  for cluster in np.unique(labels):
    members = np.flatnonzero(labels == cluster)
    wanted = max(1, round(settings.fraction * len(members)))
    if wanted >= len(members):
      chosen.append(members)
      continue
    points = coords[members].astype(np.float64)
    centres = _kmeans(points, wanted, settings.iterations, rng)[0]
    chosen.append(members[_nearest_distinct(centres, points)])
  return np.unique(np.concatenate(chosen))


def _kmeans(data: np.ndarray, k: int, iterations: int, rng: np.random.Generator):
  k = min(k, len(np.unique(data, axis=0)))  # k-means++ cannot seed more centres than distinct points
  if k == 1:
    return data.mean(0, keepdims=True), np.zeros(len(data), np.int64)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # "one of the clusters is empty": its centre is simply unused
    return vq.kmeans2(data, k, iter=iterations, minit="++", rng=rng)


def _nearest_distinct(centres: np.ndarray, points: np.ndarray) -> np.ndarray:
  """For each centre in turn, the nearest point not yet taken (each patch enters the mosaic once)."""
  dist = distance.cdist(centres, points)
  taken = np.zeros(len(points), bool)
  picks = []
  for row in dist:
    row = np.where(taken, np.inf, row)
    best = int(np.argmin(row))
    if np.isfinite(row[best]):
      taken[best] = True
      picks.append(best)
  return np.asarray(picks, np.int64)
