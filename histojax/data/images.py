"""The one image decoder for files and bytes from outside: archives, queries, uploads.

`read_image` reads the header first and refuses an image whose pixel count is
over the caller's limit before a single pixel is decoded: a 1 MB PNG can
declare 20,000 x 20,000 pixels (1.2 GB as RGB). The limit is an argument, per
entry point (`DEFAULT_MAX_PIXELS`), never Pillow's process-wide
`MAX_IMAGE_PIXELS`: changing that on import silently lifted the guard for every
other decode in the process.

Only the formats histology archives and photos come in are parsed (a smaller
attack surface than every plugin Pillow ships). Whatever the file's mode, the
result is uint8 HxWx3 RGB: EXIF orientation applied (a phone photo of a slide
is stored sideways), 16-bit and 32-bit greyscale scaled to 8 bits by the image
maximum (microscope cameras fill 12 of 16 bits), greyscale/palette/CMYK
converted, and transparent pixels composited on white (glass, not black
"tissue").
"""

from __future__ import annotations

import dataclasses
import io
import os
import struct
import warnings

import numpy as np
import PIL.Image
import PIL.ImageOps

# Pixels (width x height) per entry point. Why these numbers:
#   archive: builders read the user's own downloads; BRACS RoIs pass 100 Mpx, so
#     the bound only stops absurd files (2 Gpx is 6 GB as RGB). prepare --max_pixels raises it.
#   search: a query is a photo or an RoI; 300 Mpx (17k x 17k, 0.9 GB as RGB) takes any
#     BRACS RoI and refuses bombs. search --max_pixels raises it.
#   serve: an HTTP upload from anyone; 64 Mpx (8k x 8k, 192 MB as RGB) is well above a
#     microscope camera frame (BACH photos are 3.1 Mpx) and keeps a worker's memory bounded.
DEFAULT_MAX_PIXELS = {"archive": 2_000_000_000, "search": 300_000_000, "serve": 64_000_000}

# Pillow format ids parsed; anything else is refused as not an image.
FORMATS = ("PNG", "JPEG", "MPO", "TIFF", "BMP", "WEBP", "GIF", "PPM")
# The file name endings of those formats, as Pillow registers them (.tif, .jpe, .pgm ...): the
# one list every folder walk uses (builders, search, index add, embed), so a file one of them
# takes for an image is one the others take too.
SUFFIXES = tuple(sorted(ext for ext, fmt in PIL.Image.registered_extensions().items() if fmt in FORMATS))

_GREY_WIDE = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_ALPHA = ("RGBA", "LA", "P", "PA", "La", "RGBa")
# What a damaged file can make a decoder raise (Pillow passes some parser errors through).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, KeyError,
                  struct.error, ZeroDivisionError, PIL.Image.DecompressionBombError)


class ImageError(ValueError):
  """An unreadable, truncated or non-image file; the message names it."""


class ImageTooLargeError(ImageError):
  """The header declares more pixels than the limit; nothing was decoded."""


def read_image(source, *, max_pixels: int, name: str | None = None) -> np.ndarray:
  """uint8 HxWx3 RGB from a path (str/PathLike) or encoded bytes.

  max_pixels: refuse (ImageTooLargeError) when width x height exceeds it, checked
    from the header before decoding.
  name: how messages name the image (default: the path, or "image bytes").
  """
  label = _label(source, name)
  with _file(source, label) as fp:
    im = _open(fp, label)
    try:
      check_pixels(im.size, max_pixels, label)
      im.load()
      if im.getexif().get(0x0112, 1) != 1:  # only then: exif_transpose copies even upright images
        im = PIL.ImageOps.exif_transpose(im)
      return _to_rgb(im)
    except ImageError:
      raise
    except _DECODE_ERRORS as e:
      raise ImageError(f"{label}: not a readable image (damaged {im.format} data: {type(e).__name__}: {e})") from e
    finally:
      im.close()


def decode_example(data) -> np.ndarray:
  """A dataset example's encoded image (PNG/JPEG/TIFF, as a builder wrote it) -> uint8 HxWx3,
  under the archive limit (a dataset folder can come from elsewhere too); arrays pass through."""
  if isinstance(data, np.ndarray):
    return data
  return read_image(bytes(data), max_pixels=DEFAULT_MAX_PIXELS["archive"], name="dataset example")


