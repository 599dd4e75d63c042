"""What a TIFF-based slide declares, checked before OpenSlide opens it.

Aperio, generic-tiff, NDPI, Philips, Ventana and Leica slides are TIFFs. Their
page chain is parsed here with tifffile (reading tags, never pixels) so that a
file that declares absurd sizes or more pages than the limits is refused before
OpenSlide builds tile tables for it, and a file that ends before the data its
pages point to is called truncated at once, not on the first unlucky read. The
resolution tags are read here too: the fallback for microns per pixel.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import pathlib

import numpy as np
import tifffile

from histojax.slides.errors import NotASlideError, SlideError, SlideTooLargeError, TruncatedSlideError

MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders
_MICRONS_PER_UNIT = {2: 25_400.0, 3: 10_000.0}  # ResolutionUnit: 2 inch, 3 centimetre
_UNIT_NAMES = {1: "none", 2: "inch", 3: "centimeter"}


@dataclasses.dataclass(frozen=True)
class TiffFacts:
  mpp: tuple[float, float] | None  # (x, y) from XResolution/YResolution, when in cm or inch
  unit: str  # ResolutionUnit as named by TIFF


def tiff_facts(path: pathlib.Path, max_pages: int, max_side: int) -> TiffFacts | None:
  """Pages, declared sizes and data offsets checked; resolution tags read from the first page.

  None when the file is not a TIFF, or tifffile cannot parse it (OpenSlide then decides alone).
  """
  with open(path, "rb") as f:
    if f.read(4) not in MAGIC:
      return None
  file_size = path.stat().st_size
  try:
    with _quiet_tifffile(), tifffile.TiffFile(path) as tif:
      data_end = 0
      for i, page in enumerate(tif.pages):
        if i >= max_pages:
          raise SlideTooLargeError(f"{path}: over {max_pages} TIFF pages; refused before reading them")
        _check_page(path, i, page.imagewidth, page.imagelength, max_side)
        ends = np.asarray(page.dataoffsets, np.int64) + np.asarray(page.databytecounts, np.int64)
        data_end = max(data_end, int(ends.max(initial=0)))
      facts = TiffFacts(*_resolution(tif.pages.first))
  except SlideError:
    raise
  except Exception:  # noqa: BLE001  (tifffile's parse errors vary; OpenSlide is the judge of the format)
    return None
  if data_end > file_size:
    raise TruncatedSlideError(f"{path}: truncated: its TIFF pages declare data up to byte {data_end:,}, "
                              f"but the file has {file_size:,} bytes")
  return facts


def _check_page(path, index: int, width: int, height: int, max_side: int) -> None:
  if width <= 0 or height <= 0:
    raise NotASlideError(f"{path}: TIFF page {index} declares an empty image ({width} x {height})")
  if max(width, height) > max_side:
    raise SlideTooLargeError(f"{path}: TIFF page {index} declares {width:,} x {height:,} px, over the limit of "
                             f"{max_side:,} px a side; nothing was allocated for it")


def _resolution(page) -> tuple[tuple[float, float] | None, str]:
  unit = page.tags.get("ResolutionUnit")
  unit = int(unit.value) if unit is not None else 2  # TIFF's default unit is the inch
  name = _UNIT_NAMES.get(unit, str(unit))
  x, y = page.tags.get("XResolution"), page.tags.get("YResolution")
  if unit not in _MICRONS_PER_UNIT or x is None or y is None:
    return None, name
  try:
    per_unit = [num / den for num, den in (x.value, y.value)]
  except (TypeError, ValueError, ZeroDivisionError):
    return None, name
  if min(per_unit) <= 0:
    return None, name
  microns = _MICRONS_PER_UNIT[unit]
  return (microns / per_unit[0], microns / per_unit[1]), name


@contextlib.contextmanager
def _quiet_tifffile():
  """tifffile logs what it finds wrong in a file ("invalid page offset"), at error level; the
  SlideError raised here says it for the user, and where tifffile gives up OpenSlide decides."""
  logger = logging.getLogger("tifffile")
  hush = lambda record: False  # noqa: E731
  logger.addFilter(hush)
  try:
    yield
  finally:
    logger.removeFilter(hush)
