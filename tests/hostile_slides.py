"""Slides the reader must refuse, and synthetic slides to test it on, written by the tests themselves.

    python -m tests.hostile_slides glass PATH [--side 50000]

`glass` is a VALID 50,000 x 50,000 slide of bare glass (7.5 GB as RGB) made of
one JPEG tile repeated (~70 MB on disk). Writing a declared-size image from an
array would write all of it, so the tile is encoded once and tifffile is given
the same bytes for every tile; the tests run it in a subprocess under an
RLIMIT_FSIZE (`ulimit -f`), so a mistake stops at the limit instead of filling
the disk.
"""

from __future__ import annotations

import argparse
import pathlib
import resource
import subprocess
import sys

import imagecodecs
import numpy as np
import tifffile

from tests.slide_fixtures import GLASS, TILE, tissue_image, write_pyramid


def glass_slide(path, side: int = 50_000, mpp: float = 0.5, downsamples=(1, 4, 16, 64)) -> None:
  """A square generic-tiff slide of glass, `side` px, every tile of every level the same JPEG bytes."""
  noise = np.random.default_rng(0).normal(0, 0.6, (TILE, TILE, 1))
  tile = np.clip(np.array(GLASS, np.float32) + noise, 0, 255).round().astype(np.uint8)
  encoded = imagecodecs.jpeg8_encode(tile, level=80)
  with tifffile.TiffWriter(path) as tif:
    for i, d in enumerate(downsamples):
      size = -(-side // d)
      tiles = (-(-size // TILE)) ** 2
      tif.write(iter([encoded] * tiles), shape=(size, size, 3), dtype=np.uint8, tile=(TILE, TILE),
                compression="jpeg", photometric="rgb", resolution=(1e4 / (mpp * d), 1e4 / (mpp * d)),
                resolutionunit="CENTIMETER", subfiletype=1 if i else 0, metadata=None)


def write_limited(kind: str, path, max_bytes: int, *args: str) -> None:
  """Runs `python -m tests.hostile_slides kind path ...` with files capped at `max_bytes` (ulimit -f)."""
  def limit():
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
  root = pathlib.Path(__file__).parents[1]
  subprocess.run([sys.executable, "-m", "tests.hostile_slides", kind, str(path), *args], cwd=root, check=True,
                 preexec_fn=limit, timeout=300)


def no_resolution_slide(path) -> None:
  """A good pyramidal TIFF of tissue with no resolution tags (ResolutionUnit none)."""
  write_pyramid(path, tissue_image(1024, 768, boxes=[(100, 100, 800, 500)]), None)


def truncated_copy(source, path, keep: float = 0.6) -> None:
  data = pathlib.Path(source).read_bytes()
  pathlib.Path(path).write_bytes(data[: int(len(data) * keep)])


def damaged_copy(source, path) -> None:
  """A copy whose tiles (every level) start with zeros instead of a JPEG header: opens, fails on read."""
  path = pathlib.Path(path)
  path.write_bytes(pathlib.Path(source).read_bytes())
  with tifffile.TiffFile(path) as tif:
    spans = [(o, c) for page in tif.pages for o, c in zip(page.dataoffsets, page.databytecounts)]
  with open(path, "r+b") as f:
    for offset, count in spans:
      f.seek(offset)
      f.write(b"\x00" * min(count, 16))


def stripped_photo_tiff(path) -> None:
  """A plain (stripped, one-page) TIFF photo: an image, not a slide, though a .tif like one."""
  tifffile.imwrite(path, tissue_image(640, 480, boxes=[(50, 50, 500, 350)]), photometric="rgb",
                   resolution=(1e4 / 0.42, 1e4 / 0.42), resolutionunit="CENTIMETER", metadata=None)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("kind", choices=["glass"])
  parser.add_argument("path")
  parser.add_argument("--side", type=int, default=50_000)
  args = parser.parse_args(argv)
  glass_slide(args.path, args.side)


if __name__ == "__main__":
  main()
