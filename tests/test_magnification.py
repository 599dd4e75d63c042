"""Magnification as a physical unit: builders know their images' microns per pixel (or are
told it), and an export and its index record the gallery's (`gallery_mpp`)."""

from __future__ import annotations

import dataclasses

import pytest
import tensorflow_datasets as tfds

from histojax import export
from histojax.data import tiling
from tests.archive_fixtures import BACH_CONFIG, bach_archive, build, save, tissue
from tfds_builders.image_folder.image_folder_dataset_builder import ImageFolderConfig


def test_gallery_mpp_is_the_source_resolution_over_the_resize():
  assert tiling.gallery_mpp(0.42, 0.25) == 1.68  # bach/x5_64
  assert tiling.gallery_mpp(0.42, 1.0) == 0.42
  assert tiling.gallery_mpp(0.25, 0.5) == 0.5  # BRACS at 20x
  assert tiling.gallery_mpp(None, 0.5) is None  # not known
  assert tiling.gallery_mpp(0.5, 1.0, image_size=(300, 300)) is None  # each image its own factor


@pytest.mark.parametrize("name,expected", [("default", 0.42), ("x10_256", 0.84), ("x5_64", 1.68),
                                           ("x2_5_64", 3.36)])
def test_bach_configs_know_their_magnification(name, expected):
  builder = tfds.builder(f"bach/{name}", data_dir="/nonexistent")
  assert builder.gallery_mpp("train") == pytest.approx(expected)


def test_a_prepared_dataset_records_its_resolution_and_the_export_reads_it(tmp_path):
  """BACH's published 0.42 um/px reaches the metadata and `dataset_gallery_mpp`; a user's own
  folder has none until `prepare --mpp` gives it, and then keeps it once prepared."""
  config = dataclasses.replace(BACH_CONFIG, name="t32_half", resize=0.5)
  _, b = build("bach", config, bach_archive(tmp_path / "bach"), tmp_path / "data")
  assert b.info.metadata["config"]["mpp"] == 0.42 and b.gallery_mpp("train") == 0.84

  for c, label in enumerate(("tumour", "adipose")):
    for i in range(2):
      save(tmp_path / "own" / label / f"{label}{i}.png", tissue(64, 96, seed=10 * c + i, glass=32))
  folder = ImageFolderConfig(name="t32", patch_size=32, split_fractions=(("train", 0.5), ("test", 0.5)))
  _, plain = build("image_folder", folder, tmp_path / "own", tmp_path / "plain")
  assert plain.gallery_mpp("train") is None
  _, told = build("image_folder", folder, tmp_path / "own", tmp_path / "told", mpp=0.5)
  assert told.info.metadata["config"]["mpp"] == 0.5
  # Reopened by name as export does (no kwargs): the recorded resolution, not the config's None.
  assert export.dataset_gallery_mpp("image_folder/t32", str(tmp_path / "told")) == 0.5
  with pytest.raises(ValueError, match="mpp must be microns per pixel"):
    tfds.builder("image_folder/t32", data_dir=str(tmp_path / "x"), mpp=-1.0)
