"""bach built from the 200 real BACH photos in $HISTOJAX_BACH_DIR (CI sets it; without
it this is skipped and says why).

Uses the registered `x10_256` variant (10x, 256 px tiles): every photo is
read, resized and filtered, with few enough tiles to stay quick. Checks the
patient-aware split: whole blocks of neighbouring photo numbers per split.
"""

import collections
import csv
import json
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from histojax.data import augment, sources
from tests.conftest import BACH, NO_BACH
from tfds_builders import common
from tfds_builders.bach.bach_dataset_builder import CLASS_NAMES

@pytest.mark.skipif(BACH is None, reason=NO_BACH)
def test_bach_from_the_real_photos(tmp_path):
  start = time.perf_counter()
  b = tfds.builder("bach/x10_256", data_dir=str(tmp_path), file_format="array_record", workers=2)
  b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(BACH)))
  seconds = time.perf_counter() - start
  ds = tfds.data_source("bach/x10_256", data_dir=str(tmp_path))
  meta = {split: sources.read_metadata(s) for split, s in ds.items()}
  built = b.info.metadata["splits"]

  # 50 photos per class in blocks of 5 consecutive numbers, 7/1/2 blocks: 001-035 train,
  # 036-040 validation, 041-050 test in every class, so test holds patients train has not
  # seen. A photo whose every tile is background (fat, lumen) has no examples but still counts.
  with open(BACH / "ICIAR2018_BACH_Challenge" / "Photos" / "microscopy_ground_truth.csv") as f:
    labels = {row[0].rsplit(".", 1)[0]: CLASS_NAMES.index(row[1]) for row in csv.reader(f) if row[1] in CLASS_NAMES}
  cfg = b.builder_config
  assert cfg.split_scheme == "blocks" and b.info.metadata["config"]["block_size"] == 5
  ranges = {"train": range(1, 36), "validation": range(36, 41), "test": range(41, 51)}
  assigned = {p: next(s for s, r in ranges.items() if int(p[-3:]) in r) for p in labels}
  assert assigned == common.block_split({p: (lab, int(p[-3:])) for p, lab in labels.items()},
                                        cfg.split_fractions, cfg.block_size)
  photos = {split: collections.Counter(CLASS_NAMES[labels[p]] for p, s in assigned.items() if s == split)
            for split in meta}
  assert photos == {"train": dict.fromkeys(CLASS_NAMES, 35), "validation": dict.fromkeys(CLASS_NAMES, 5),
                    "test": dict.fromkeys(CLASS_NAMES, 10)}
  for split, m in meta.items():
    assert all(assigned[p] == split for p in m["source_id"])
    assert built[split]["source_images"] == sum(photos[split].values())
    assert built[split]["images_without_tiles"] == built[split]["source_images"] - len(set(m["source_id"]))
  # No block of 5 neighbouring numbers (one patient, mostly) has photos in two splits.
  for prefix in ("n", "b", "is", "iv"):
    for start in range(1, 51, 5):
      block = {assigned[f"{prefix}{i:03d}"] for i in range(start, start + 5)}
      assert len(block) == 1, f"{prefix}{start:03d}-{start + 4:03d} straddles {block}"
  ids = [set(m["source_id"]) for m in meta.values()]
  assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
  # 2048x1536 at 0.5 is 1024x768: 4x3 tiles of 256 per photo, each either kept or dropped.
  for split, m in meta.items():
    assert built[split]["tiles_kept"] == len(m["label"])
    assert built[split]["tiles_kept"] + built[split]["tiles_dropped"] == 12 * built[split]["source_images"]
    assert built[split]["corrupt_skipped"] == []
  assert ds["train"][0]["image"].shape == (256, 256, 3)
  assert np.isin(np.concatenate([m["coords"] for m in meta.values()]), [0, 256, 512, 768]).all()

  report = {split: {"examples": len(m["label"]), "photos": built[split]["source_images"],
                    "photos_without_tiles": built[split]["images_without_tiles"],
                    "tiles_dropped": built[split]["tiles_dropped"], "bytes": b.info.splits[split].num_bytes,
                    "per_class": {c: int(n) for c, n in zip(CLASS_NAMES, np.bincount(m["label"], minlength=4))}}
            for split, m in meta.items()}
  print(f"\nbach/x10_256 from {BACH}: {seconds:.1f} s\n{json.dumps(report, indent=1)}")


# Photos at the edges of THUNDER's ranges among ours (001-050 of each class), with the split
# each must land in by hand from its published ranges (index = class * 100 + number - 1,
# classes alphabetical): Benign 001-015 train, 016-025 validation, 026-041 train, 042- test ...
THUNDER_EDGES = {"b015": "train", "b016": "validation", "b025": "validation", "b026": "train", "b041": "train",
                 "b042": "test", "is010": "train", "is011": "validation", "is020": "validation", "is021": "train",
                 "is039": "train", "is040": "test", "iv010": "validation", "iv011": "train", "iv040": "train",
                 "iv041": "test", "n005": "train", "n006": "validation", "n015": "validation", "n016": "train",
                 "n045": "train", "n046": "test"}


@pytest.mark.skipif(BACH is None, reason=NO_BACH)
def test_whole_photos_in_thunders_split_from_real_photos(tmp_path):
  """bach/whole_224_thunder, the registered config, on 22 real photos at the edges of the ranges."""
  photos = BACH / "ICIAR2018_BACH_Challenge" / "Photos"
  with open(photos / "microscopy_ground_truth.csv") as f:
    rows = [row for row in csv.reader(f) if row and row[0].rsplit(".", 1)[0] in THUNDER_EDGES]
  subset = tmp_path / "raw" / "ICIAR2018_BACH_Challenge" / "Photos"
  for name, label in rows:
    (subset / label).mkdir(parents=True, exist_ok=True)
    for path in (photos / label).glob(name.rsplit(".", 1)[0] + ".*"):
      (subset / label / path.name).symlink_to(path)
  (subset / "microscopy_ground_truth.csv").write_text("".join(f"{n},{lab}\n" for n, lab in rows))
  assert len(rows) == len(THUNDER_EDGES)
  b = tfds.builder("bach/whole_224_thunder", data_dir=str(tmp_path / "data"), file_format="array_record", workers=2)
  b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / "raw")))
  ds = tfds.data_source("bach/whole_224_thunder", data_dir=str(tmp_path / "data"))
  meta = {split: sources.read_metadata(s) for split, s in ds.items()}
  assert {sid: split for split, m in meta.items() for sid in m["source_id"]} == THUNDER_EDGES
  # torchvision's Resize(224) of a 2048x1536 photo is 224x298 (short side 224, long int(2048 * 224 / 1536));
  # the export's centre crop then takes columns 37-260, as CenterCrop(224) does (round((298 - 224) / 2)).
  photo = ds["test"][0]["image"]
  assert photo.shape == (224, 298, 3) and b.info.metadata["config"]["split_scheme"] == "thunder"
  assert np.array_equal(augment.center_crop(photo, 224), photo[:, 37:261])
