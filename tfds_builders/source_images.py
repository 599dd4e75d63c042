"""One source image of an archive -> its examples: the per-image work of a build, shared by
both routes (the local route's worker processes, `common.TiledBuilder`, and the Beam
route's workers, `beam_route`).

Reading goes through the project's one decoder with the archive's pixel limit; a file
that cannot be decoded is named (`CorruptImageError`); stain normalisation and tiling
are `histojax.data`'s, so the query path cuts a query exactly as this cut the gallery.
Everything here is picklable and imports no builder.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import numpy as np
import PIL.Image
from etils import epath

from histojax.data import images, stain, tiling

# Histology images are legitimately huge (BRACS RoIs pass 100 Mpx): archives get a
# generous pixel limit, passed to each decode (never set process-wide on import);
# `prepare --max_pixels` raises it.
MAX_PIXELS = images.DEFAULT_MAX_PIXELS["archive"]



class BuildError(Exception):
  """A build stopped on its input; the message says what to fix. Nothing was marked prepared."""



class CorruptImageError(BuildError, ValueError):
  """An image file that cannot be decoded; the message names the file."""



@dataclasses.dataclass(frozen=True)
class ImageSpec:
  """The picklable part of a config that worker processes need."""
  tiles: tiling.TilingConfig | None
  resize: float
  image_size: tuple[int, int] | None
  encoding: str
  stain: str | None = None


@dataclasses.dataclass(frozen=True)
class SourceImage:
  path: str
  label: int
  source_id: str  # unique in the dataset; all tiles of the image carry it
  split: str  # the split it is written to
  original_split: str = ""  # as the archive names it; "" where it has none
  extra: tuple[tuple[str, Any], ...] = ()  # builder-specific features, same for every tile


@dataclasses.dataclass(frozen=True)
class Prepared:
  source: SourceImage
  examples: list[tuple[str, dict[str, Any]]]
  dropped: int
  error: str = ""  # set when the file could not be decoded


def read_rgb(path: str, max_pixels: int = MAX_PIXELS) -> np.ndarray:
  """HxWx3 uint8 (`histojax.data.images.read_image`); any failure raises CorruptImageError naming the file."""
  try:
    return images.read_image(_readable(path), max_pixels=max_pixels, name=path)
  except images.ImageError as e:
    raise CorruptImageError(f"cannot decode image {e}") from e
  except OSError as e:  # a gs:// file that cannot be read (local paths: ImageError above)
    raise CorruptImageError(f"cannot decode image {path}: {type(e).__name__}: {e}") from e


def _readable(path: str):
  """What the decoder opens: a local path as it is; a gs:// (or other epath) path as its bytes."""
  return epath.Path(path).read_bytes() if "://" in path else path


def encode(array: np.ndarray, encoding: str) -> bytes:
  # Encoded bytes, not arrays: TFDS would need TensorFlow to encode arrays.
  buf = io.BytesIO()
  if encoding == "jpeg":
    PIL.Image.fromarray(array).save(buf, format="JPEG", quality=95)
  else:
    # Level 1: measured on BACH tiles, 3x faster than the default 6 for 7% more bytes;
    # encoding is the slowest step of a build.
    PIL.Image.fromarray(array).save(buf, format="PNG", compress_level=1)
  return buf.getvalue()


def read_stained(path: str, spec: ImageSpec, max_pixels: int) -> np.ndarray:
  """The decoded image, stain-normalised as the spec says (the query path makes the same call)."""
  return stain.normalize(read_rgb(path, max_pixels), stain.spec(spec.stain))


def _whole_image(path: str, spec: ImageSpec, max_pixels: int) -> bytes:
  image = read_stained(path, spec, max_pixels)  # checks the file before the header is trusted below
  header = images.probe(_readable(path), name=path)
  untouched = (header.format in ("JPEG", "PNG") and header.mode == "RGB" and header.orientation == 1
               and spec.stain is None)
  if spec.image_size is None and spec.resize == 1.0 and untouched:
    return epath.Path(path).read_bytes()  # already RGB JPEG/PNG: keep the original bytes
  return encode(tiling.whole_image(image, spec.resize, spec.image_size), spec.encoding)


def prepare_source(source: SourceImage, spec: ImageSpec, max_pixels: int = MAX_PIXELS) -> Prepared:
  """All examples of one source image. Runs in worker processes: must stay picklable."""
  try:
    if spec.tiles is None:
      tiles = [(0, 0, _whole_image(source.path, spec, max_pixels))]
      dropped = 0
    else:
      kept, dropped = tiling.tile_image(read_stained(source.path, spec, max_pixels), spec.tiles)
      tiles = [(t.y, t.x, encode(t.image, spec.encoding)) for t in kept]
  except CorruptImageError as e:
    return Prepared(source, [], 0, str(e))
  examples = []
  for y, x, image in tiles:
    example = {"image": image, "label": source.label, "source_id": source.source_id,
               "coords": np.array([y, x], np.int32), "original_split": source.original_split,
               **dict(source.extra)}
    examples.append((f"{source.source_id}:{y}:{x}", example))
  return Prepared(source, examples, dropped)


def corrupt_image_error(error: str) -> CorruptImageError:
  """The stop of a build on a corrupt image, worded the same on every route."""
  return CorruptImageError(f"{error}\nNothing was marked prepared. Replace the file, or pass "
                           "--skip_corrupt to leave it out and count it.")
