"""bracs, crc, kimia_path24, pair_query and image_folder, each from a tiny
archive in its real layout, built and read back through tfds.data_source."""

import dataclasses
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from histojax.data import sources
from tests.archive_fixtures import (BRACS_CONFIG, CRC_CONFIG, PAIR_TEST, PAIR_TRAIN, bracs_archive, build,
                                    crc_archive, kimia_archive, metadata, pair_archive, save, tissue)
from tfds_builders import common
from tfds_builders.bracs.bracs_dataset_builder import LESION_OF_SUBTYPE, SUBTYPES
from tfds_builders.image_folder.image_folder_dataset_builder import ImageFolderConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _disjoint(meta):
  ids = [set(m["source_id"]) for m in meta.values()]
  return all(not (a & b) for i, a in enumerate(ids) for b in ids[i + 1:])


def test_bracs_official_splits_and_both_label_sets(tmp_path):
  bracs_archive(tmp_path / "raw")
  ds, b = build("bracs", BRACS_CONFIG, tmp_path / "raw", tmp_path / "data")
  # One RoI per class and split; even classes 64x64 (4 tiles), odd 64x96 (6 tiles).
  assert {k: len(v) for k, v in ds.items()} == {"train": 34, "validation": 34, "test": 34}
  meta = metadata(ds)
  assert np.bincount(meta["train"]["label"]).tolist() == [4, 6, 4, 6, 4, 6, 4]
  assert _disjoint(meta)
  example = ds["validation"][0]
  name = example["source_id"].decode()  # BRACS_<wsi>_<LABEL>_<n>
  assert SUBTYPES[example["subtype"]] == name.split("_")[2] and example["label"] == example["subtype"]
  assert example["lesion_type"] == LESION_OF_SUBTYPE[name.split("_")[2]]
  assert example["slide_id"].decode() == "_".join(name.split("_")[:2])
  assert example["original_split"] == b"val"
  assert b.info.metadata["release"] == "latest_version"

  three, _ = build("bracs", dataclasses.replace(BRACS_CONFIG, name="t32_3", grouping="3class"),
                   tmp_path / "raw", tmp_path / "data")
  assert np.bincount(metadata(three)["train"]["label"]).tolist() == [14, 10, 10]  # N+PB+UDH, FEA+ADH, DCIS+IC


def test_bracs_previous_release_is_read_by_folder_name(tmp_path):
  # The previous release numbers ADH 3 and FEA 4; reading by number would swap them.
  folders = ["0_N", "1_PB", "2_UDH", "3_ADH", "4_FEA", "5_DCIS", "6_IC"]
  bracs_archive(tmp_path / "raw", folders, release="previous_versions/Version1_MedIA/Images")
  ds, b = build("bracs", BRACS_CONFIG, tmp_path / "raw", tmp_path / "data")
  assert b.info.metadata["release"] == "previous_version"
  for i in range(len(ds["train"])):
    example = ds["train"][i]
    assert SUBTYPES[example["label"]] == example["source_id"].decode().split("_")[2]


def test_bracs_refuses_a_mis_sorted_roi_and_unknown_folders(tmp_path):
  base = bracs_archive(tmp_path / "raw")
  save(base / "train" / "4_ADH" / "BRACS_9_FEA_1.png", tissue(64, 64, 0))
  with pytest.raises(common.ManualDirError, match="BRACS_9_FEA_1.png is named FEA but lies in the ADH folder"):
    build("bracs", BRACS_CONFIG, tmp_path / "raw", tmp_path / "data")
  (base / "train" / "4_ADH" / "BRACS_9_FEA_1.png").unlink()
  (base / "train" / "4_ADH").rename(base / "train" / "3_ADH")  # previous numbering inside latest_version
  with pytest.raises(common.ManualDirError, match="unexpected class folder .*3_ADH"):
    build("bracs", BRACS_CONFIG, tmp_path / "raw", tmp_path / "data")


def test_crc_keeps_published_folds(tmp_path):
  crc_archive(tmp_path / "raw")
  ds, _ = build("crc", CRC_CONFIG, tmp_path / "raw", tmp_path / "data")
  assert {k: len(v) for k, v in ds.items()} == {"fold1": 24, "fold2": 24, "fold3": 24}
  meta = metadata(ds)
  assert _disjoint(meta)
  for fold, m in meta.items():
    assert np.bincount(m["label"]).tolist() == [8, 8, 8]
    assert all(sid.startswith(f"H{fold[-1]}") for sid in m["source_id"])
  assert ds["fold2"][0]["original_split"] == b"fold_2"
  both = sources.open_split("crc/t32", "fold1+fold3", str(tmp_path / "data"))
  assert len(both) == 48
  with pytest.raises(KeyError, match="no split 'fold4'"):
    sources.open_split("crc/t32", "fold1+fold4", str(tmp_path / "data"))


def test_crc_without_folds_is_cut_into_stratified_folds(tmp_path):
  crc_archive(tmp_path / "raw", folds=False, per_grade=3)
  ds, _ = build("crc", CRC_CONFIG, tmp_path / "raw", tmp_path / "data")
  meta = metadata(ds)
  assert sorted(ds) == ["fold1", "fold2", "fold3"] and _disjoint(meta)
  for m in meta.values():
    assert np.bincount(m["label"]).tolist() == [4, 4, 4]  # one image (4 tiles) per grade per fold
    assert len(set(m["source_id"])) == 3
  assert ds["fold1"][0]["original_split"] == b""  # the archive had no folds


