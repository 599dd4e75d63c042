"""Where the tissue is on a slide, from a low-resolution overview (about 8 um/px).

H&E-stained tissue is saturated; glass is not (the same rule as `tiling`, but
with a fixed threshold: Otsu's threshold on a slide of bare glass would split
the glass's own noise in two and call half of it tissue). Pen marks are
saturated too, so they are taken out first by colour: pathologists' blue and
green markers have hues from green to blue (75-230 degrees) at a saturation
H&E does not reach there, and black ink (or black margin dye) is darker than
any stained tissue on the overview. Measured on the 200 BACH photos at 6.7
um/px, those two rules take at most 0.1% (ink) and 2.6% (dark: b034's black
margin dye, rightly) of a photo's pixels. Their blurred edges on the overview
look like pale tissue, so the ink is dilated before it is taken out, and an
opening removes the thin rims that remain.

Morphology is in microns, not pixels, so the mask does not change with the
overview's resolution. A slide with no tissue is answered at once, from the
overview alone (NoTissueError), before any patch is read.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from histojax.data import tiling
from histojax.slides.errors import NoTissueError
from histojax.slides.reading import Overview, Slide


@dataclasses.dataclass(frozen=True)
class TissueSettings:
  mpp: float = 8.0  # overview resolution; coarser when the slide is too large for max_pixels
  max_pixels: int = 16_000_000  # overview pixels (48 MB as RGB), whatever the slide's size
  saturation: float = 0.05  # HSV saturation above which a pixel can be tissue (glass: < 0.02)
  ink_saturation: float = 0.3  # pen ink: at least this saturated...
  ink_hues: tuple[float, float] = (75.0, 230.0)  # ...with a hue from green to blue (degrees)
  dark: float = 0.25  # HSV value below which a pixel is black ink or dye, not tissue
  ink_margin_um: float = 16.0  # how far ink's blurred edge is cut back
  closing_um: float = 16.0  # gaps between tissue fragments closed up to about twice this
  min_area_um2: float = 10_000.0  # smaller specks (0.01 mm^2: dust, debris) are dropped
  max_hole_um2: float = 2_500.0  # smaller holes (vessels, nuclei-free gaps) are filled

  def record(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class TissueMask:
  """Tissue (True) per overview pixel; `scale` is level-0 pixels per mask pixel (x, y)."""
  mask: np.ndarray
  overview: Overview
  ink: np.ndarray  # pixels taken out as pen ink or black dye

  @property
  def scale(self) -> tuple[float, float]:
    return self.overview.scale

  @property
  def mpp(self) -> float:
    return self.overview.mpp

  @property
  def fraction(self) -> float:
    return float(self.mask.mean())

  def area_mm2(self) -> float:
    return float(self.mask.sum()) * self.mpp ** 2 / 1e6


def tissue_mask(slide: Slide, settings: TissueSettings = TissueSettings()) -> TissueMask:
  """The slide's tissue mask; NoTissueError (naming the slide) when there is none."""
  overview = slide.overview(settings.mpp, settings.max_pixels)
  mask, ink = segment_tissue(overview.rgb, overview.mpp, settings)
  if not mask.any():
    raise NoTissueError(f"{slide.path}: no tissue found (overview of {overview.rgb.shape[1]} x "
                        f"{overview.rgb.shape[0]} px at {overview.mpp:.3g} um/px; {ink.mean():.1%} pen ink "
                        "or dark marks): glass only?")
  return TissueMask(mask, overview, ink)


def segment_tissue(rgb: np.ndarray, mpp: float, settings: TissueSettings = TissueSettings()
                   ) -> tuple[np.ndarray, np.ndarray]:
  """(tissue, ink) boolean masks of a uint8 RGB overview whose pixels are `mpp` microns."""
  saturation = tiling.saturation(rgb)
  candidate = saturation > settings.saturation
  ink = pen_ink(rgb, saturation, settings)
  min_area = settings.min_area_um2 / mpp ** 2
  if candidate.sum() < min_area:  # the fast answer for glass: no morphology on an empty slide
    return np.zeros_like(candidate), ink
  candidate &= ~ndimage.binary_dilation(ink, _disk(settings.ink_margin_um / mpp))
  mask = ndimage.binary_opening(candidate, np.ones((3, 3), bool))  # rims 1-2 px wide go, corners stay
  mask = ndimage.binary_closing(mask, _disk(settings.closing_um / mpp), border_value=0)
  mask = _drop_small(mask, min_area)
  mask |= ~_drop_small(~mask, settings.max_hole_um2 / mpp ** 2, keep_border=True)
  return mask, ink


def pen_ink(rgb: np.ndarray, saturation: np.ndarray, settings: TissueSettings) -> np.ndarray:
  """Blue/green marker (saturated, hue green to blue) and black ink or dye (dark)."""
  value = np.maximum(np.maximum(rgb[..., 0], rgb[..., 1]), rgb[..., 2])
  ink = value < settings.dark * 255
  vivid = saturation > settings.ink_saturation
  hue = _hue(rgb[vivid])
  ink[vivid] |= (hue >= settings.ink_hues[0]) & (hue <= settings.ink_hues[1])
  return ink


def _hue(pixels: np.ndarray) -> np.ndarray:
  """HSV hue in degrees of (n, 3) uint8 pixels (computed only for the few vivid ones)."""
  r, g, b = (pixels[:, i].astype(np.float32) for i in range(3))
  high, low = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)
  span = np.maximum(high - low, 1e-6)
  hue = np.where(high == r, ((g - b) / span) % 6, np.where(high == g, (b - r) / span + 2, (r - g) / span + 4))
  return hue * 60.0


def _disk(radius: float) -> np.ndarray:
  r = max(1, int(round(radius)))
  y, x = np.ogrid[-r:r + 1, -r:r + 1]
  return x * x + y * y <= r * r


def _drop_small(mask: np.ndarray, min_area: float, keep_border: bool = False) -> np.ndarray:
  """`mask` without its connected parts smaller than `min_area` pixels (with keep_border, parts
  touching the edge stay whatever their size: the glass around the tissue is not a hole)."""
  labels, count = ndimage.label(mask)
  if count == 0:
    return mask
  areas = np.bincount(labels.ravel(), minlength=count + 1)
  keep = areas >= min_area
  if keep_border:
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    keep[edge] = True
  keep[0] = False
  return keep[labels]
