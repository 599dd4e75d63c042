"""Finding the slides in a folder: one entry per slide, whatever the number of files it spans.

Some formats spread one slide over many files, and a walk that takes each file
for a slide would open a MIRAX slide's hundred data files, or each level of a
DICOM WSI, as slides of their own:

- MIRAX: `X.mrxs` plus a companion folder `X/` (Slidedat.ini and Data*.dat).
  The .mrxs is the slide; the folder is skipped.
- DICOM WSI: a folder of .dcm files, one per level (and label, overview) of one
  series, is one slide: the folder. (One series per folder, as archives and
  OpenSlide's DICOM support expect.)
- Hamamatsu VMS/VMU: the .vms/.vmu is the slide; its .jpg companions are not
  slide files and are skipped.

The caller's `--slides` flag, not a suffix, says that these are slides: a .tif
can be a slide or a photo. The suffixes only keep a walk from offering files
that never are (spreadsheets, annotations, thumbnails); they are returned as
`skipped` so a command can say what it left out. A single file given directly
is taken as a slide whatever its suffix.
"""

from __future__ import annotations

import os
import pathlib
import typing

# What OpenSlide 4.0 opens (https://openslide.org/formats/): Aperio, Hamamatsu, Leica, MIRAX,
# Philips, Sakura, Trestle, Ventana, generic tiled TIFF; DICOM folders are found separately.
SLIDE_SUFFIXES = frozenset({".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif"})
MIRAX_INDEX = "Slidedat.ini"


class SlideWalk(typing.NamedTuple):
  slides: list[pathlib.Path]  # files, and DICOM WSI folders, in a stable sorted order
  skipped: list[pathlib.Path]  # files under the root that are not slide files


def find_slides(root) -> SlideWalk:
  """Every slide under `root` (or `root` itself when it is a file or a DICOM WSI folder)."""
  root = pathlib.Path(root)
  if root.is_file():
    return SlideWalk([root], [])
  if not root.is_dir():
    raise FileNotFoundError(f"{root}: no such file or folder of slides")
  slides, skipped = [], []
  for folder, dirs, files in os.walk(root):
    here = pathlib.Path(folder)
    dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not _companion(here, d, files))
    visible = sorted(f for f in files if not f.startswith("."))
    if _is_dicom_folder(here, visible):
      slides.append(here)
      skipped += [here / f for f in visible if not _is_dicom_file(here / f)]
      dirs[:] = []  # a DICOM series' folder holds no further slides
      continue
    for name in visible:
      (slides if pathlib.Path(name).suffix.lower() in SLIDE_SUFFIXES else skipped).append(here / name)
  return SlideWalk(sorted(slides), sorted(skipped))


def slide_paths(root) -> list[pathlib.Path]:
  """The slides under `root`, one path per slide (see `find_slides`)."""
  return find_slides(root).slides


def _companion(folder: pathlib.Path, name: str, files: list[str]) -> bool:
  """A MIRAX slide's data folder: it sits beside `name.mrxs`, or holds Slidedat.ini."""
  if any(f.lower() == f"{name.lower()}.mrxs" for f in files):
    return True
  return (folder / name / MIRAX_INDEX).is_file()


def _is_dicom_folder(folder: pathlib.Path, files: list[str]) -> bool:
  return any(_is_dicom_file(folder / f) for f in files)


def _is_dicom_file(path: pathlib.Path) -> bool:
  return path.suffix.lower() == ".dcm"