def test_kimia_path24_keeps_test_patches_whole(tmp_path):
  base = kimia_archive(tmp_path / "raw")
  ds, b = build("kimia_path24", "path24", tmp_path / "raw", tmp_path / "data")
  assert {k: len(v) for k, v in ds.items()} == {"train": 24, "test": 48}
  meta = metadata(ds)
  assert np.bincount(meta["test"]["label"]).tolist() == [2] * 24 and _disjoint(meta)
  assert b.info.metadata["test_patches"] == 48 and b.info.metadata["protocol"] == "path24"
  i = list(meta["test"]["source_id"]).index("test/s7/1")
  original = np.asarray(PIL.Image.open(base / "RGBPatches-test" / "s7" / "1.jpg"))
  np.testing.assert_array_equal(ds["test"][i]["image"], original)  # the shipped bytes, not re-encoded
  assert ds["test"][i]["original_split"] == b"RGBPatches-test"


def test_kimia_leave_one_out_variant_and_training_scans(tmp_path):
  kimia_archive(tmp_path / "raw", train_per_scan=0)
  training = tmp_path / "raw" / "KIMIAPath24_RGB" / "Training"
  for k in range(3):  # whole scans, 2 windows of 1000 px each, the second whitened (a test region)
    save(training / f"s{k}.jpg", tissue(1000, 2000, seed=k, glass=1000))
  ds, _ = build("kimia_path24", "leave_one_out", tmp_path / "raw", tmp_path / "data", workers=2)
  assert ds["test"][0]["image"].shape == (300, 300, 3)
  meta = metadata(ds)
  assert len(ds["test"]) == 48 and len(set(meta["test"]["source_id"])) == 48  # each patch its own source
  assert sorted(meta["train"]["source_id"]) == ["scan/s0", "scan/s1", "scan/s2"]
  assert {tuple(c) for c in meta["train"]["coords"]} == {(0, 0)}  # the whitened window was dropped


def test_pair_query_patches_and_pairs(tmp_path):
  pair_archive(tmp_path / "raw")
  ds, _ = build("pair_query", "default", tmp_path / "raw", tmp_path / "data")
  meta = metadata(ds)
  assert sorted(meta["train"]["source_id"]) == sorted(PAIR_TRAIN)
  assert sorted(meta["test"]["source_id"]) == sorted(PAIR_TEST)
  assert set(meta["train"]["label"]) == {0} and ds["train"][0]["image"].shape == (24, 24, 3)
  pairs = sources.read_pairs("pair_query", str(tmp_path / "data"))
  assert pairs["query"] == [[PAIR_TEST[0], PAIR_TEST[1]], [PAIR_TEST[2], PAIR_TEST[3]]]
  # "3d4e_5f6a7b8c" holds an underscore itself: the pair key is cut where both halves exist.
  assert pairs["validation"] == [[PAIR_TRAIN[0], PAIR_TRAIN[1], 1], [PAIR_TRAIN[2], PAIR_TRAIN[3], 0]]


def test_pair_query_names_a_query_without_image(tmp_path):
  root = pair_archive(tmp_path / "raw", validation=False)
  (root / "queries.csv").write_text(f"{PAIR_TEST[0]}.png,ffffffffffff.png\n")
  with pytest.raises(common.ManualDirError, match="line 1: ffffffffffff is not an image in test/"):
    build("pair_query", "default", root, tmp_path / "data")


def test_prepare_cli_builds_with_workers_and_prints_summary(tmp_path):
  pair_archive(tmp_path / "raw")
  run = subprocess.run([sys.executable, "-m", "histojax.prepare", "--dataset", "pair_query", "--workers", "2",
                        "--manual_dir", str(tmp_path / "raw"), "--data_dir", str(tmp_path / "data")],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr
  lines = {line.rsplit(None, 2)[0]: line.split()[-2:] for line in run.stdout.splitlines()[2:] if line.strip()}
  assert lines["unlabelled"] == ["5", "4"] and lines["examples"] == ["5", "4"] and lines["images"] == ["5", "4"]
  assert lines["dropped"] == ["0", "0"] and lines["no tiles"] == ["0", "0"] and "MiB" in lines


def test_image_folder_with_and_without_split_folders(tmp_path):
  for c, name in enumerate(("tumour", "adipose")):
    for i in range(5):
      save(tmp_path / "flat" / name / f"{name}{i}.png", tissue(64, 96, seed=10 * c + i, glass=32))
  config = ImageFolderConfig(name="t32", patch_size=32)
  ds, b = build("image_folder", config, tmp_path / "flat", tmp_path / "data")
  assert b.info.features["label"].names == ["adipose", "tumour"]
  meta = metadata(ds)
  assert {k: len(v) for k, v in ds.items()} == {"train": 32, "test": 8}  # 4 + 1 images per class, 4 tiles each
  assert np.bincount(meta["test"]["label"]).tolist() == [4, 4] and _disjoint(meta)

  for split, count in (("train", 3), ("val", 1)):
    for name in ("a", "b"):
      for i in range(count):
        save(tmp_path / "tree" / split / name / f"{i}.jpg", tissue(20, 30, seed=i))
  ds, _ = build("image_folder", "whole", tmp_path / "tree", tmp_path / "data2")
  meta = metadata(ds)
  assert {k: len(v) for k, v in ds.items()} == {"train": 6, "validation": 2}
  assert ds["validation"][0]["original_split"] == b"val" and "val/a/0" in set(meta["validation"]["source_id"])
  assert sources.class_names("image_folder/whole", str(tmp_path / "data2")) == ["a", "b"]
