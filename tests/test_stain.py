"""Stain normalisation (Macenko, Reinhard): one stain for every image, the same in the builder and the query path."""

import dataclasses

import numpy as np
import pytest
from etils import epath

from histojax.data import stain
from tests.archive_fixtures import BACH_CONFIG, bach_archive, build, metadata
from tfds_builders import source_images

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


@pytest.mark.parametrize("method", stain.METHODS)
def test_two_stainings_of_one_tissue_come_out_alike(method):
  hema, eosin = _concentrations(0)
  bluish = _stained(hema, eosin, H_OD * [1.2, 1.0, 0.8], E_OD * [0.8, 1.0, 1.0], 1.3)
  pinkish = _stained(hema, eosin, H_OD * [0.8, 1.0, 1.2], E_OD * [1.2, 0.9, 1.0], 0.8)
  spec = stain.spec(method)
  before = np.abs(bluish.astype(float) - pinkish).mean()
  a, b = stain.normalize(bluish, spec), stain.normalize(pinkish, spec)
  after = np.abs(a.astype(float) - b).mean()
  assert a.dtype == np.uint8 and a.shape == bluish.shape
  # Reinhard matches global statistics only, not stain vectors: a little less close.
  assert after < (0.4 if method == "macenko" else 0.5) * before, (before, after)
  # Nuclei stay darker than stroma: the structure is kept, only the colour moves.
  nuclei = hema > 0.5
  assert a[nuclei].mean() < a[~nuclei].mean() - 20


def test_reinhard_moves_the_stained_pixels_statistics_to_the_reference_and_ignores_glass():
  hema, eosin = _concentrations(2, size=128)
  image = _stained(hema, eosin, H_OD * [1.1, 0.9, 1.0], E_OD, 1.2)
  with_glass = image.copy()
  with_glass[:, 64:] = 238  # half the field is glass: it must not move the tissue's statistics
  spec = stain.spec("reinhard")
  out = stain.normalize(image, spec)
  tissue = stain.stained_pixels(image, spec)
  assert tissue.mean() == 1.0 and not stain.stained_pixels(with_glass, spec).reshape(128, 128)[:, 64:].any()
  _, mean_before, std_before = stain.lab_statistics(image, tissue)
  _, mean, std = stain.lab_statistics(out, tissue)
  assert np.abs(mean_before - spec["lab_mean"]).max() > 20  # a* 49 against 24: far off to begin with
  np.testing.assert_allclose(mean, spec["lab_mean"], atol=1.5)
  # The spread moves towards the reference; colours pushed out of the sRGB gamut are clipped,
  # so it does not land exactly.
  assert (np.abs(std - spec["lab_std"]) < 0.6 * np.abs(std_before - spec["lab_std"])).all(), (std_before, std)
  # The same tissue alone and beside as much glass comes out the same.
  alone = stain.normalize(np.ascontiguousarray(image[:, :64]), spec)
  np.testing.assert_allclose(stain.normalize(with_glass, spec)[:, :64].astype(float), alone.astype(float), atol=1)


def test_spec_identity_and_errors():
  image = _stained(*_concentrations(1), H_OD, E_OD)
  assert stain.spec(None) is None and stain.normalize(image, None) is image
  spec = stain.spec("macenko")
  assert spec["stain_matrix"] == [list(r) for r in stain.MACENKO_REFERENCE]  # the numbers travel in the record
  glass = np.full((64, 64, 3), 242, np.uint8)
  assert stain.normalize(glass, spec) is glass  # no stain to estimate
  assert stain.normalize(glass, stain.spec("reinhard")) is glass
  with pytest.raises(ValueError, match="stain must be one of"):
    stain.spec("vahadane")
  with pytest.raises(ValueError, match="uint8 HxWx3"):
    stain.normalize(image.astype(np.float32), spec)
  with pytest.raises(ValueError, match="unknown stain normalisation"):
    stain.normalize(image, {"method": "vahadane"})


@pytest.mark.parametrize("method", stain.METHODS)
def test_builder_tiles_are_the_normalised_photo_tiled(tmp_path, method):
  photos = bach_archive(tmp_path / "raw")
  config = dataclasses.replace(BACH_CONFIG, name=f"t32_{method}", stain=method)
  ds, b = build("bach", config, tmp_path / "raw", tmp_path / "data")
  assert b.info.metadata["config"]["stain"] == method
  source = next(s for s in b._sources(epath.Path(tmp_path / "raw")) if s.source_id == "n001")  # noqa: SLF001
  spec = config.image_spec()
  expected = source_images.prepare_source(source, spec)
  whole = stain.normalize(source_images.read_rgb(source.path), stain.spec(method))
  meta = metadata(ds)["train"]
  rows = [i for i, sid in enumerate(meta["source_id"]) if sid == "n001"]
  assert len(rows) == len(expected.examples) == 4
  for i in rows:
    y, x = meta["coords"][i]
    np.testing.assert_array_equal(ds["train"][i]["image"], whole[y:y + 32, x:x + 32])
  plain = source_images.prepare_source(source, BACH_CONFIG.image_spec())
  assert plain.examples[0][1]["image"] != expected.examples[0][1]["image"]
  with pytest.raises(ValueError, match="stain must be one of"):
    dataclasses.replace(BACH_CONFIG, stain="vahadane").image_spec()
  del photos
