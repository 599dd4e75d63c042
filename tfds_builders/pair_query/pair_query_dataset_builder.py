"""pair_query: unlabelled patches plus query pairs (the BYOL pair-query task).

The task: learn from unlabelled histology patches (self-supervised, e.g.
BYOL), then say for each query pair whether both patches show the same tissue
class. Splits hold the patches (`train`, `test`), one example per patch,
labelled `unlabelled`; the pairs live in the dataset's metadata
(`tfds.builder(...).info.metadata["pairs"]` or `sources.read_pairs`), keyed by
source id (the file stem):
  pairs["query"]       [a, b] pairs of test patches to answer
  pairs["validation"]  [a, b, same] pairs of train patches with the answer (1 same, 0 different)
"""

from __future__ import annotations

import csv

import tensorflow_datasets as tfds
from etils import epath

from tfds_builders import common

QUERIES = "queries.csv"
VALIDATION = "validation_ground_truth.csv"
SAME = {"1": 1, "0": 0, "true": 1, "false": 0, "same": 1, "different": 0}


class Builder(common.TiledBuilder):
  """Unlabelled histology patches and query pairs (with same/different answers for validation)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  CLASS_NAMES = ("unlabelled",)
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Put the task's files (from the course or challenge that hands them out) in one
  folder and pass it as manual_dir:
    <manual_dir>/train/<id>.png                  unlabelled training patches
    <manual_dir>/test/<id>.png                   patches the query pairs use
    <manual_dir>/queries.csv                     rows "<id>.png,<id>.png", no header
    <manual_dir>/validation_ground_truth.csv     optional: header, then rows "<id>_<id>,<1 same|0 different>"
                                                 over train patches
  """
  BUILDER_CONFIGS = [
      common.TiledConfig(name="default", description="Patches kept whole, as shipped.", patch_size=0),
  ]

  def _sources(self, manual_dir: epath.Path) -> list[common.SourceImage]:
    root = next((r for r in [manual_dir, *common.subfolders(manual_dir)] if (r / QUERIES).exists()), None)
    if root is None:
      raise self.layout_error(f"no {QUERIES} in {manual_dir} or a folder below it.")
    patches = {split: self._patches(root / split, split) for split in ("train", "test")}
    pairs = {"query": self._queries(root / QUERIES, {s.source_id for s in patches["test"]})}
    if (root / VALIDATION).exists():
      pairs["validation"] = self._validation(root / VALIDATION, {s.source_id for s in patches["train"]})
    self.info.metadata["pairs"] = pairs
    return patches["train"] + patches["test"]

  def _patches(self, folder: epath.Path, split: str) -> list[common.SourceImage]:
    if not folder.is_dir():
      raise self.layout_error(f"patch folder {folder} is missing.")
    return [common.SourceImage(str(p), 0, p.stem, split, split) for p in common.list_images(folder)]

  def _queries(self, path: epath.Path, test_ids: set[str]) -> list[list[str]]:
    pairs = []
    for line_no, row in _rows(path):
      if len(row) < 2:
        raise self.layout_error(f"{path} line {line_no}: expected two image names, got {row}")
      a, b = epath.Path(row[0]).stem, epath.Path(row[1]).stem
      if line_no == 1 and not {a, b} & test_ids:
        continue  # a header row
      for name in (a, b):
        if name not in test_ids:
          raise self.layout_error(f"{path} line {line_no}: {name} is not an image in test/")
      pairs.append([a, b])
    return pairs

  def _validation(self, path: epath.Path, train_ids: set[str]) -> list[list]:
    pairs = []
    for line_no, row in _rows(path):
      same = SAME.get(row[1].lower()) if len(row) > 1 else None
      if same is None:
        if line_no == 1:
          continue  # the header
        raise self.layout_error(f"{path} line {line_no}: expected '<id>_<id>,<1|0>', got {row}")
      pairs.append([*self._split_pair(row[0], train_ids, path, line_no), same])
    return pairs

  def _split_pair(self, key: str, ids: set[str], path, line_no) -> tuple[str, str]:
    # Ids may themselves hold "_": take the cut where both halves are train patches.
    for i, char in enumerate(key):
      if char == "_" and key[:i] in ids and key[i + 1:] in ids:
        return key[:i], key[i + 1:]
    raise self.layout_error(f"{path} line {line_no}: {key!r} is not '<id>_<id>' of two train/ patches")


# A pair list names two images a line: far below a million lines, each far below 4 KiB.
MAX_CSV_BYTES = 256 << 20


def _rows(path: epath.Path):
  """(line number, stripped cells) of the non-empty rows; a damaged file raises CsvError naming it."""
  size = path.stat().length
  if size > MAX_CSV_BYTES:
    raise CsvError(f"{path}: {size:,} bytes is too large for a pair list (at most {MAX_CSV_BYTES:,})")
  line_no = 0
  try:
    with path.open("r", encoding="utf-8") as f:
      for line_no, row in enumerate(csv.reader(f), 1):
        row = [cell.strip() for cell in row]
        if any("\x00" in cell for cell in row):  # csv accepts NUL since Python 3.11; a text list has none
          raise csv.Error("NUL byte in the row")
        if any(row):
          yield line_no, row
  except (UnicodeDecodeError, csv.Error) as e:
    raise CsvError(f"{path} line {line_no + 1}: not a text CSV of image names (damaged?): {e}") from None


class CsvError(common.BuildError, ValueError):
  """A pair CSV that is not text, holds NUL bytes or oversized fields; the message names it."""
