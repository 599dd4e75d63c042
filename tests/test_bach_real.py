"""bach built from the 200 real BACH photos in ../shared/data/bach (beside the
repository: CI has it, a fresh clone does not, and then this is skipped).

Uses the registered `x10_256` variant (10x, 256 px tiles): every photo is
read, resized and filtered, with few enough tiles to stay quick.
"""

import collections
import csv
import json
import pathlib
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from histojax.data import sources
from tfds_builders import common
from tfds_builders.bach.bach_dataset_builder import CLASS_NAMES

BACH = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "bach"


@pytest.mark.skipif(not BACH.is_dir(), reason=f"real BACH photos not found at {BACH} (only CI and the "
                    "project's machines have them)")
def test_bach_from_the_real_photos(tmp_path):
  start = time.perf_counter()
  b = tfds.builder("bach/x10_256", data_dir=str(tmp_path), file_format="array_record", workers=2)
  b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(BACH)))
  seconds = time.perf_counter() - start
  ds = tfds.data_source("bach/x10_256", data_dir=str(tmp_path))
  meta = {split: sources.read_metadata(s) for split, s in ds.items()}
  built = b.info.metadata["splits"]

  # 50 photos per class, split 70/10/20 per photo: 35/5/10 of each class. A photo
  # whose every tile is background (fat, lumen) has no examples but still counts.
  with open(BACH / "ICIAR2018_BACH_Challenge" / "Photos" / "microscopy_ground_truth.csv") as f:
    labels = {row[0].rsplit(".", 1)[0]: CLASS_NAMES.index(row[1]) for row in csv.reader(f) if row[1] in CLASS_NAMES}
  assigned = common.stratified_split(labels, b.builder_config.split_fractions, b.builder_config.split_seed)
  photos = {split: collections.Counter(CLASS_NAMES[labels[p]] for p, s in assigned.items() if s == split)
            for split in meta}
  assert photos == {"train": dict.fromkeys(CLASS_NAMES, 35), "validation": dict.fromkeys(CLASS_NAMES, 5),
                    "test": dict.fromkeys(CLASS_NAMES, 10)}
  for split, m in meta.items():
    assert all(assigned[p] == split for p in m["source_id"])
    assert built[split]["source_images"] == sum(photos[split].values())
    assert built[split]["images_without_tiles"] == built[split]["source_images"] - len(set(m["source_id"]))
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
