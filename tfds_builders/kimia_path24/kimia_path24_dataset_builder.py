"""kimia_path24: Kimia Path24 (colour release, Path24C), 24 scans, patch retrieval.

The benchmark's test set is 1,325 patches of 1000x1000 px (0.5 mm) cut from 24
whole-slide scans, one class per scan (s0..s23). Training data is what the
protocol leaves: the training patches the release ships, or, for a release
that ships the scans with the test regions whitened out, every 1000x1000 window
of each scan that passes the tissue filter.

Variants:
  path24         patches at full size (original bytes kept), scored on the test
                 set with the patch-to-scan accuracies eta_p, eta_w.
  leave_one_out  every image resized to 300x300 (bicubic), as in the metric-
                 learning reference: each test patch queries the other 1,324
                 (gallery = query = `test`; a patch is its own source, so
                 `eval.exclude_same_source` leaves out exactly itself).
"""

from __future__ import annotations

import dataclasses
import re

import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from histojax.data import tiling
from tfds_builders import common

NUM_SCANS = 24
CLASS_NAMES = tuple(f"s{k}" for k in range(NUM_SCANS))
TEST_PATCHES = 1325
SCAN = re.compile(r"^s(\d+)$")
TEST_DIRS = ("RGBPatches-test", "Test patches", "Test-patches", "Test", "test", "Testing")
TRAIN_DIRS = ("Training", "Training patches", "train")
WINDOW = 1000  # px, the protocol's patch size


@dataclasses.dataclass
class KimiaConfig(common.TiledConfig):
  mpp: float | None = 0.5  # 1000 px patches of 0.5 mm
  protocol: str = "path24"  # or "leave_one_out"


class Builder(common.TiledBuilder):
  """Kimia Path24 patches: 24 scan classes, 1,325 test patches, training per protocol."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  CLASS_NAMES = CLASS_NAMES
  HOMEPAGE = "https://github.com/KimiaLabMayo/kimia_path24"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download Kimia Path24C from https://github.com/KimiaLabMayo/kimia_path24
  (Kimia Lab, University of Waterloo; accept its end-user agreement): the test
  patches and the training patches (or training scans). Unzip them into one
  folder and pass it (or the folder above it) as manual_dir:
    <manual_dir>/RGBPatches-test/s<k>/<n>.jpg     1,325 test patches, k = 0..23
                 (also read: "Test patches", "Test-patches", "Test")
    <manual_dir>/Training/s<k>/<n>.jpg             training patches, or
    <manual_dir>/Training/s<k>.jpg                 whole training scans, test regions whitened
  """
  BUILDER_CONFIGS = [
      KimiaConfig(name="path24", description="Patches at full size; training scans cut into 1000 px windows.",
                  patch_size=0),
      KimiaConfig(name="leave_one_out", description="Every image resized to 300x300; leave-one-out retrieval "
                  "among the test patches.", patch_size=0, image_size=(300, 300), protocol="leave_one_out"),
  ]

  def _sources(self, manual_dir: epath.Path) -> list[common.SourceImage]:
    if self.builder_config.protocol not in ("path24", "leave_one_out"):
      raise ValueError(f"kimia_path24: unknown protocol {self.builder_config.protocol!r}")
    root = next((r for r in [manual_dir, *common.subfolders(manual_dir)] if common.find_folder(r, TEST_DIRS)), None)
    if root is None:
      raise self.layout_error(f"no test patch folder ({', '.join(TEST_DIRS)}) under {manual_dir}.")
    test = self._patches(common.find_folder(root, TEST_DIRS), "test")
    if len(test) != TEST_PATCHES:
      logging.warning("kimia_path24: %d test patches, the benchmark has %d", len(test), TEST_PATCHES)
    self.info.metadata.update({"protocol": self.builder_config.protocol, "test_patches": len(test)})
    train_dir = common.find_folder(root, TRAIN_DIRS)
    if train_dir is None:
      raise self.layout_error(f"no training folder ({', '.join(TRAIN_DIRS)}) beside {root}/{TEST_DIRS[0]}.")
    scans = [p for p in common.list_images(train_dir) if SCAN.match(p.stem)]
    self._train_from_scans = bool(scans)
    train = self._scans(scans) if scans else self._patches(train_dir, "train")
    return train + test

  def _patches(self, folder: epath.Path, split: str) -> list[common.SourceImage]:
    sources = []
    for scan_dir in common.subfolders(folder):
      label = _scan_index(scan_dir.name)
      if label is None:
        raise self.layout_error(f"{scan_dir} is not a scan folder s0..s{NUM_SCANS - 1}.")
      sources += [common.SourceImage(str(p), label, f"{split}/{scan_dir.name}/{p.stem}", split, folder.name)
                  for p in common.list_images(scan_dir)]
    return sources

  def _scans(self, scans: list[epath.Path]) -> list[common.SourceImage]:
    out = []
    for p in scans:
      label = _scan_index(p.stem)
      if label is None:
        raise self.layout_error(f"{p} is not a training scan s0..s{NUM_SCANS - 1}.")
      out.append(common.SourceImage(str(p), label, f"scan/{p.stem}", "train", p.parent.name))
    return out

  def image_spec(self, split: str) -> common.ImageSpec:
    spec = super().image_spec(split)
    if split != "train" or not self._train_from_scans:
      return spec
    # Cut scans into the protocol's 1000 px windows; at 300x300 the same windows
    # are cut from the scan shrunk by 0.3.
    size = self.builder_config.image_size
    scale = size[0] / WINDOW if size else 1.0
    patch = round(WINDOW * scale)
    return dataclasses.replace(spec, tiles=tiling.TilingConfig(
        patch, patch, scale, self.builder_config.tissue_threshold, self.builder_config.min_tissue_fraction))


def _scan_index(name: str) -> int | None:
  match = SCAN.match(name)
  return int(match[1]) if match and int(match[1]) < NUM_SCANS else None
