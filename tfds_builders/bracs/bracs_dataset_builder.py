"""bracs: BRACS breast RoIs (40x, variable size), official splits, 7 or 3 classes.

4,539 H&E regions of interest cut from 547 WSIs of 189 patients, labelled
N, PB, UDH, FEA, ADH, DCIS, IC, and split train/val/test by patient by the
authors; the splits are kept. Every tile carries both granularities:
`subtype` (7 classes) and `lesion_type` (benign N+PB+UDH, atypical FEA+ADH,
malignant DCIS+IC); `label` is the one the config names.

Folders are read by their lesion name, never by their number: the previous
release numbers ADH and FEA the other way round (3_ADH, 4_FEA), so a number
would silently swap two classes. A file whose name carries another label than
its folder stops the build.
"""

from __future__ import annotations

import dataclasses
import re

import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from tfds_builders import common

SUBTYPES = ("N", "PB", "UDH", "FEA", "ADH", "DCIS", "IC")
LESION_TYPES = ("benign", "atypical", "malignant")
LESION_OF_SUBTYPE = {"N": 0, "PB": 0, "UDH": 0, "FEA": 1, "ADH": 1, "DCIS": 2, "IC": 2}
# Folder names each release uses; anything else is refused.
LATEST_FOLDERS = ("0_N", "1_PB", "2_UDH", "3_FEA", "4_ADH", "5_DCIS", "6_IC")
PREVIOUS_FOLDERS = ("0_N", "1_PB", "2_UDH", "3_ADH", "4_FEA", "5_DCIS", "6_IC")
SPLITS = {"train": "train", "val": "validation", "test": "test"}
ROI_NAME = re.compile(r"^(?P<slide>BRACS_\d+)_(?P<subtype>[A-Z]+)_(?P<roi>\d+)$")


@dataclasses.dataclass
class BracsConfig(common.TiledConfig):
  mpp: float | None = 0.25  # 40x, Aperio AT2 (Brancati et al., BRACS, 2022)
  grouping: str = "7class"  # which granularity `label` holds: "7class" or "3class"


class Builder(common.TiledBuilder):
  """BRACS RoIs, tiled at 20x; official patient-level splits; 7-class or 3-class labels."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  HOMEPAGE = "https://www.bracs.icar.cnr.it/"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Register at https://www.bracs.icar.cnr.it/download/ and download the RoI set
  (BRACS_RoI, about 52 GB of PNG). Pass the folder that holds it as manual_dir:
    <manual_dir>/BRACS_RoI/latest_version/{train,val,test}/{0_N,1_PB,2_UDH,3_FEA,4_ADH,5_DCIS,6_IC}/BRACS_<wsi>_<label>_<n>.png
  (manual_dir may also be BRACS_RoI or latest_version itself). The previous
  release (previous_versions/Version1_MedIA/Images/..., with 3_ADH and 4_FEA)
  is read by folder name too, and only when latest_version is absent.
  """
  # Tissue = saturation > 0.1 on half the tile: RoIs are drawn on tissue, and
  # Otsu would split an all-tissue RoI in two.
  BUILDER_CONFIGS = [
      BracsConfig(name="7class", description="20x (resized by 0.5), 224 px tiles; label = 7 subtypes.",
                  resize=0.5, tissue_threshold=0.1),
      BracsConfig(name="3class", description="20x (resized by 0.5), 224 px tiles; label = benign / "
                  "atypical / malignant.", resize=0.5, tissue_threshold=0.1, grouping="3class"),
  ]

  @property
  def CLASS_NAMES(self):  # noqa: N802  (the base class reads it as a constant)
    return SUBTYPES if self.builder_config.grouping == "7class" else LESION_TYPES

  def _extra_features(self):
    return {"subtype": tfds.features.ClassLabel(names=SUBTYPES),
            "lesion_type": tfds.features.ClassLabel(names=LESION_TYPES),
            "slide_id": tfds.features.Text()}

  def _sources(self, manual_dir: epath.Path) -> list[common.SourceImage]:
    if self.builder_config.grouping not in ("7class", "3class"):
      raise ValueError(f"bracs: grouping must be '7class' or '3class', got {self.builder_config.grouping!r}")
    root, release = self._release_root(manual_dir)
    self.info.metadata["release"] = release
    sources = []
    for folder_split, split in SPLITS.items():
      split_dir = root / folder_split
      if not split_dir.is_dir():
        raise self.layout_error(f"split folder {split_dir} is missing.")
      for class_dir in common.subfolders(split_dir):
        subtype = self._subtype_of_folder(class_dir, release)
        sources.extend(self._roi(path, subtype, split, folder_split) for path in common.list_images(class_dir))
    return sources

  def _release_root(self, manual_dir: epath.Path) -> tuple[epath.Path, str]:
    latest = common.find_folder(manual_dir, ("BRACS_RoI/latest_version", "latest_version"))
    if latest is None and all((manual_dir / s).is_dir() for s in SPLITS):
      latest = manual_dir
    if latest is not None:
      return latest, "latest_version"
    previous = common.find_folder(manual_dir, ("BRACS_RoI/previous_versions/Version1_MedIA/Images",
                                               "previous_versions/Version1_MedIA/Images", "Version1_MedIA/Images"))
    if previous is not None:
      logging.warning("bracs: latest_version not found; reading the previous release %s by folder name "
                      "(its 3_ADH/4_FEA numbering is not used)", previous)
      return previous, "previous_version"
    raise self.layout_error(f"no BRACS_RoI/latest_version (with train, val, test) under {manual_dir}.")

  def _subtype_of_folder(self, class_dir: epath.Path, release: str) -> int:
    known = LATEST_FOLDERS if release == "latest_version" else PREVIOUS_FOLDERS
    if class_dir.name not in known:
      raise self.layout_error(f"unexpected class folder {class_dir}: the {release} release has {known}.")
    return SUBTYPES.index(class_dir.name.split("_", 1)[1])

  def _roi(self, path: epath.Path, subtype: int, split: str, folder_split: str) -> common.SourceImage:
    match = ROI_NAME.match(path.stem)
    if match and match["subtype"] != SUBTYPES[subtype]:
      raise self.layout_error(f"{path} is named {match['subtype']} but lies in the {SUBTYPES[subtype]} "
                              "folder; the archive is mis-sorted")
    lesion = LESION_OF_SUBTYPE[SUBTYPES[subtype]]
    label = subtype if self.builder_config.grouping == "7class" else lesion
    return common.SourceImage(
        path=str(path), label=label, source_id=path.stem, split=split, original_split=folder_split,
        extra=(("subtype", subtype), ("lesion_type", lesion),
               ("slide_id", match["slide"] if match else path.stem)))
