"""bach from a tiny archive in the official layout, and the behaviour every
archive builder shares: manual_dir errors, corrupt images, interrupted builds,
process-parallel preparation, the prepare CLI."""

import collections
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from histojax.data import sources
from tests.archive_fixtures import BACH_CONFIG, BACH_FILES, bach_archive, build, metadata
from tfds_builders import common
from tfds_builders.bach import bach_dataset_builder as bach
from tfds_builders.bach.bach_dataset_builder import CLASS_NAMES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bach_archive_builds_and_reads_back(tmp_path):
  bach_archive(tmp_path / "raw")
  ds, b = build("bach", BACH_CONFIG, tmp_path / "raw", tmp_path / "data")
  # 5 photos per class split 3/1/1; each 64x96 photo gives 4 tissue tiles and 2 of glass.
  assert {k: len(v) for k, v in ds.items()} == {"train": 48, "validation": 16, "test": 16}
  meta = metadata(ds)
  for split, photos in (("train", 3), ("validation", 1), ("test", 1)):
    assert np.bincount(meta[split]["label"], minlength=4).tolist() == [4 * photos] * 4
    ids = set(meta[split]["source_id"])
    assert len(ids) == 4 * photos
    for source_id, label in zip(meta[split]["source_id"], meta[split]["label"]):
      assert source_id.startswith(BACH_FILES[CLASS_NAMES[label]][0])  # n001 is Normal, iv004 Invasive...
    assert {tuple(c) for c in meta[split]["coords"]} == {(0, 0), (0, 32), (32, 0), (32, 32)}
  splits = [set(m["source_id"]) for m in meta.values()]
  assert not (splits[0] & splits[1] or splits[0] & splits[2] or splits[1] & splits[2])
  # Patient-aware by default: photo numbers 001-003 train, 004 validation, 005 test in every class.
  numbers = {split: {int(sid[-3:]) for sid in m["source_id"]} for split, m in meta.items()}
  assert numbers == {"train": {1, 2, 3}, "validation": {4}, "test": {5}}
  example = ds["test"][0]
  assert example["image"].shape == (32, 32, 3) and example["original_split"] == b"train"
  built = b.info.metadata["splits"]
  assert built["train"] == {"source_images": 12, "tiles_kept": 48, "tiles_dropped": 24, "images_without_tiles": 0,
                            "corrupt_skipped": []}
  assert b.info.features["label"].names == list(CLASS_NAMES)


def test_csv_with_header_and_wrong_folder(tmp_path):
  photos = bach_archive(tmp_path / "raw", per_class=5, header=True)
  ds, _ = build("bach", BACH_CONFIG, tmp_path / "raw", tmp_path / "data")
  assert len(ds["train"]) == 48
  csv = photos / "microscopy_ground_truth.csv"
  csv.write_text(csv.read_text().replace("b002.tif,Benign", "b002.tif,InSitu"))
  with pytest.raises(common.ManualDirError, match=r"Benign/b002.tiff lies in folder Benign but .* labels it InSitu"):
    build("bach", BACH_CONFIG, tmp_path / "raw", tmp_path / "data2")


def test_missing_or_empty_manual_dir_says_what_to_download(tmp_path):
  (tmp_path / "empty").mkdir()
  for manual_dir in (tmp_path / "absent", tmp_path / "empty"):
    with pytest.raises(common.ManualDirError) as e:
      build("bach", BACH_CONFIG, manual_dir, tmp_path / "data")
    message = str(e.value)
    assert "is missing or empty" in message and str(manual_dir) in message
    assert "zenodo.org/records/3632035" in message and "microscopy_ground_truth.csv" in message
  (tmp_path / "wrong" / "stuff").mkdir(parents=True)
  with pytest.raises(common.ManualDirError, match="no microscopy_ground_truth.csv"):
    build("bach", BACH_CONFIG, tmp_path / "wrong", tmp_path / "data")


def _version_dirs(data_dir):
  root = data_dir / "bach" / BACH_CONFIG.name
  return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_corrupt_image_stops_before_anything_is_complete_unless_skipped(tmp_path):
  photos = bach_archive(tmp_path / "raw")
  bad = photos / "Benign" / "b003.tiff"
  bad.write_bytes(bad.read_bytes()[:200])  # truncated, as a broken download is
  with pytest.raises(common.CorruptImageError, match="b003.tiff"):
    build("bach", BACH_CONFIG, tmp_path / "raw", tmp_path / "data")
  assert _version_dirs(tmp_path / "data") == []  # no 1.0.0, no incomplete.* left behind
  assert not tfds.builder("bach", config=BACH_CONFIG, data_dir=str(tmp_path / "data")).is_prepared()

  ds, b = build("bach", BACH_CONFIG, tmp_path / "raw", tmp_path / "data", skip_corrupt=True)
  assert sum(len(v) for v in ds.values()) == 19 * 4
  skipped = [p for s in b.info.metadata["splits"].values() for p in s["corrupt_skipped"]]
  assert skipped == [str(bad)]
  assert "b003" not in {sid for m in metadata(ds).values() for sid in m["source_id"]}


