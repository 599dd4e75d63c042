"""Cutting large images into patches, shared by the dataset builders and search.

A builder and the search CLI must tile the same way, or a query image is cut
differently from the gallery it is compared with; both call `tile_image`.

Tissue detection works on HSV saturation: H&E-stained tissue is saturated,
glass and background are not. The threshold is either fixed or Otsu's on the
whole image's saturation (computed once per image, not per tile, so a tile
that is all background is not split in two by its own threshold).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import PIL.Image
from skimage.filters import threshold_otsu


@dataclasses.dataclass(frozen=True)
class TilingConfig:
  patch_size: int = 224
  stride: int = 224  # = patch_size for non-overlapping tiles
  resize: float = 1.0  # scale applied before tiling, e.g. 0.5 to go from 40x to 20x
  tissue_threshold: float | None = None  # saturation in [0, 1]; None -> Otsu per image
  min_tissue_fraction: float = 0.5  # tiles with less tissue are dropped; 0 keeps all

  def __post_init__(self):
    if self.patch_size <= 0 or self.stride <= 0:
      raise ValueError(f"patch_size ({self.patch_size}) and stride ({self.stride}) must be positive")
    if not 0 < self.resize <= 16:
      raise ValueError(f"resize must be in (0, 16], got {self.resize}")
    if not 0 <= self.min_tissue_fraction <= 1:
      raise ValueError(f"min_tissue_fraction must be in [0, 1], got {self.min_tissue_fraction}")


def grid(height: int, width: int, patch_size: int, stride: int) -> np.ndarray:
  """Top-left (y, x) of every whole patch, row-major; partial edge tiles are skipped."""
  ys = np.arange(0, height - patch_size + 1, stride)
  xs = np.arange(0, width - patch_size + 1, stride)
  return np.stack(np.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2).astype(np.int32)


def resize(image: np.ndarray, factor: float) -> np.ndarray:
  """Rescales by `factor` (antialiased); a factor of 1 returns the image unchanged."""
  if factor == 1.0:
    return image
  h, w = image.shape[:2]
  size = (max(1, round(w * factor)), max(1, round(h * factor)))
  return np.asarray(PIL.Image.fromarray(image).resize(size, PIL.Image.Resampling.LANCZOS))


def saturation(image: np.ndarray) -> np.ndarray:
  """HSV saturation in [0, 1] of a uint8 RGB image."""
  # Elementwise max/min over the three uint8 planes: a numpy reduction over a
  # length-3 last axis is several times slower on a 2048x1536 photo.
  r, g, b = image[..., 0], image[..., 1], image[..., 2]
  high = np.maximum(np.maximum(r, g), b).astype(np.float32)
  low = np.minimum(np.minimum(r, g), b).astype(np.float32)
  return np.where(high > 0, (high - low) / np.maximum(high, 1.0), 0.0).astype(np.float32)


def otsu_threshold(values: np.ndarray) -> float:
  values = np.asarray(values, np.float32).ravel()
  return float(threshold_otsu(values)) if values.min() < values.max() else float(values.min())


@dataclasses.dataclass(frozen=True)
class Tile:
  y: int  # in the (resized) image's pixels
  x: int
  image: np.ndarray
  tissue_fraction: float


def tile_image(image: np.ndarray, cfg: TilingConfig) -> tuple[list[Tile], int]:
  """Tiles of one uint8 RGB image that pass the tissue filter, and how many were dropped.

  An image smaller than one patch (after resizing) gives no tiles, and is
  counted as one dropped tile, so it never disappears silently.
  """
  image = resize(image, cfg.resize)
  coords = grid(image.shape[0], image.shape[1], cfg.patch_size, cfg.stride)
  if len(coords) == 0:
    return [], 1
  sat = saturation(image)
  threshold = otsu_threshold(sat) if cfg.tissue_threshold is None else cfg.tissue_threshold
  kept, p = [], cfg.patch_size
  for y, x in coords:
    fraction = float(np.mean(sat[y:y + p, x:x + p] > threshold))
    if fraction >= cfg.min_tissue_fraction:
      kept.append(Tile(int(y), int(x), image[y:y + p, x:x + p], fraction))
  return kept, len(coords) - len(kept)



# --- The record of how a dataset was cut, and cutting a query the same way -----------
# An export/index manifest carries `record(...)` of the gallery split's builder
# settings; the query path rebuilds the same steps from it (`config_from_record`,
# `whole_image`), so a query photo is cut as the gallery photos were.

RECORD_FIELDS = ("patch_size", "stride", "resize", "tissue_threshold", "min_tissue_fraction", "image_size", "stain")


def record(tiles: TilingConfig | None, resize: float = 1.0, image_size=None, stain: dict | None = None) -> dict:
  """JSON-ready description of what a builder did to each source image.

  Tiled datasets: the `TilingConfig`'s fields (image_size null). Datasets of
  whole images (patch datasets, `tiles` None): patch_size 0, the builder's
  resize factor or target (height, width), every image kept. `stain`: the
  stain-normalisation spec applied to the whole image first, or null.
  """
  if tiles is not None:
    fields = dataclasses.asdict(tiles)
    fields.update(image_size=None, stain=stain)
  else:
    fields = dict(patch_size=0, stride=0, resize=float(resize), tissue_threshold=None, min_tissue_fraction=0.0,
                  image_size=None if image_size is None else [int(s) for s in image_size], stain=stain)
  return {key: fields[key] for key in RECORD_FIELDS}


def gallery_mpp(source_mpp: float | None, resize_factor: float, image_size=None) -> float | None:
  """Microns per pixel of a builder's examples: the source's divided by the resize factor
  (BACH's 0.42 um/px photos resized by 0.25: 1.68). None when the source's is not known, or
  when whole images were resized to one (height, width), which scales each image by its own
  factor."""
  if source_mpp is None or image_size is not None:
    return None
  return round(float(source_mpp) / float(resize_factor), 6)


def config_from_record(rec: dict) -> TilingConfig | None:
  """The `TilingConfig` a record describes; None for whole images (patch_size 0)."""
  if not rec.get("patch_size"):
    return None
  fields = {f.name for f in dataclasses.fields(TilingConfig)}
  return TilingConfig(**{k: v for k, v in rec.items() if k in fields})


def whole_image(image: np.ndarray, resize_factor: float = 1.0, image_size=None) -> np.ndarray:
  """A whole-image example as a builder stores it: resized to (height, width)
  (bicubic) when given, else by the factor (as `resize`)."""
  if image_size is not None:
    h, w = image_size
    return np.asarray(PIL.Image.fromarray(image).resize((int(w), int(h)), PIL.Image.Resampling.BICUBIC))
  return resize(image, resize_factor)