def check_pixels(size: tuple[int, int], max_pixels: int, label: str) -> None:
  """Refuses an empty image or one over `max_pixels`, naming how to raise the limit."""
  width, height = size
  if width <= 0 or height <= 0:
    raise ImageError(f"{label}: the header declares an empty image ({width} x {height})")
  if width * height > max_pixels:
    raise ImageTooLargeError(
        f"{label}: {width} x {height} = {width * height:,} pixels is over the limit of {max_pixels:,}; "
        "nothing was decoded. If the image is genuine, raise the limit (--max_pixels, or the "
        "max_pixels argument).")


@dataclasses.dataclass(frozen=True)
class Header:
  format: str
  mode: str
  width: int
  height: int
  orientation: int  # EXIF orientation tag; 1 = stored upright


def probe(source, name: str | None = None) -> Header:
  """What the header says, decoding nothing; ImageError if it is not an image."""
  label = _label(source, name)
  with _file(source, label) as fp, _open(fp, label) as im:
    try:
      orientation = int(im.getexif().get(0x0112, 1))
    except _DECODE_ERRORS:
      orientation = 1
    return Header(im.format, im.mode, im.size[0], im.size[1], orientation)


def _label(source, name: str | None) -> str:
  return name or (os.fspath(source) if isinstance(source, (str, os.PathLike)) else "image bytes")


def _file(source, label: str):
  try:
    return io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else open(source, "rb")
  except OSError as e:
    raise ImageError(f"{label}: not a readable image ({e.strerror or e})") from e


def _open(fp, label: str) -> PIL.Image.Image:
  """Pillow's format sniffing over FORMATS, without its global bomb check (ours is per call).

  Mirrors `PIL.Image.open`'s loop (the plugins' registered accept/factory pairs), which
  reads only the header; Pillow's own check would refuse genuine archive images over
  179 Mpx and cannot be set per call.
  """
  PIL.Image.init()
  prefix = fp.read(16)
  if not prefix:
    raise ImageError(f"{label}: not a readable image (empty file)")
  for fmt in FORMATS:
    factory, accept = PIL.Image.OPEN.get(fmt, (None, None))
    if factory is None or (accept is not None and not _truthy(accept(prefix))):
      continue
    fp.seek(0)
    try:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
        return factory(fp, label)
    except _DECODE_ERRORS as e:
      raise ImageError(f"{label}: not a readable image (damaged {fmt} header: {type(e).__name__}: {e})") from e
  raise ImageError(f"{label}: not a readable image (not one of {', '.join(FORMATS)})")


def _truthy(result) -> bool:
  return bool(result) and not isinstance(result, str)  # a str is Pillow's "almost, but" warning


def _to_rgb(im: PIL.Image.Image) -> np.ndarray:
  if im.mode in _GREY_WIDE:
    grey = np.asarray(im, np.float64)
    grey = np.clip(grey, 0.0, None) / max(float(grey.max()), 1.0) * 255.0
    return np.repeat(grey.astype(np.uint8)[..., None], 3, -1)
  if im.mode in _ALPHA or (im.mode in ("L", "RGB") and "transparency" in im.info):
    rgba = im.convert("RGBA")
    white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return np.asarray(PIL.Image.alpha_composite(white, rgba).convert("RGB"))
  return np.asarray(im.convert("RGB"))


# --- Finding images -------------------------------------------------------------------------

def is_image_file(path) -> bool:
  """A file whose name ends in one of `SUFFIXES` (any case), not hidden."""
  name = os.path.basename(os.fspath(path))
  return name.lower().endswith(SUFFIXES) and not name.startswith(".")


def image_paths(items: list[str], flag: str = "--images") -> list[str]:
  """Files as given, and the image files under each folder (recursively, sorted).

  Fails, naming `flag`, before anything is read if a path does not exist or a folder
  holds no image.
  """
  paths = []
  for item in items:
    if os.path.isdir(item):
      found = sorted(os.path.join(root, name) for root, _, names in os.walk(item) for name in names
                     if is_image_file(name))
      if not found:
        raise FileNotFoundError(f"{flag}: folder {item} holds no image ({', '.join(SUFFIXES)})")
      paths.extend(found)
    elif os.path.isfile(item):
      paths.append(item)
    else:
      raise FileNotFoundError(f"{flag}: {item} does not exist")
  return paths