def test_interrupted_build_never_reads_as_prepared(tmp_path, monkeypatch):
  bach_archive(tmp_path / "raw")
  real, calls = common.prepare_source, []

  def interrupted(source, spec, **kwargs):
    calls.append(source)
    if len(calls) == 7:
      raise KeyboardInterrupt  # Ctrl-C halfway through the train split
    return real(source, spec, **kwargs)

  monkeypatch.setattr(common, "prepare_source", interrupted)
  with pytest.raises(KeyboardInterrupt):
    build("bach", BACH_CONFIG, tmp_path / "raw", tmp_path / "data")
  assert _version_dirs(tmp_path / "data") == []
  # A hard kill leaves its incomplete.* folder behind: it must not read as prepared either.
  (tmp_path / "data" / "bach" / BACH_CONFIG.name / "incomplete.X1_1.0.0").mkdir(parents=True)
  assert not tfds.builder("bach", config=BACH_CONFIG, data_dir=str(tmp_path / "data")).is_prepared()
  monkeypatch.setattr(common, "prepare_source", real)
  ds, _ = build("bach", BACH_CONFIG, tmp_path / "raw", tmp_path / "data")
  assert len(ds["train"]) == 48


def test_worker_processes_give_the_same_dataset(tmp_path):
  bach_archive(tmp_path / "raw")
  one, _ = build("bach", BACH_CONFIG, tmp_path / "raw", tmp_path / "serial", workers=0)
  two, _ = build("bach", BACH_CONFIG, tmp_path / "raw", tmp_path / "parallel", workers=2)
  for split in one:
    a, b = one[split], two[split]
    assert len(a) == len(b)
    for i in range(len(a)):
      x, y = a[i], b[i]
      assert x["source_id"] == y["source_id"] and (x["coords"] == y["coords"]).all()
      np.testing.assert_array_equal(x["image"], y["image"])


def test_ordered_map_keeps_order_across_processes():
  assert list(common.ordered_map(abs, [-3, 1, -2, 5, -8, 0, 4], workers=2)) == [3, 1, 2, 5, 8, 0, 4]


def test_stratified_split_is_exact_and_stable():
  labels = {f"c{c}_{i:02d}": c for c in range(3) for i in range(10)}
  fractions = (("train", 0.7), ("validation", 0.1), ("test", 0.2))
  split = common.stratified_split(labels, fractions, seed=0)
  for c in range(3):
    counts = [sum(1 for k, s in split.items() if labels[k] == c and s == name) for name, _ in fractions]
    assert counts == [7, 1, 2]
  assert split == common.stratified_split(dict(reversed(list(labels.items()))), fractions, seed=0)
  assert split != common.stratified_split(labels, fractions, seed=1)
  with pytest.raises(ValueError, match="summing to 1"):
    common.stratified_split(labels, (("train", 0.7), ("test", 0.2)), seed=0)


def _block_of(photos, block_size):
  """(label, block index) of every id, blocks as photo_blocks cuts them."""
  blocks = {}
  for label in {lab for lab, _ in photos.values()}:
    ordered = [sid for _, sid in sorted((n, sid) for sid, (lab, n) in photos.items() if lab == label)]
    blocks.update({sid: (label, i) for i, block in enumerate(common.photo_blocks(ordered, block_size))
                   for sid in block})
  return blocks


@pytest.mark.parametrize("n,block_size,sizes", [(50, 5, [5] * 10), (37, 5, [5] * 5 + [4] * 3), (4, 5, [4]),
                                                (0, 5, []), (7, 1, [1] * 7)])
def test_photo_blocks_are_consecutive_and_near_equal(n, block_size, sizes):
  blocks = common.photo_blocks(list(range(n)), block_size)
  assert [len(b) for b in blocks] == sizes
  assert [x for b in blocks for x in b] == list(range(n))


@pytest.mark.parametrize("per_class,block_size,expected", [
    (50, 5, (35, 5, 10)), (100, 5, (70, 10, 20)), (37, 5, (25, 4, 8)), (50, 7, (32, 6, 12)), (3, 1, (2, 0, 1))])
