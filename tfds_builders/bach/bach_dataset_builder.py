"""bach: ICIAR 2018 BACH microscopy photos (breast), four classes, tiled.

400 H&E photos of 2048x1536 px (0.42 um/px), 100 per class, labelled in
`microscopy_ground_truth.csv`. The public set has no official split and no
patient ids, but photos with neighbouring numbers mostly come from one patient.
So by default (`split_scheme="blocks"`) each class is cut into blocks of
`block_size` consecutive photo numbers and whole blocks go to train, validation
and test, in that order along the numbers (as eva and THUNDER split BACH by
ranges of numbers): test then holds patients that train has not seen. The old
random split per photo, stratified by class (`split_scheme="photos"`, config
`x10_256_photos`), puts one patient's photos on both sides and overstates
accuracy (measured: photo vote 0.74 on it against 0.34 on other patients'
photos); it stays for comparison only. Every tile of a photo stays in its
photo's split. The official files are `.tif`; `.tiff/.jpg/.jpeg/.png` copies
are accepted and matched to the CSV by file stem.

The community's published splits are `split_scheme="eva"` and `"thunder"`
(`PUBLISHED_SPLITS`), and configs `whole_224_eva` / `whole_224_thunder` store
every photo whole as those benchmarks embed it (Resize to 224 on the short
side, then the export's centre crop to 224), so a frozen encoder is scored on
the same photos with the same input as their leaderboards.
"""

from __future__ import annotations

import csv
import dataclasses

import tensorflow_datasets as tfds
from etils import epath

from tfds_builders import common

CLASS_NAMES = ("Normal", "Benign", "InSitu", "Invasive")
GROUND_TRUTH = "microscopy_ground_truth.csv"


# Published splits of the 400 training photos, as ranges [start, stop) of the photo index
# class * 100 + number - 1, classes in alphabetical order (torchvision ImageFolder's order, which
# both benchmarks use; not CLASS_NAMES' order). The ranges follow patients (THUNDER checks its
# splits against BACH's patient table).
# eva: kaiko-ai/eva src/eva/vision/data/datasets/classification/bach.py (train 268, val 132).
# THUNDER: MICS-Lab/thunder src/thunder/datasets/dataset/bach.py: eva's train cut into train 218
# and val 50; eva's val is THUNDER's test (132).
PUBLISHED_CLASS_ORDER = ("Benign", "InSitu", "Invasive", "Normal")
_EVA_VALIDATION = ((41, 59), (60, 90), (139, 169), (240, 258), (260, 273), (345, 368))
PUBLISHED_SPLITS = {
    "eva": {"train": ((0, 41), (59, 60), (90, 139), (169, 240), (258, 260), (273, 345), (368, 400)),
            "validation": _EVA_VALIDATION},
    "thunder": {"train": ((0, 15), (25, 41), (59, 60), (90, 110), (120, 139), (169, 200), (210, 240), (258, 260),
                          (273, 305), (315, 345), (368, 380), (390, 400)),
                "validation": ((15, 25), (110, 120), (200, 210), (305, 315), (380, 390)),
                "test": _EVA_VALIDATION},
}
PHOTOS_PER_CLASS = 100
SPLIT_SCHEMES = ("blocks", "photos", *PUBLISHED_SPLITS)
# torchvision's Resize(224) of a 2048 x 1536 photo: short side 224, long side int(2048 * 224 / 1536).
WHOLE_224 = (224, 298)


def published_index(class_name: str, number: int) -> int:
  """The photo's index in eva's and THUNDER's listing: class * 100 + number - 1 (alphabetical classes)."""
  if not 1 <= number <= PHOTOS_PER_CLASS:
    raise ValueError(f"photo number {number} is outside 1-{PHOTOS_PER_CLASS}: the published splits cover the "
                     f"{PHOTOS_PER_CLASS} training photos of each class")
  return PUBLISHED_CLASS_ORDER.index(class_name) * PHOTOS_PER_CLASS + number - 1


def published_split(scheme: str, class_name: str, number: int) -> str:
  """The split `scheme` ("eva" or "thunder") puts photo `number` of `class_name` in."""
  index = published_index(class_name, number)
  for split, ranges in PUBLISHED_SPLITS[scheme].items():
    if any(start <= index < stop for start, stop in ranges):
      return split
  raise AssertionError(f"{scheme} ranges miss index {index}")  # the ranges tile 0-399 (tested)


