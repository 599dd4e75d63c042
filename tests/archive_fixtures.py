"""Tiny archives in each dataset's real layout, written with PIL into tmp dirs.

Images are H&E-pink noise (HSV saturation ~0.45) with an optional band of white
glass (saturation ~0.02) on the right, so the tissue filter's answer is known:
with 32 px tiles, a glass band of 32 px drops exactly one column of tiles.
"""

from __future__ import annotations

import pathlib

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from histojax.data import sources
from tfds_builders.bach.bach_dataset_builder import BachConfig
from tfds_builders.bracs.bracs_dataset_builder import BracsConfig, SUBTYPES
from tfds_builders.crc.crc_dataset_builder import CrcConfig


def tissue(h: int, w: int, seed: int, glass: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  image = np.clip(np.array([200, 110, 170]) + rng.integers(-20, 21, (h, w, 3)), 0, 255).astype(np.uint8)
  if glass:
    image[:, w - glass:] = 245 + rng.integers(-3, 4, (h, glass, 1)).astype(np.uint8)
  return image


def save(path: pathlib.Path, array: np.ndarray) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  fmt = {".tif": "TIFF", ".tiff": "TIFF", ".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}[path.suffix]
  PIL.Image.fromarray(array).save(path, format=fmt, **({"quality": 98} if fmt == "JPEG" else {}))
  return path


def build(name: str, config, manual_dir, data_dir, beam_options=None, **builder_kwargs):
  """Builds `name` with `config` (object or registered name); returns (data_source dict, builder).

  With `beam_options` (PipelineOptions) the images are prepared by the Beam route."""
  builder_kwargs.setdefault("workers", 0)
  b = tfds.builder(name, config=config, data_dir=str(data_dir), file_format="array_record", **builder_kwargs)
  b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir),
                                                                      beam_options=beam_options))
  config_name = config if isinstance(config, str) else config.name
  return tfds.data_source(f"{name}/{config_name}", data_dir=str(data_dir)), b


def metadata(data_source) -> dict[str, dict[str, np.ndarray]]:
  return {split: sources.read_metadata(ds) for split, ds in data_source.items()}


# --------------------------------------------------------------------------- bach

BACH_FILES = {"Normal": ("n", ".tif"), "Benign": ("b", ".tiff"), "InSitu": ("is", ".jpg"), "Invasive": ("iv", ".png")}
# 5 photos per class in blocks of 1 photo: 001-003 train, 004 validation, 005 test.
BACH_CONFIG = BachConfig(name="t32", patch_size=32, tissue_threshold=0.1, block_size=1,
                         split_fractions=(("train", 0.6), ("validation", 0.2), ("test", 0.2)))


def bach_archive(root: pathlib.Path, per_class: int = 5, header: bool = False, numbers=None) -> pathlib.Path:
  """ICIAR2018_BACH_Challenge/Photos/<Class>/<id>.<ext> + microscopy_ground_truth.csv.

  The CSV names every photo `.tif`, as the official file does, whatever the
  extension on disk. Photos are 64x96 with 32 px of glass: 4 tissue tiles, 2 glass.
  Photo numbers 1..per_class in every class, or `numbers`.
  """
  photos = root / "ICIAR2018_BACH_Challenge" / "Photos"
  rows = ["filename,label"] if header else []
  for c, (class_name, (prefix, ext)) in enumerate(BACH_FILES.items()):
    for i in numbers or range(1, per_class + 1):
      save(photos / class_name / f"{prefix}{i:03d}{ext}", tissue(64, 96, seed=100 * c + i, glass=32))
      rows.append(f"{prefix}{i:03d}.tif,{class_name}")
  (photos / "microscopy_ground_truth.csv").write_text("\n".join(rows) + "\n")
  return photos


# --------------------------------------------------------------------------- bracs

BRACS_CONFIG = BracsConfig(name="t32", patch_size=32, tissue_threshold=0.1)