def test_block_split_keeps_every_block_in_one_split(per_class, block_size, expected):
  fractions = (("train", 0.7), ("validation", 0.1), ("test", 0.2))
  # Ids shuffled and prefixed per class as BACH names them; numbers start at 1.
  photos = {f"{p}{i:03d}": (c, i) for c, p in enumerate(("n", "b", "is", "iv")) for i in range(1, per_class + 1)}
  shuffled = dict(sorted(photos.items(), key=lambda kv: hash(kv[0]) % 97))
  split = common.block_split(shuffled, fractions, block_size)
  assert split == common.block_split(photos, fractions, block_size)  # order of the input does not matter
  assert set(split) == set(photos)
  by_block = {}
  for sid, block in _block_of(photos, block_size).items():
    by_block.setdefault(block, set()).add(split[sid])
  assert all(len(s) == 1 for s in by_block.values()), "a block straddles two splits"
  for c in range(4):
    order = [split[sid] for sid, _ in sorted(((s, n) for s, (lab, n) in photos.items() if lab == c), key=lambda t: t[1])]
    assert tuple(order.count(name) for name, _ in fractions) == expected
    # Contiguous runs in the order given: train numbers < validation numbers < test numbers.
    assert order == sorted(order, key=[name for name, _ in fractions].index)


def test_block_split_errors_name_the_problem():
  fractions = (("train", 0.8), ("test", 0.2))
  with pytest.raises(ValueError, match="block_size"):
    common.block_split({"n001": (0, 1)}, fractions, 0)
  with pytest.raises(ValueError, match="share a number"):
    common.block_split({"n001": (0, 1), "n01": (0, 1)}, fractions, 1)
  with pytest.raises(ValueError, match="summing to 1"):
    common.block_split({"n001": (0, 1)}, (("train", 0.5),), 1)
  assert common.photo_number("is012") == 12
  with pytest.raises(ValueError, match="photo number"):
    common.photo_number("slide_a")


def test_random_per_photo_split_stays_a_named_option(tmp_path):
  import dataclasses
  bach_archive(tmp_path / "raw")
  config = dataclasses.replace(BACH_CONFIG, name="t32_photos", split_scheme="photos")
  ds, b = build("bach", config, tmp_path / "raw", tmp_path / "data")
  meta = metadata(ds)
  labels = {sid: int(lab) for m in meta.values() for sid, lab in zip(m["source_id"], m["label"])}
  expected = common.stratified_split(labels, config.split_fractions, config.split_seed)
  assert all(expected[sid] == split for split, m in meta.items() for sid in m["source_id"])
  assert b.info.metadata["config"]["split_scheme"] == "photos"
  assert "x10_256_photos" in [c.name for c in tfds.builder_cls("bach").BUILDER_CONFIGS]
  with pytest.raises(ValueError, match="split_scheme must be one of"):
    build("bach", dataclasses.replace(BACH_CONFIG, name="t32_bad", split_scheme="patients"), tmp_path / "raw",
          tmp_path / "data")