@dataclasses.dataclass
class BachConfig(common.SplitConfig):
  mpp: float | None = 0.42  # the photos' published resolution (ICIAR 2018 BACH)
  split_scheme: str = "blocks"  # "blocks": patient-aware, by photo number; "photos": random per photo;
  # "eva" / "thunder": the benchmarks' published ranges (PUBLISHED_SPLITS; split_fractions unused)
  block_size: int = 5  # photos per block: 50 per class -> 10 blocks -> 7/1/2; 100 -> 20 -> 14/2/4


class Builder(common.TiledBuilder):
  """ICIAR 2018 BACH microscopy photos, tiled; split by blocks of neighbouring photo numbers per class."""

  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {
      "1.0.0": "Initial release.",
      "2.0.0": "Patient-aware split by default: blocks of 5 consecutive photo numbers per class, dealt to "
               "train/validation/test as contiguous runs (70/10/20). The random per-photo split is "
               "split_scheme='photos' (config x10_256_photos).",
  }
  CLASS_NAMES = CLASS_NAMES
  HOMEPAGE = "https://iciar2018-challenge.grand-challenge.org/Dataset/"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download ICIAR2018_BACH_Challenge.zip (the BACH training set) from
  https://zenodo.org/records/3632035 (or the challenge site,
  https://iciar2018-challenge.grand-challenge.org/Dataset/, after registering),
  unzip it and pass the folder that holds it as manual_dir:
    <manual_dir>/ICIAR2018_BACH_Challenge/Photos/microscopy_ground_truth.csv
    <manual_dir>/ICIAR2018_BACH_Challenge/Photos/{Normal,Benign,InSitu,Invasive}/<id>.tif
  (manual_dir may also be the Photos folder itself.)
  """
  # A fixed saturation threshold, not Otsu: a BACH photo is a field of view
  # chosen on tissue, often with no glass at all, and Otsu then cuts the tissue
  # itself in two (measured: Otsu ~0.3 while 85% of pixels have saturation > 0.1
  # and glass stays below ~0.05).
  BUILDER_CONFIGS = [
      BachConfig(name="default", description="20x (0.42 um/px), 224 px tiles, tissue = saturation > 0.1 "
                 "on half the tile; split 70/10/20 by blocks of 5 photo numbers.", tissue_threshold=0.1),
      BachConfig(name="x10_256", description="10x (resized by 0.5), 256 px tiles, tissue = saturation > 0.1 "
                 "on half the tile; split 70/10/20 by blocks of 5 photo numbers.", patch_size=256, resize=0.5,
                 tissue_threshold=0.1),
      BachConfig(name="x5_64", description="5x (resized by 0.25, 1.68 um/px), 64 px tiles (107 um, 48 per "
                 "photo), tissue = saturation > 0.1 on half the tile; split 70/10/20 by blocks of 5 photo "
                 "numbers.", patch_size=64, resize=0.25, tissue_threshold=0.1),
      BachConfig(name="x2_5_64", description="2.5x (resized by 0.125, 3.36 um/px), 64 px tiles (215 um, 12 "
                 "per photo), tissue = saturation > 0.1 on half the tile; split 70/10/20 by blocks of 5 photo "
                 "numbers.", patch_size=64, resize=0.125, tissue_threshold=0.1),
      BachConfig(name="x5_64_macenko", description="x5_64 with every photo Macenko stain-normalised to "
                 "one reference before tiling (search re-stains queries the same way).", patch_size=64,
                 resize=0.25, tissue_threshold=0.1, stain="macenko"),
      BachConfig(name="x5_64_reinhard", description="x5_64 with every photo's L*a*b* statistics (over its "
                 "stained pixels) matched to one reference before tiling (Reinhard; search does the same to "
                 "queries).", patch_size=64, resize=0.25, tissue_threshold=0.1, stain="reinhard"),
      BachConfig(name="whole_224_eva", description="Whole photos as eva embeds them: resized to 224 on the "
                 "short side (224x298, bicubic), centre-cropped to 224 by the export; eva's split (train 268, "
                 "validation 132 photos).", patch_size=0, image_size=WHOLE_224, split_scheme="eva"),
      BachConfig(name="whole_224_thunder", description="Whole photos resized to 224 on the short side "
                 "(224x298, bicubic), centre-cropped to 224 by the export; THUNDER's split (train 218, "
                 "validation 50, test 132 photos).", patch_size=0, image_size=WHOLE_224, split_scheme="thunder"),
      BachConfig(name="x10_256_photos", description="x10_256 split 70/10/20 per photo at random, stratified "
                 "by class: leaks patients across splits; for comparison only.", patch_size=256, resize=0.5,
                 tissue_threshold=0.1, split_scheme="photos"),
  ]

  def _sources(self, manual_dir: epath.Path) -> list[common.SourceImage]:
    photos = self._photos_dir(manual_dir)
    labels = self._ground_truth(photos / GROUND_TRUTH)
    files = self._files_by_stem(photos)
    missing = sorted(set(labels) - set(files))
    if missing:
      raise self.layout_error(f"{len(missing)} photos listed in {photos / GROUND_TRUTH} have no image file "
                              f"under {photos}/<Class>/: {missing[:5]}")
    unlisted = sorted(set(files) - set(labels))
    if unlisted:
      raise self.layout_error(f"images not listed in {GROUND_TRUTH}, so their label is unknown: "
                              f"{[str(files[s]) for s in unlisted[:5]]}")
    for stem, path in files.items():
      if path.parent.name != labels[stem]:
        raise self.layout_error(f"{path} lies in folder {path.parent.name} but {GROUND_TRUTH} labels it "
                                f"{labels[stem]}; fix the file or the CSV")
    splits = self._split({stem: CLASS_NAMES.index(labels[stem]) for stem in labels})
    return [common.SourceImage(path=str(files[stem]), label=CLASS_NAMES.index(labels[stem]), source_id=stem,
                               split=splits[stem], original_split="train")
            for stem in sorted(labels)]

  def _split(self, labels: dict[str, int]) -> dict[str, str]:
    cfg = self.builder_config
    if cfg.split_scheme == "photos":
      return common.stratified_split(labels, cfg.split_fractions, cfg.split_seed)
    if cfg.split_scheme not in SPLIT_SCHEMES:
      raise ValueError(f"{self.name}/{cfg.name}: split_scheme must be one of {SPLIT_SCHEMES}, got {cfg.split_scheme!r}")
    try:
      photos = {stem: (label, common.photo_number(stem)) for stem, label in labels.items()}
      if cfg.split_scheme in PUBLISHED_SPLITS:
        return {stem: published_split(cfg.split_scheme, CLASS_NAMES[label], number)
                for stem, (label, number) in photos.items()}
    except ValueError as e:
      raise self.layout_error(f"{e} (split_scheme {cfg.split_scheme!r})") from e
    return common.block_split(photos, cfg.split_fractions, cfg.block_size)

  def _photos_dir(self, manual_dir: epath.Path) -> epath.Path:
    for candidate in ("ICIAR2018_BACH_Challenge/Photos", "Photos", "."):
      if (manual_dir / candidate / GROUND_TRUTH).exists():
        return (manual_dir / candidate) if candidate != "." else manual_dir
    raise self.layout_error(f"no {GROUND_TRUTH} in {manual_dir}, {manual_dir}/Photos or "
                            f"{manual_dir}/ICIAR2018_BACH_Challenge/Photos.")

  def _ground_truth(self, path: epath.Path) -> dict[str, str]:
    """photo stem -> class name; the header row is optional (the official file has none)."""
    labels = {}
    with path.open() as f:
      for line_no, row in enumerate(csv.reader(f), 1):
        row = [cell.strip() for cell in row]
        if not any(row):
          continue
        if len(row) < 2:
          raise self.layout_error(f"{path} line {line_no}: expected 'filename,label', got {row}")
        name, label = row[0], row[1]
        if label not in CLASS_NAMES:
          if line_no == 1:
            continue  # a header such as "filename,label"
          raise self.layout_error(f"{path} line {line_no}: label {label!r} is not one of {CLASS_NAMES}")
        stem = epath.Path(name).stem
        if labels.setdefault(stem, label) != label:
          raise self.layout_error(f"{path} line {line_no}: {stem} is listed twice with different labels")
    return labels

  def _files_by_stem(self, photos: epath.Path) -> dict[str, epath.Path]:
    files: dict[str, epath.Path] = {}
    for class_name in CLASS_NAMES:
      folder = photos / class_name
      if not folder.is_dir():
        raise self.layout_error(f"class folder {folder} is missing.")
      for path in common.list_images(folder):
        if path.stem in files:
          raise self.layout_error(f"two images for one photo id {path.stem}: {files[path.stem]} and {path}")
        files[path.stem] = path
    return files