def bracs_archive(root: pathlib.Path, folders=None, release: str = "latest_version") -> pathlib.Path:
  """BRACS_RoI/<release>/{train,val,test}/<k>_<LABEL>/BRACS_<wsi>_<LABEL>_<n>.png,
  one RoI per class and split, of varying size (64x64 or 64x96: 4 or 6 tiles)."""
  folders = folders or [f"{k}_{s}" for k, s in enumerate(SUBTYPES)]
  base = root / "BRACS_RoI" / release
  for s, split in enumerate(("train", "val", "test")):
    for k, folder in enumerate(folders):
      label = folder.split("_", 1)[1]
      w = 96 if k % 2 else 64
      save(base / split / folder / f"BRACS_{1000 + 10 * s + k}_{label}_{s + 1}.png", tissue(64, w, seed=10 * s + k))
  return base


# --------------------------------------------------------------------------- crc

CRC_CONFIG = CrcConfig(name="t32", patch_size=32)
CRC_GRADES = ("1_normal", "2_low_grade", "3_high_grade")


def crc_archive(root: pathlib.Path, folds: bool = True, per_grade: int = 2) -> pathlib.Path:
  """<archive>/fold_<k>/{1_normal,2_low_grade,3_high_grade}/<image>.png, or, without
  folds, <archive>/{Normal,Low Grade,High Grade}/<image>.png. Images 64x96 with glass: 4 tiles kept."""
  base = root / "CRC_Dataset"
  grades = CRC_GRADES if folds else ("Normal", "Low Grade", "High Grade")
  for fold in (1, 2, 3) if folds else (None,):
    for g, grade in enumerate(grades):
      for i in range(per_grade):
        folder = base / f"fold_{fold}" / grade if folds else base / grade
        save(folder / f"H{fold or 0}{g}{i}-{i:04d}.png", tissue(64, 96, seed=100 * (fold or 0) + 10 * g + i, glass=32))
  return base


# --------------------------------------------------------------------------- kimia_path24


def kimia_archive(root: pathlib.Path, test_per_scan: int = 2, train_per_scan: int = 1) -> pathlib.Path:
  """KIMIAPath24_RGB/{RGBPatches-test,Training}/s<k>/<n>.jpg, 40x40 patches."""
  base = root / "KIMIAPath24_RGB"
  for k in range(24):
    for n in range(test_per_scan):
      save(base / "RGBPatches-test" / f"s{k}" / f"{n}.jpg", tissue(40, 40, seed=1000 + 10 * k + n))
    for n in range(train_per_scan):
      save(base / "Training" / f"s{k}" / f"{n}.jpg", tissue(40, 40, seed=2000 + 10 * k + n))
  return base


# --------------------------------------------------------------------------- pair_query

PAIR_TRAIN = ("0a1b2c3d4e5f", "1b2c3d4e5f6a", "2c3d4e5f6a7b", "3d4e_5f6a7b8c", "4e5f6a7b8c9d")
PAIR_TEST = ("a0b1c2d3e4f5", "b1c2d3e4f5a6", "c2d3e4f5a6b7", "d3e4f5a6b7c8")


def pair_archive(root: pathlib.Path, validation: bool = True) -> pathlib.Path:
  """train/<id>.png, test/<id>.png, queries.csv (no header), validation_ground_truth.csv."""
  for i, name in enumerate(PAIR_TRAIN):
    save(root / "train" / f"{name}.png", tissue(24, 24, seed=i))
  for i, name in enumerate(PAIR_TEST):
    save(root / "test" / f"{name}.png", tissue(24, 24, seed=50 + i))
  (root / "queries.csv").write_text(f"{PAIR_TEST[0]}.png,{PAIR_TEST[1]}.png\n{PAIR_TEST[2]}.png,{PAIR_TEST[3]}.png\n")
  if validation:
    (root / "validation_ground_truth.csv").write_text(
        f"query,prediction\n{PAIR_TRAIN[0]}_{PAIR_TRAIN[1]},1\n{PAIR_TRAIN[2]}_{PAIR_TRAIN[3]},0\n")
  return root