def _prepare_cli(*args):
  return subprocess.run([sys.executable, "-m", "histojax.prepare", *args], cwd=REPO, capture_output=True,
                        text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_prepare_cli_summary_and_errors(tmp_path):
  photos = bach_archive(tmp_path / "raw")
  (photos / "InSitu" / "is002.jpg").write_bytes(b"not a jpeg")
  run = _prepare_cli("--dataset", "bach", "--config", "x10_256", "--manual_dir", str(tmp_path / "absent"),
                     "--data_dir", str(tmp_path / "data"))
  assert run.returncode == 1 and "is missing or empty" in run.stderr and "Traceback" not in run.stderr
  run = _prepare_cli("--dataset", "bach", "--manual_dir", str(tmp_path / "raw"), "--data_dir", str(tmp_path / "data"))
  assert run.returncode == 1 and "is002.jpg" in run.stderr and "--skip_corrupt" in run.stderr
  # 64x96 photos are smaller than one 224 px tile: each counts as one dropped tile, so
  # the default config would build nothing; the pair task shows a real summary instead.
  run = _prepare_cli("--dataset", "bach", "--skip_corrupt", "--workers", "2", "--manual_dir", str(tmp_path / "raw"),
                     "--data_dir", str(tmp_path / "data"))
  assert run.returncode == 1 and "has no examples" in run.stderr and "Traceback" not in run.stderr
  assert not sources.builder("bach", str(tmp_path / "data")).is_prepared()


# eva's and THUNDER's BACH splits. Index = class * 100 + number - 1, classes alphabetical.
EVA_PER_CLASS = {"train": {"Benign": 52, "InSitu": 70, "Invasive": 69, "Normal": 77},
                 "validation": {"Benign": 48, "InSitu": 30, "Invasive": 31, "Normal": 23}}


def _all_400(scheme):
  return {(c, n): bach.published_split(scheme, c, n) for c in bach.PUBLISHED_CLASS_ORDER for n in range(1, 101)}


def test_published_splits_of_the_400_photos():
  eva, thunder = _all_400("eva"), _all_400("thunder")
  assert collections.Counter(eva.values()) == {"train": 268, "validation": 132}
  assert collections.Counter(thunder.values()) == {"train": 218, "validation": 50, "test": 132}
  # Per class by hand from eva's ranges: Benign 0-40, 59, 90-99 train; 41-58, 60-89 validation ...
  for split, per_class in EVA_PER_CLASS.items():
    assert collections.Counter(c for (c, _), s in eva.items() if s == split) == per_class
  # THUNDER cut eva's train into its train and validation, and tests on eva's validation.
  assert {p for p, s in thunder.items() if s != "test"} == {p for p, s in eva.items() if s == "train"}
  assert {p for p, s in thunder.items() if s == "test"} == {p for p, s in eva.items() if s == "validation"}
  for ranges in bach.PUBLISHED_SPLITS.values():  # each scheme's ranges tile 0-399 once
    covered = sorted(i for spans in ranges.values() for a, b in spans for i in range(a, b))
    assert covered == list(range(400))
  with pytest.raises(ValueError, match="outside 1-100"):
    bach.published_split("eva", "Normal", 101)


# Our 200 development photos are numbers 001-050 of each class; by hand from the ranges:
DEV_EVA = {"Benign": ((1, 41), (42, 50)), "InSitu": ((1, 39), (40, 50)), "Invasive": ((1, 40), (41, 50)),
           "Normal": ((1, 45), (46, 50))}  # (train, validation), inclusive
DEV_THUNDER = {"Benign": {"train": [(1, 15), (26, 41)], "validation": [(16, 25)], "test": [(42, 50)]},
               "InSitu": {"train": [(1, 10), (21, 39)], "validation": [(11, 20)], "test": [(40, 50)]},
               "Invasive": {"train": [(11, 40)], "validation": [(1, 10)], "test": [(41, 50)]},
               "Normal": {"train": [(1, 5), (16, 45)], "validation": [(6, 15)], "test": [(46, 50)]}}


def dev_split(scheme: str, class_name: str, number: int) -> str:
  if scheme == "eva":
    train, _ = DEV_EVA[class_name]
    return "train" if train[0] <= number <= train[1] else "validation"
  return next(s for s, spans in DEV_THUNDER[class_name].items() if any(a <= number <= b for a, b in spans))


def test_published_splits_of_the_development_photos():
  for scheme, counts in (("eva", {"train": 165, "validation": 35}),
                         ("thunder", {"train": 125, "validation": 40, "test": 35})):
    ours = {(c, n): bach.published_split(scheme, c, n) for c in CLASS_NAMES for n in range(1, 51)}
    assert ours == {(c, n): dev_split(scheme, c, n) for c in CLASS_NAMES for n in range(1, 51)}
    assert collections.Counter(ours.values()) == counts


def test_whole_photos_in_thunders_split(tmp_path):
  numbers = (1, 10, 11, 16, 26, 42, 100)
  bach_archive(tmp_path / "raw", numbers=numbers)
  config = bach.BachConfig(name="t_whole", patch_size=0, image_size=(12, 16), split_scheme="thunder")
  ds, b = build("bach", config, tmp_path / "raw", tmp_path / "data")
  meta = metadata(ds)
  for split, m in meta.items():
    for source_id, label in zip(m["source_id"], m["label"]):
      assert bach.published_split("thunder", CLASS_NAMES[label], int(source_id[-3:])) == split
  assert sum(len(m["label"]) for m in meta.values()) == 4 * len(numbers)  # one example per photo
  assert ds["test"][0]["image"].shape == (12, 16, 3)
  assert b.info.metadata["config"]["split_scheme"] == "thunder"
  # Photo 101 is in neither benchmark's listing: the build names it instead of guessing.
  bach_archive(tmp_path / "raw101", numbers=(5, 101))
  with pytest.raises(common.ManualDirError, match=r"photo number 101 is outside 1-100: .*split_scheme 'thunder'"):
    build("bach", config, tmp_path / "raw101", tmp_path / "data101")
