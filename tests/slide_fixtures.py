"""Whole-slide test images made from the real BACH photos: pyramidal tiled TIFFs written with tifffile.

    python -m tests.slide_fixtures --out DIR [--photos BACH_DIR] [--per_slide 5] [--scale 1] [--aperio] [--pen]

The photos come from --photos or $HISTOJAX_BACH_DIR (the BACH folder, or its
Photos folder); the project never holds them, and the slides go wherever --out
says (tests write them into a temporary folder).

A slide is several photos of one class laid out on glass, as tissue pieces lie
on a real slide. Neighbouring photo numbers mostly come from one patient, so a
case is a block of `block_size` consecutive numbers (the same blocks the BACH
builder splits by), cut into slides of at most `per_slide` photos; `slides.csv`
gives slide_id, case_id, label and split (train 70% / validation 10% / test 20%
of each class's blocks, in number order, as the BACH builder splits).

Two layouts OpenSlide reads, and the only ones that can be made here:
- generic-tiff (default): JPEG tiles, one main-chain page per level, the coarser
  ones marked reduced-resolution (OpenSlide does not see SubIFD pyramids), and
  XResolution/YResolution in pixels per centimetre.
- aperio (--aperio): the same levels with Aperio's ImageDescription ("Aperio
  Image Library ...|MPP = 0.42"), a stripped thumbnail as the second page, and
  no resolution tags: OpenSlide takes the MPP from the description.
Hamamatsu NDPI/VMS, MIRAX, Leica SCN, DICOM WSI, Philips, Ventana and Sakura
need their vendors' writers (or multi-file layouts and codecs tifffile does not
write) and are not made here.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import os
import pathlib
import re

import numpy as np
import PIL.Image
import PIL.ImageDraw
import tifffile

from tfds_builders import common

BACH_MPP = 0.42  # the challenge's stated resolution of its photos
CLASSES = {"n": "Normal", "b": "Benign", "is": "InSitu", "iv": "Invasive"}
GLASS = (240, 240, 237)
INKS = {"blue": (38, 72, 168), "green": (36, 128, 74), "black": (28, 28, 34)}
APERIO = "Aperio Image Library v12.0.15"
TILE = 256
SPLITS = (("train", 0.7), ("validation", 0.1), ("test", 0.2))  # the BACH builder's


@dataclasses.dataclass(frozen=True)
class FixtureSlide:
  path: pathlib.Path
  slide_id: str
  case_id: str
  label: str
  split: str
  mpp: float
  photos: tuple[str, ...]
  boxes: tuple[tuple[int, int, int, int], ...]  # each photo's (x, y, w, h) in level-0 pixels
  pens: tuple[tuple[int, int, int, int], ...]  # each pen stroke's bounding box (x, y, w, h)


def write_pyramid(path, image: np.ndarray, mpp: float | None, *, downsamples=(1, 4, 16), quality: int = 90,
                  aperio: bool = False, tags: bool | None = None) -> None:
  """A pyramidal tiled TIFF of `image` with JPEG tiles.

  mpp: written as resolution tags (generic-tiff), or as Aperio's "MPP = " (aperio); None: nowhere.
  tags: write resolution tags (default: unless aperio, whose MPP is in the description; an
    aperio file with tags=True has them and no MPP in its description).
  """
  tags = not aperio if tags is None else tags
  levels = [image if d == 1 else np.asarray(PIL.Image.fromarray(image).reduce(d)) for d in downsamples]
  height, width = image.shape[:2]
  aperio_mpp = f"|MPP = {mpp}" if mpp is not None and not tags else ""
  with tifffile.TiffWriter(path) as tif:
    for i, (d, level) in enumerate(zip(downsamples, levels)):
      extra = {}
      if aperio:
        size = f"{width}x{height} [0,0 {width}x{height}] ({TILE}x{TILE})" + (f" -> {level.shape[1]}x{level.shape[0]}" if i else "")
        extra["description"] = f"{APERIO}\r\n{size} JPEG/RGB Q={quality}|AppMag = 20{aperio_mpp}"
      if tags and mpp is not None:
        extra.update(resolution=(1e4 / (mpp * d), 1e4 / (mpp * d)), resolutionunit="CENTIMETER")
      tif.write(level, tile=(TILE, TILE), compression="jpeg", compressionargs={"level": quality}, photometric="rgb",
                subfiletype=1 if i and not aperio else 0, metadata=None, **extra)
      if aperio and i == 0:  # Aperio's second page: a stripped thumbnail, not a level
        thumb = np.asarray(PIL.Image.fromarray(image).reduce(max(1, math.ceil(max(width, height) / 768))))
        tif.write(thumb, compression="jpeg", photometric="rgb", metadata=None,
                  description=f"{APERIO}\r\n{width}x{height} -> {thumb.shape[1]}x{thumb.shape[0]} - |AppMag = 20{aperio_mpp}")


def tissue_image(width: int, height: int, seed: int = 0, boxes=()) -> np.ndarray:
  """Glass with pink-and-purple textured 'tissue' in each (x, y, w, h) box: stained, saturated,
  nothing like the glass, so the tissue mask has a right answer."""
  rng = np.random.default_rng(seed)
  image = np.clip(np.array(GLASS, np.float32) + rng.normal(0, 1.5, (height, width, 1)), 0, 255).astype(np.uint8)
  for x, y, w, h in boxes:
    texture = rng.random((h // 8 + 1, w // 8 + 1))
    texture = np.asarray(PIL.Image.fromarray((texture * 255).astype(np.uint8)).resize((w, h), PIL.Image.BILINEAR))
    t = texture[..., None].astype(np.float32) / 255
    eosin, haematoxylin = np.array([225, 140, 190], np.float32), np.array([120, 70, 160], np.float32)
    image[y:y + h, x:x + w] = (eosin * (1 - t) + haematoxylin * t).astype(np.uint8)
  return image


def coloured_slides(out_dir, classes: dict[str, tuple], *, per_class: int = 2, size=(640, 448), mpp: float = 0.5,
                    cases_per_class: int | None = None) -> list[FixtureSlide]:
  """Small synthetic slides (no BACH needed): per class `per_class` slides of textured tissue in
  the class's two stain colours (`classes`: label -> ((r, g, b) light, (r, g, b) dark)), in
  `out_dir/<label>/<slide_id>.tif`, with a slides.csv (no split column). Slide ids are
  `<label>_<i>`; cases are `<label>_case<j>` (`cases_per_class`, default one per slide)."""
  out_dir = pathlib.Path(out_dir)
  made = []
  for c, (label, (light, dark)) in enumerate(sorted(classes.items())):
    (out_dir / label).mkdir(parents=True, exist_ok=True)
    for i in range(per_class):
      rng = np.random.default_rng(100 * c + i)
      width, height = size
      box = (width // 10, height // 10, width * 8 // 10, height * 8 // 10)
      image = tissue_image(width, height, seed=100 * c + i)
      t = np.asarray(PIL.Image.fromarray((rng.random((box[3] // 8 + 1, box[2] // 8 + 1)) * 255).astype(np.uint8))
                     .resize(box[2:], PIL.Image.BILINEAR), np.float32)[..., None] / 255
      stain = np.array(light) * (1 - t) + np.array(dark) * t
      image[box[1]:box[1] + box[3], box[0]:box[0] + box[2]] = stain.astype(np.uint8)
      slide_id = f"{label}_{i}"
      case = f"{label}_case{i % cases_per_class if cases_per_class else i}"
      path = out_dir / label / f"{slide_id}.tif"
      write_pyramid(path, image, mpp)
      made.append(FixtureSlide(path, slide_id, case, label, "", mpp, (), (box,), ()))
  with open(out_dir / "slides.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["slide_id", "case_id", "label"])
    writer.writerows([s.slide_id, s.case_id, s.label] for s in made)
  return made


def photos_folder(root) -> pathlib.Path:
  root = pathlib.Path(root)
  for candidate in (root / "ICIAR2018_BACH_Challenge" / "Photos", root / "Photos", root):
    if all((candidate / c).is_dir() for c in CLASSES.values()):
      return candidate
  raise FileNotFoundError(f"{root}: no BACH Photos/<Class> folders")


def bach_photos(root) -> dict[str, list[tuple[int, pathlib.Path]]]:
  """class -> [(photo number, path)] sorted by number (.jpg or .tif, as the archive ships)."""
  folder, out = photos_folder(root), {}
  for prefix, label in CLASSES.items():
    found = []
    for path in (folder / label).iterdir():
      match = re.fullmatch(rf"{prefix}(\d+)", path.stem)
      if match and path.suffix.lower() in (".jpg", ".jpeg", ".tif", ".tiff"):
        found.append((int(match.group(1)), path))
    out[label] = sorted(found)
  return out


def bach_slides(root, out_dir, *, per_slide: int = 5, block_size: int = 5, scale: float = 1.0,
                classes=None, numbers=None, aperio: bool = False, pen: bool = False,
                margin_um: float = 200.0) -> list[FixtureSlide]:
  """Writes the slides and `slides.csv` into `out_dir`; returns what each slide holds and where.

  scale: photos resized by this (0.5 -> 0.84 um/px slides, 4x fewer pixels); numbers:
  which photo numbers to use (default all); classes: which classes (default all four).
  """
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  mpp = BACH_MPP / scale
  slides = []
  for label, photos in bach_photos(root).items():
    if classes is not None and label not in classes:
      continue
    photos = [(n, p) for n, p in photos if numbers is None or n in numbers]
    # The BACH builder's split: whole blocks of neighbouring numbers, 70/10/20 in number order.
    splits = common.block_split({p.stem: (0, n) for n, p in photos}, SPLITS, block_size)
    for block in common.photo_blocks(photos, block_size):
      case_id = f"{label.lower()}_{block[0][0]:03d}-{block[-1][0]:03d}"
      for part in common.photo_blocks(block, per_slide):
        slide_id = f"{label.lower()}_{part[0][0]:03d}-{part[-1][0]:03d}"
        image, boxes, pens = _layout([_photo(p, scale) for _, p in part], mpp, margin_um, pen, seed=part[0][0])
        path = out_dir / label / f"{slide_id}.{'svs' if aperio else 'tif'}"
        path.parent.mkdir(exist_ok=True)
        write_pyramid(path, image, mpp, aperio=aperio)
        slides.append(FixtureSlide(path, slide_id, case_id, label, splits[part[0][1].stem], mpp,
                                   tuple(p.stem for _, p in part), boxes, pens))
  with open(out_dir / "slides.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["slide_id", "case_id", "label", "split"])
    writer.writerows([s.slide_id, s.case_id, s.label, s.split] for s in slides)
  return slides


def _photo(path: pathlib.Path, scale: float) -> np.ndarray:
  with PIL.Image.open(path) as im:
    im = im.convert("RGB")
    if scale != 1.0:
      im = im.resize((round(im.width * scale), round(im.height * scale)), PIL.Image.Resampling.LANCZOS)
    return np.asarray(im)


def _layout(photos: list[np.ndarray], mpp: float, margin_um: float, pen: bool, seed) -> tuple:
  """Photos in a grid on noisy glass (and pen strokes below them): image, photo boxes, pen boxes."""
  margin = round(margin_um / mpp)
  cols = math.ceil(math.sqrt(len(photos)))
  rows = math.ceil(len(photos) / cols)
  cell_w, cell_h = max(p.shape[1] for p in photos), max(p.shape[0] for p in photos)
  band = 3 * margin if pen else 0
  width, height = cols * cell_w + (cols + 1) * margin, rows * cell_h + (rows + 1) * margin + band
  rng = np.random.default_rng(seed)
  image = np.clip(np.array(GLASS, np.float32) + rng.normal(0, 1.5, (height, width, 1)), 0, 255).astype(np.uint8)
  boxes = []
  for i, photo in enumerate(photos):
    x = margin + (i % cols) * (cell_w + margin)
    y = margin + (i // cols) * (cell_h + margin)
    image[y:y + photo.shape[0], x:x + photo.shape[1]] = photo
    boxes.append((x, y, photo.shape[1], photo.shape[0]))
  pens = draw_pens(image, height - band, band, margin) if pen else []
  return image, tuple(boxes), tuple(pens)


def draw_pens(image: np.ndarray, top: int, band: int, margin: int) -> list[tuple[int, int, int, int]]:
  """A wavy stroke of each ink across the band under the photos, a third of the band thick."""
  canvas = PIL.Image.fromarray(image)
  draw = PIL.ImageDraw.Draw(canvas)
  width = image.shape[1]
  third = (width - 2 * margin) // 3
  thick = max(2, band // 4)
  boxes = []
  for i, colour in enumerate(INKS.values()):
    x0 = margin + i * third
    xs = np.linspace(x0, x0 + third - margin, 24)
    ys = top + band / 2 + np.sin(np.linspace(0, 3 * np.pi, 24)) * band / 6
    draw.line(list(zip(xs.tolist(), ys.tolist())), fill=colour, width=thick, joint="curve")
    boxes.append((int(x0 - thick), int(ys.min() - thick), int(third - margin + 2 * thick), int(np.ptp(ys) + 2 * thick)))
  image[:] = np.asarray(canvas)
  return boxes


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--photos", default=os.environ.get("HISTOJAX_BACH_DIR"),
                      help="the BACH folder (default: $HISTOJAX_BACH_DIR)")
  parser.add_argument("--out", required=True)
  parser.add_argument("--per_slide", type=int, default=5)
  parser.add_argument("--scale", type=float, default=1.0)
  parser.add_argument("--aperio", action="store_true")
  parser.add_argument("--pen", action="store_true")
  args = parser.parse_args(argv)
  if not args.photos:
    parser.error("give --photos or set HISTOJAX_BACH_DIR")
  slides = bach_slides(args.photos, args.out, per_slide=args.per_slide, scale=args.scale, aperio=args.aperio,
                       pen=args.pen)
  print(f"wrote {len(slides)} slides and slides.csv into {args.out}")


if __name__ == "__main__":
  main()
