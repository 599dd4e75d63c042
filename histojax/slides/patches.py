"""Cutting a slide into patches at a physical resolution, and reading them in parallel.

A patch is `patch_px` pixels at `mpp` microns per pixel (224 px at 0.5 um/px
covers 112 um of tissue, whatever the scanner). The grid is laid over the
scanned region (`Slide.bounds`) in level-0 pixels, and a cell is kept when the
tissue mask covers at least `min_tissue` of it; coordinates are the slide's
own level-0 pixels, the frame OpenSlide reads in.

Reading is where slides are slow: each patch decodes JPEG tiles. OpenSlide
releases the GIL while it decodes, so a thread pool over one handle reads
patches in parallel and the encoder, not OpenSlide, sets the pace. Batches
come out in grid order from a generator that keeps at most `prefetch` batches
in flight, so memory is bounded by the batch size, not the slide's size.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import threading
import time
from collections.abc import Iterator

import numpy as np

from histojax.slides.errors import NoTissueError
from histojax.slides.reading import Slide, resize
from histojax.slides.tissue import TissueMask


@dataclasses.dataclass(frozen=True)
class PatchGrid:
  """Patches to read: top-left `coords` (x, y) in level-0 pixels, each `size` (w, h) level-0 pixels,
  read as `patch_px` x `patch_px` pixels at `mpp` um/px."""
  coords: np.ndarray  # (n, 2) int64, (x, y)
  size: tuple[int, int]
  patch_px: int
  mpp: float
  tissue: np.ndarray  # (n,) float32: the mask's tissue fraction of each patch

  def __len__(self) -> int:
    return len(self.coords)

  def subset(self, indices) -> PatchGrid:
    indices = np.asarray(indices, np.int64)
    return dataclasses.replace(self, coords=self.coords[indices], tissue=self.tissue[indices])

  def at(self, patch_px: int) -> PatchGrid:
    """The same regions read at `patch_px` pixels (a preview: coarser mpp, same tissue)."""
    return dataclasses.replace(self, patch_px=patch_px, mpp=self.mpp * self.patch_px / patch_px)


@dataclasses.dataclass(frozen=True)
class PatchBatch:
  indices: np.ndarray  # (b,) positions in the grid
  coords: np.ndarray  # (b, 2) level-0 (x, y)
  images: np.ndarray  # (b, patch_px, patch_px, 3) uint8


@dataclasses.dataclass
class ReadStats:
  """Seconds spent per stage, summed over the reading threads (a benchmark's split)."""
  read_s: float = 0.0  # OpenSlide decoding the level's tiles
  resize_s: float = 0.0  # level pixels to patch pixels
  patches: int = 0
  _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False, compare=False)

  def add(self, read_s: float, resize_s: float) -> None:
    with self._lock:
      self.read_s += read_s
      self.resize_s += resize_s
      self.patches += 1


