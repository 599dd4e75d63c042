"""Opening whole-slide images, and reading regions of them at a physical resolution.

OpenSlide comes from the `openslide-bin` wheel (no system library). A slide's
size is untrusted: a TIFF-based file's page chain is checked first (`tiff`),
and for every format the level dimensions and count are checked after opening,
before anything is allocated for them.

Resolution is physical everywhere: regions are asked for in microns per pixel
(mpp), never as a level or a magnification. A region is read from the coarsest
level that is still at least as fine as asked (`best_level`), then resized
down: never from level 0 when a coarser level serves (decoding 16x the pixels
for nothing), never upsampled from a coarser level (inventing detail).

Coordinates are always the slide's own level-0 pixels, as OpenSlide's
`read_region` takes them. `openslide.bounds-x/-y` (where a scanner's non-empty
region starts) only narrows where patches are cut; it never shifts coordinates.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import warnings

import numpy as np
import openslide
import PIL.Image

from histojax.data import images
from histojax.slides.errors import (DamagedSlideError, NoResolutionError, NotASlideError,
                                    ResolutionTooCoarseError, SlideError, SlideTooLargeError)
from histojax.slides.tiff import TiffFacts, tiff_facts

# A level within 1% of the asked downsample still serves: OpenSlide derives downsamples from
# rounded level sizes (a 4863 px slide's 4x level is 1216 px, downsample 3.9992), and reading
# the 4x finer level instead for that would cost 16x the decoding.
DOWNSAMPLE_SLACK = 0.01
# Asking for slightly finer than level 0 is allowed and upsamples level 0 a little: "20x"
# scanners give 0.504 um/px, and a 0.5 um/px gallery should take them. Beyond this it is refused.
UPSAMPLE_SLACK = 0.05
# Microns per pixel a microscope scan can have. Outside it the number is not a scan's:
# 72 dpi (352.8 um/px) is an image editor's default resolution tag, not a measurement.
PLAUSIBLE_MPP = (0.02, 50.0)
# Side of the chunks an overview is decoded in (bounded memory whatever the level's size).
OVERVIEW_CHUNK = 2048


@dataclasses.dataclass(frozen=True)
class SlideLimits:
  """What a slide may declare before it is refused (SlideTooLargeError), checked before allocating.

  max_side: level-0 pixels per side. 400,000 px is 100 mm at 0.25 um/px, wider than
    a 75 mm glass slide scanned at 40x.
  max_levels: pyramid levels (a halving pyramid of 400,000 px has 19).
  max_tiff_pages: pages in a TIFF's main chain (levels, focal planes, label, macro).
  """
  max_side: int = 400_000
  max_levels: int = 32
  max_tiff_pages: int = 256


@dataclasses.dataclass(frozen=True)
class Overview:
  """A whole slide, reduced: uint8 HxWx3 RGB, and level-0 pixels per overview pixel per axis."""
  rgb: np.ndarray
  scale: tuple[float, float]
  mpp: float  # microns per overview pixel (the mean of the two axes)


class Slide:
  """An open whole-slide image: OpenSlide's handle, its microns per pixel and its pyramid.

  Thread-safe for reads (OpenSlide's handles are); close it, or use it as a context manager.
  """

  def __init__(self, handle: openslide.OpenSlide, path: pathlib.Path, mpp: tuple[float, float], mpp_source: str):
    self._handle = handle
    self.path = path
    self.mpp = mpp  # (x, y) microns per level-0 pixel
    self.mpp_source = mpp_source  # "openslide" (vendor metadata), "tiff" (resolution tags) or "override"
    self.dimensions: tuple[int, int] = tuple(handle.dimensions)
    self.level_dimensions: tuple[tuple[int, int], ...] = tuple(tuple(d) for d in handle.level_dimensions)
    self.level_downsamples: tuple[float, ...] = tuple(float(d) for d in handle.level_downsamples)
    self.properties: dict[str, str] = dict(handle.properties)
    self.vendor = self.properties.get(openslide.PROPERTY_NAME_VENDOR, "unknown")
    self._background = _background(self.properties)

  @property
  def handle(self) -> openslide.OpenSlide:
    """The OpenSlide handle, for what this class does not wrap (openslide.deepzoom tiles, associated images)."""
    return self._handle

  @property
  def slide_id(self) -> str:
    return slide_id(self.path)

  @property
  def bounds(self) -> tuple[int, int, int, int]:
    """(x, y, width, height) of the scanned region in level-0 pixels; the whole frame when not declared."""
    width, height = self.dimensions
    p = self.properties
    try:
      x = int(p.get(openslide.PROPERTY_NAME_BOUNDS_X, 0))
      y = int(p.get(openslide.PROPERTY_NAME_BOUNDS_Y, 0))
      w = int(p.get(openslide.PROPERTY_NAME_BOUNDS_WIDTH, width - x))
      h = int(p.get(openslide.PROPERTY_NAME_BOUNDS_HEIGHT, height - y))
    except ValueError:
      return 0, 0, width, height
    x, y = min(max(x, 0), width), min(max(y, 0), height)
    return x, y, max(0, min(w, width - x)), max(0, min(h, height - y))

  def downsample(self, mpp: float) -> tuple[float, float]:
    """Level-0 pixels per pixel at `mpp`, per axis; refuses `mpp` finer than the scan."""
    if not math.isfinite(mpp) or mpp <= 0:
      raise ValueError(f"microns per pixel must be a positive number, got {mpp}")
    dx, dy = mpp / self.mpp[0], mpp / self.mpp[1]
    if min(dx, dy) < 1.0 - UPSAMPLE_SLACK:
      raise ResolutionTooCoarseError(
          f"{self.path}: scanned at {max(self.mpp):.3g} um/px, coarser than the {mpp:.3g} um/px asked for; "
          "its patches would be upsampled. Use a gallery cut at a coarser resolution.")
    return dx, dy

  def region_plan(self, size: tuple[int, int], mpp: float) -> tuple[int, tuple[int, int]]:
    """(level, size read at that level) for a region of `size` pixels at `mpp`; see `best_level`."""
    dx, dy = self.downsample(mpp)
    level = best_level(self.level_downsamples, min(dx, dy))
    ds = self.level_downsamples[level]
    return level, (max(1, round(size[0] * dx / ds)), max(1, round(size[1] * dy / ds)))

  def read_region(self, location: tuple[int, int], size: tuple[int, int], mpp: float) -> np.ndarray:
    """uint8 (h, w, 3) RGB of `size` (w, h) pixels at `mpp`, its top-left at level-0 `location` (x, y)."""
    level, source = self.region_plan(size, mpp)
    return resize(self.read_level(level, location, source), size)

  def read_level(self, level: int, location: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """uint8 (h, w, 3) RGB straight from one level, no resize; areas outside the scan are background."""
    try:
      rgba = np.asarray(self._handle.read_region((int(location[0]), int(location[1])), level,
                                                 (int(size[0]), int(size[1]))))
    except openslide.OpenSlideError as e:
      raise DamagedSlideError(f"{self.path}: OpenSlide failed reading level {level} at {tuple(location)} "
                              f"(damaged or truncated pixel data: {e})") from e
    return _composite(rgba, self._background)

  def overview(self, mpp: float, max_pixels: int) -> Overview:
    """The whole slide at about `mpp` (coarser if needed to stay under `max_pixels`), decoded in
    chunks from the best level and box-reduced by an integer factor, so memory stays bounded."""
    width, height = self.dimensions
    wanted = max(mpp / min(self.mpp), math.sqrt(width * height / max_pixels), 1.0)
    level = best_level(self.level_downsamples, wanted)
    lw, lh = self.level_dimensions[level]
    factor = max(1, min(int(wanted / self.level_downsamples[level] * (1 + DOWNSAMPLE_SLACK)), lw, lh))
    if factor > 2 * OVERVIEW_CHUNK:
      raise SlideTooLargeError(
          f"{self.path}: no pyramid level near {wanted:.0f}x downsample; an overview would decode "
          f"{lw * lh / 1e9:.1f} Gpx of level {level}. Convert the slide to a pyramidal format.")
    out = np.empty((lh // factor, lw // factor, 3), np.uint8)
    chunk = factor * max(1, OVERVIEW_CHUNK // factor)
    ds = self.level_downsamples[level]
    for y in range(0, out.shape[0] * factor, chunk):
      for x in range(0, out.shape[1] * factor, chunk):
        w, h = min(chunk, out.shape[1] * factor - x), min(chunk, out.shape[0] * factor - y)
        part = self.read_level(level, (round(x * ds), round(y * ds)), (w, h))
        out[y // factor:(y + h) // factor, x // factor:(x + w) // factor] = reduce(part, factor)
    scale = (width / lw * factor, height / lh * factor)
    return Overview(out, scale, (scale[0] * self.mpp[0] + scale[1] * self.mpp[1]) / 2)

  def close(self) -> None:
    self._handle.close()

  def __enter__(self) -> Slide:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __repr__(self) -> str:
    return (f"Slide({str(self.path)!r}, vendor={self.vendor!r}, {self.dimensions[0]}x{self.dimensions[1]}, "
            f"mpp={self.mpp[0]:.4g}, levels={len(self.level_dimensions)})")


def open_slide(path, *, mpp: float | None = None, limits: SlideLimits = SlideLimits()) -> Slide:
  """Opens a whole-slide image (a file, or a DICOM WSI folder) through OpenSlide.

  mpp: microns per level-0 pixel, overriding the metadata (needed when the slide has none).
  Raises a `SlideError` subclass naming the file: NotASlideError, TruncatedSlideError,
  SlideTooLargeError, NoResolutionError.
  """
  path = pathlib.Path(path)
  target = _file_to_open(path)
  tiff = tiff_facts(target, limits.max_tiff_pages, limits.max_side)
  try:
    handle = openslide.OpenSlide(os.fspath(target))
  except openslide.OpenSlideUnsupportedFormatError as e:
    raise NotASlideError(f"{path}: not a whole-slide image OpenSlide reads{_what_it_is(target)}") from e
  except openslide.OpenSlideError as e:
    raise NotASlideError(f"{path}: OpenSlide could not open it (damaged, or an unsupported variant: {e})") from e
  try:
    _check_levels(path, handle, limits)
    resolution, source = _resolution(path, handle.properties, tiff, mpp)
  except SlideError:
    handle.close()
    raise
  return Slide(handle, path, resolution, source)


def best_level(downsamples, downsample: float) -> int:
  """The coarsest level whose downsample does not exceed `downsample` (with 1% slack).

  That level decodes the fewest pixels without upsampling: a coarser one would
  have to be enlarged, a finer one decodes more. Level 0 when none fits.
  """
  fits = [i for i, d in enumerate(downsamples) if d <= downsample * (1 + DOWNSAMPLE_SLACK)]
  return max(fits, key=lambda i: (downsamples[i], -i)) if fits else 0


def slide_id(path) -> str:
  """A slide's id: the file stem (a DICOM WSI folder: its name)."""
  path = pathlib.Path(path)
  return path.name if path.is_dir() else path.stem


def resize(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """`rgb` resized to `size` (w, h), antialiased as `tiling.resize` resizes gallery photos."""
  if (rgb.shape[1], rgb.shape[0]) == tuple(size):
    return rgb
  return np.asarray(PIL.Image.fromarray(rgb).resize(tuple(size), PIL.Image.Resampling.LANCZOS))


def reduce(rgb: np.ndarray, factor: int) -> np.ndarray:
  """Box-filter reduction by an integer factor (each output pixel the mean of factor x factor)."""
  if factor == 1:
    return rgb
  return np.asarray(PIL.Image.fromarray(rgb).reduce(factor))


def _file_to_open(path: pathlib.Path) -> pathlib.Path:
  """The file OpenSlide opens: the path, or for a DICOM WSI folder one of its files
  (OpenSlide then finds the other levels of the series in the same folder)."""
  if path.is_dir():
    dicom = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".dcm")
    if not dicom:
      raise NotASlideError(f"{path}: a folder, and not a DICOM WSI (it holds no .dcm files)")
    return dicom[0]
  if not path.is_file():
    raise NotASlideError(f"{path}: no such file")
  if path.stat().st_size == 0:
    raise NotASlideError(f"{path}: an empty file")
  return path


def _check_side(path, what: str, width: int, height: int, limits: SlideLimits) -> None:
  if width <= 0 or height <= 0:
    raise NotASlideError(f"{path}: {what} declares an empty image ({width} x {height})")
  if max(width, height) > limits.max_side:
    raise SlideTooLargeError(f"{path}: {what} declares {width:,} x {height:,} px, over the limit of "
                             f"{limits.max_side:,} px a side; nothing was allocated for it")


def _check_levels(path, handle: openslide.OpenSlide, limits: SlideLimits) -> None:
  if not 1 <= handle.level_count <= limits.max_levels:
    raise SlideTooLargeError(f"{path}: {handle.level_count} pyramid levels; between 1 and {limits.max_levels} expected")
  width, height = handle.dimensions
  _check_side(path, "level 0", width, height, limits)
  for level, (w, h) in enumerate(handle.level_dimensions):
    if not (0 < w <= width and 0 < h <= height):
      raise NotASlideError(f"{path}: level {level} declares {w} x {h} px, not within level 0's {width} x {height}")


def _resolution(path, properties, tiff: TiffFacts | None, override: float | None) -> tuple[tuple[float, float], str]:
  if override is not None:
    if not (math.isfinite(override) and PLAUSIBLE_MPP[0] <= override <= PLAUSIBLE_MPP[1]):
      raise ValueError(f"mpp override {override} is not a microscope's microns per pixel {PLAUSIBLE_MPP}")
    return (float(override), float(override)), "override"
  found = _property_mpp(properties)
  if found is not None and _plausible(found):
    return found, "openslide"
  if tiff is not None and tiff.mpp is not None and _plausible(tiff.mpp):
    return tiff.mpp, "tiff"
  seen = found or (tiff.mpp if tiff else None)
  why = (f"it declares {seen[0]:.4g} um/px, which no microscope scan has (an image editor's default?)" if seen
         else "no openslide.mpp-x/-y" + (f", and TIFF ResolutionUnit is {tiff.unit}" if tiff else ""))
  raise NoResolutionError(f"{path}: no usable microns per pixel ({why}). If you know it, pass it "
                          "(--mpp, or the mpp argument).")


def _property_mpp(properties) -> tuple[float, float] | None:
  try:
    x = float(properties[openslide.PROPERTY_NAME_MPP_X])
    y = float(properties.get(openslide.PROPERTY_NAME_MPP_Y, x))
  except (KeyError, ValueError):
    return None
  return (x, y) if math.isfinite(x) and math.isfinite(y) else None


def _plausible(mpp: tuple[float, float]) -> bool:
  return all(PLAUSIBLE_MPP[0] <= m <= PLAUSIBLE_MPP[1] for m in mpp) and max(mpp) / min(mpp) < 1.5


def _what_it_is(path: pathlib.Path) -> str:
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # Pillow's complaints about the photo's EXIF are beside the point here
      header = images.probe(path)
  except images.ImageError:
    return ""
  return (f" (a plain {header.format} image of {header.width} x {header.height} px: to search it as a photo, "
          "leave out --slides)")


def _background(properties) -> np.ndarray:
  """The colour of areas outside the scan: the slide's declared background, else white (glass)."""
  value = properties.get(openslide.PROPERTY_NAME_BACKGROUND_COLOR, "FFFFFF")
  try:
    return np.array([int(value[i:i + 2], 16) for i in (0, 2, 4)], np.uint16)
  except (ValueError, TypeError):
    return np.array([255, 255, 255], np.uint16)


def _composite(rgba: np.ndarray, background: np.ndarray) -> np.ndarray:
  """OpenSlide's RGBA (transparent outside the scanned area) on the background colour."""
  alpha = rgba[..., 3]
  if alpha.min(initial=255) == 255:
    return np.ascontiguousarray(rgba[..., :3])
  a = alpha[..., None].astype(np.uint16)
  return ((rgba[..., :3] * a + background * (255 - a) + 127) // 255).astype(np.uint8)
