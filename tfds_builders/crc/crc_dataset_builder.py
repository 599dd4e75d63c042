"""crc: Warwick extended colorectal cancer grading set, three grades, tiled.

300 H&E images of about 5000x7300 px at 20x, graded normal, low grade or high
grade. Where the archive is divided into folds (fold_1/1_normal/...), each fold
is a split (`fold1`, `fold2`, `fold3`) and is kept as published; train on two
with `--config.dataset.train_split=fold1+fold2`. An archive without folds is
cut into the same number of folds per image, stratified by grade.
"""

from __future__ import annotations

import dataclasses
import re

import tensorflow_datasets as tfds
from etils import epath

from tfds_builders import common

CLASS_NAMES = ("normal", "low_grade", "high_grade")
# Grade folder names seen in the wild, compared lower-case without separators or a leading number.
GRADES = {"normal": 0, "grade1": 0, "lowgrade": 1, "low": 1, "grade2": 1, "highgrade": 2, "high": 2, "grade3": 2}
FOLD = re.compile(r"^fold[ _-]?(\d+)$", re.IGNORECASE)


@dataclasses.dataclass
class CrcConfig(common.TiledConfig):
  num_folds: int = 3  # only for archives without folds
  split_seed: int = 0


class Builder(common.TiledBuilder):
  """Warwick extended CRC grading images, tiled; published folds kept."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  CLASS_NAMES = CLASS_NAMES
  HOMEPAGE = "https://warwick.ac.uk/fac/cross_fac/tia/data/extended_crc_grading/"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Request the Extended CRC Grading dataset at
  https://warwick.ac.uk/fac/cross_fac/tia/data/extended_crc_grading/ , unzip it
  and pass the folder that holds it as manual_dir. Either layout is read:
    <manual_dir>[/<archive>]/fold_<k>/{1_normal,2_low_grade,3_high_grade}/<image>.png   (published folds)
    <manual_dir>[/<archive>]/{Normal,Low Grade,High Grade}/<image>.png                 (no folds)
  """
  BUILDER_CONFIGS = [
      CrcConfig(name="default", description="20x, 224 px tiles, Otsu tissue filter; one split per fold."),
      CrcConfig(name="x10", description="10x (resized by 0.5), 224 px tiles; one split per fold.", resize=0.5),
  ]

  def _sources(self, manual_dir: epath.Path) -> list[common.SourceImage]:
    candidates = [manual_dir] + common.subfolders(manual_dir)
    for root in candidates:
      folds = [d for d in common.subfolders(root) if FOLD.match(d.name)]
      if folds:
        return [s for fold in folds for s in self._grade_images(fold, f"fold{int(FOLD.match(fold.name)[1])}",
                                                                fold.name)]
    for root in candidates:
      if any(_grade(d.name) is not None for d in common.subfolders(root)):
        return self._split_into_folds(self._grade_images(root, "", ""))
    raise self.layout_error(f"found neither fold_<k>/ nor grade folders (normal, low grade, high grade) "
                            f"under {manual_dir}.")

  def _grade_images(self, root: epath.Path, split: str, original_split: str) -> list[common.SourceImage]:
    sources = []
    for folder in common.subfolders(root):
      grade = _grade(folder.name)
      if grade is None:
        raise self.layout_error(f"{folder} is not a grade folder (normal, low grade, high grade).")
      sources += [common.SourceImage(str(p), grade, p.stem, split, original_split) for p in common.list_images(folder)]
    return sources

  def _split_into_folds(self, sources: list[common.SourceImage]) -> list[common.SourceImage]:
    cfg = self.builder_config
    names = [(f"fold{k + 1}", 1.0 / cfg.num_folds) for k in range(cfg.num_folds)]
    names[-1] = (names[-1][0], 1.0 - sum(f for _, f in names[:-1]))
    folds = common.stratified_split({s.source_id: s.label for s in sources}, names, cfg.split_seed)
    return [dataclasses.replace(s, split=folds[s.source_id]) for s in sources]


def _grade(folder_name: str) -> int | None:
  # "1_normal" -> "normal", "Low Grade" -> "lowgrade", "Grade3" -> "grade3"
  return GRADES.get(re.sub(r"^\d+", "", re.sub(r"[^a-z0-9]", "", folder_name.lower())))