def patch_grid(slide: Slide, mask: TissueMask, *, patch_px: int = 224, mpp: float = 0.5,
               min_tissue: float = 0.5, stride: float = 1.0) -> PatchGrid:
  """The grid of patches with enough tissue; NoTissueError when none has.

  stride: step between patches as a fraction of a patch (1: side by side, 0.5: half overlap).
  """
  if patch_px < 1 or not 0 < stride <= 1 or not 0 <= min_tissue <= 1:
    raise ValueError(f"patch_px {patch_px} >= 1, stride {stride} in (0, 1] and min_tissue {min_tissue} in [0, 1] expected")
  dx, dy = slide.downsample(mpp)
  side = (patch_px * dx, patch_px * dy)  # level-0 pixels, unrounded so the grid does not drift
  x0, y0, width, height = slide.bounds
  xs = x0 + np.arange(int((width - side[0]) // (side[0] * stride)) + 1) * side[0] * stride
  ys = y0 + np.arange(int((height - side[1]) // (side[1] * stride)) + 1) * side[1] * stride
  if width < side[0] or height < side[1]:
    xs, ys = xs[:0], ys[:0]
  gx, gy = np.meshgrid(np.round(xs).astype(np.int64), np.round(ys).astype(np.int64))
  coords = np.stack([gx.ravel(), gy.ravel()], 1)
  size = (max(1, round(side[0])), max(1, round(side[1])))
  tissue = tissue_fraction(mask, coords, size)
  keep = tissue >= max(min_tissue, 1e-6)
  if not keep.any():
    raise NoTissueError(f"{slide.path}: no patch of {patch_px} px at {mpp} um/px has {min_tissue:.0%} tissue "
                        f"({mask.area_mm2():.3f} mm^2 of tissue on the overview)")
  return PatchGrid(coords[keep], size, patch_px, float(mpp), tissue[keep])


def tissue_fraction(mask: TissueMask, coords: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Fraction of mask pixels that are tissue under each level-0 box, from a summed-area table."""
  table = np.pad(mask.mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
  h, w = mask.mask.shape
  sx, sy = mask.scale
  left = np.clip(np.floor(coords[:, 0] / sx), 0, w).astype(np.int64)
  top = np.clip(np.floor(coords[:, 1] / sy), 0, h).astype(np.int64)
  right = np.clip(np.maximum(np.ceil((coords[:, 0] + size[0]) / sx), left + 1), 0, w).astype(np.int64)
  bottom = np.clip(np.maximum(np.ceil((coords[:, 1] + size[1]) / sy), top + 1), 0, h).astype(np.int64)
  total = table[bottom, right] - table[top, right] - table[bottom, left] + table[top, left]
  area = np.maximum((right - left) * (bottom - top), 1)
  return (total / area).astype(np.float32)


def read_patches(slide: Slide, grid: PatchGrid, *, batch_size: int = 64, workers: int = 4, prefetch: int = 2,
                 stats: ReadStats | None = None) -> Iterator[PatchBatch]:
  """Batches of the grid's patches in grid order, read by `workers` threads.

  At most `prefetch` batches beyond the one being consumed are in flight, so memory
  is about (prefetch + 1) x batch_size x patch_px^2 x 3 bytes. Closing the generator
  early cancels what is queued.
  """
  if batch_size < 1 or workers < 1 or prefetch < 0:
    raise ValueError(f"batch_size {batch_size}, workers {workers} >= 1 and prefetch {prefetch} >= 0 expected")
  level, source = slide.region_plan((grid.patch_px, grid.patch_px), grid.mpp)
  out_size = (grid.patch_px, grid.patch_px)

  def read_one(batch: np.ndarray, slot: int, location) -> None:
    start = time.perf_counter()
    pixels = slide.read_level(level, location, source)
    middle = time.perf_counter()
    batch[slot] = resize(pixels, out_size)
    if stats is not None:
      stats.add(middle - start, time.perf_counter() - middle)

  def submit(pool, start: int):
    stop = min(start + batch_size, len(grid))
    images = np.empty((stop - start, grid.patch_px, grid.patch_px, 3), np.uint8)
    futures = [pool.submit(read_one, images, i, grid.coords[start + i]) for i in range(stop - start)]
    return start, stop, images, futures

  pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="slide-read")
  pending = collections.deque()
  try:
    starts = iter(range(0, len(grid), batch_size))
    for start in starts:
      pending.append(submit(pool, start))
      if len(pending) > prefetch:
        yield _collect(pending.popleft(), grid)
    while pending:
      yield _collect(pending.popleft(), grid)
  finally:
    for _, _, _, futures in pending:
      for future in futures:
        future.cancel()
    pool.shutdown(wait=True, cancel_futures=True)


def _collect(job, grid: PatchGrid) -> PatchBatch:
  start, stop, images, futures = job
  for future in futures:
    future.result()  # re-raises a reader's error (DamagedSlideError) here, in the consumer
  return PatchBatch(np.arange(start, stop), grid.coords[start:stop], images)
