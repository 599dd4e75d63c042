"""Macenko stain normalisation: one stain for every image, the same in the builder and the query path."""

import dataclasses

import numpy as np
import pytest
from etils import epath

from histojax.data import stain
from tests.archive_fixtures import BACH_CONFIG, bach_archive, build, metadata
from tfds_builders import common

# Ruifrok-Johnston optical densities of haematoxylin and eosin (rows), per RGB channel.
H_OD, E_OD = np.array([0.65, 0.70, 0.29]), np.array([0.07, 0.99, 0.11])


def _stained(hema: np.ndarray, eosin: np.ndarray, h_vec, e_vec, strength: float = 1.0) -> np.ndarray:
  """An H&E image from concentration maps and stain vectors (Beer-Lambert, 240 white as in Macenko)."""
  od = strength * (hema[..., None] * np.asarray(h_vec) + eosin[..., None] * np.asarray(e_vec))
  return np.clip(240 * np.exp(-od), 0, 255).astype(np.uint8)


def _concentrations(seed: int, size: int = 96):
  rng = np.random.default_rng(seed)
  hema = np.zeros((size, size))
  for _ in range(30):  # nuclei
    y, x = rng.integers(0, size, 2)
    yy, xx = np.ogrid[:size, :size]
    hema[(yy - y) ** 2 + (xx - x) ** 2 < 16] = rng.uniform(0.8, 1.2)
  eosin = 0.4 + 0.2 * rng.random((size, size))  # stroma everywhere
  return hema, eosin


def test_two_stainings_of_one_tissue_come_out_alike():
  hema, eosin = _concentrations(0)
  bluish = _stained(hema, eosin, H_OD * [1.2, 1.0, 0.8], E_OD * [0.8, 1.0, 1.0], 1.3)
  pinkish = _stained(hema, eosin, H_OD * [0.8, 1.0, 1.2], E_OD * [1.2, 0.9, 1.0], 0.8)
  spec = stain.spec("macenko")
  before = np.abs(bluish.astype(float) - pinkish).mean()
  a, b = stain.normalize(bluish, spec), stain.normalize(pinkish, spec)
  after = np.abs(a.astype(float) - b).mean()
  assert a.dtype == np.uint8 and a.shape == bluish.shape
  assert after < 0.4 * before, (before, after)
  # Nuclei stay darker than stroma: the structure is kept, only the colour moves.
  nuclei = hema > 0.5
  assert a[nuclei].mean() < a[~nuclei].mean() - 20


def test_spec_identity_and_errors():
  image = _stained(*_concentrations(1), H_OD, E_OD)
  assert stain.spec(None) is None and stain.normalize(image, None) is image
  spec = stain.spec("macenko")
  assert spec["stain_matrix"] == [list(r) for r in stain.MACENKO_REFERENCE]  # the numbers travel in the record
  glass = np.full((64, 64, 3), 242, np.uint8)
  assert stain.normalize(glass, spec) is glass  # no stain to estimate
  with pytest.raises(ValueError, match="stain must be one of"):
    stain.spec("reinhard")
  with pytest.raises(ValueError, match="uint8 HxWx3"):
    stain.normalize(image.astype(np.float32), spec)
  with pytest.raises(ValueError, match="unknown stain normalisation"):
    stain.normalize(image, {"method": "vahadane"})


def test_builder_tiles_are_the_normalised_photo_tiled(tmp_path):
  photos = bach_archive(tmp_path / "raw")
  config = dataclasses.replace(BACH_CONFIG, name="t32_macenko", stain="macenko")
  ds, b = build("bach", config, tmp_path / "raw", tmp_path / "data")
  assert b.info.metadata["config"]["stain"] == "macenko"
  source = next(s for s in b._sources(epath.Path(tmp_path / "raw")) if s.source_id == "n001")  # noqa: SLF001
  spec = config.image_spec()
  expected = common.prepare_source(source, spec)
  whole = stain.normalize(common.read_rgb(source.path), stain.spec("macenko"))
  meta = metadata(ds)["train"]
  rows = [i for i, sid in enumerate(meta["source_id"]) if sid == "n001"]
  assert len(rows) == len(expected.examples) == 4
  for i in rows:
    y, x = meta["coords"][i]
    np.testing.assert_array_equal(ds["train"][i]["image"], whole[y:y + 32, x:x + 32])
  plain = common.prepare_source(source, BACH_CONFIG.image_spec())
  assert plain.examples[0][1]["image"] != expected.examples[0][1]["image"]
  with pytest.raises(ValueError, match="stain must be one of"):
    dataclasses.replace(BACH_CONFIG, stain="reinhard").image_spec()
  del photos
