"""histojax.slides on slides made from the real BACH photos ($HISTOJAX_BACH_DIR; skipped without it).

The fixture writes, once per session, four generic-tiff slides (Benign and
Invasive, photos 001-004, two photos a slide, resized by 0.5: 0.84 um/px) with
pen strokes under the photos, and one Aperio-style slide.
"""

from __future__ import annotations

import csv

import numpy as np
import openslide
import pytest

from histojax import slides
from histojax.data import tiling
from histojax.slides import tiff
from tests import slide_fixtures
from tests.conftest import BACH, NO_BACH

pytestmark = pytest.mark.skipif(BACH is None, reason=NO_BACH)
SCALE = 0.5
MPP = slide_fixtures.BACH_MPP / SCALE


@pytest.fixture(scope="module")
def fixture_slides(tmp_path_factory):
  out = tmp_path_factory.mktemp("bach_slides")
  made = slide_fixtures.bach_slides(BACH, out, per_slide=2, block_size=4, scale=SCALE,
                                    classes=("Benign", "Invasive"), numbers=range(1, 5), pen=True)
  return out, made


@pytest.fixture(scope="module")
def aperio_slide(tmp_path_factory):
  out = tmp_path_factory.mktemp("bach_aperio")
  return slide_fixtures.bach_slides(BACH, out, per_slide=2, scale=SCALE, classes=("InSitu",), numbers=(1, 2),
                                    aperio=True)[0]


def _photo_box(made, x: int, y: int):
  return next(((bx, by, bw, bh), i) for i, (bx, by, bw, bh) in enumerate(made.boxes)
              if bx <= x < bx + bw and by <= y < by + bh)


def test_fixture_slides_open_as_generic_tiff_at_the_photos_resolution(fixture_slides):
  _, made = fixture_slides
  assert [s.slide_id for s in made] == ["benign_001-002", "benign_003-004", "invasive_001-002", "invasive_003-004"]
  for fixture in made:
    with slides.open_slide(fixture.path) as slide:
      assert slide.vendor == "generic-tiff" and slide.mpp_source == "openslide"
      assert slide.mpp == pytest.approx((MPP, MPP))
      assert slide.level_downsamples == pytest.approx((1, 4, 16), rel=0.01)
    facts = tiff.tiff_facts(fixture.path, 256, 400_000)  # the fallback reads the same resolution from the tags
    assert facts.unit == "centimeter" and facts.mpp == pytest.approx((MPP, MPP))


def test_aperio_variant_takes_its_mpp_from_the_description(aperio_slide):
  with slides.open_slide(aperio_slide.path) as slide:
    assert slide.vendor == "aperio" and slide.mpp == pytest.approx((MPP, MPP))
    assert slide.properties["aperio.MPP"] == str(MPP) and len(slide.level_dimensions) == 3
  assert tiff.tiff_facts(aperio_slide.path, 256, 400_000).mpp is None  # no resolution tags: from the description
  with openslide.OpenSlide(aperio_slide.path) as handle:
    assert "thumbnail" in handle.associated_images


def test_slides_csv_names_cases_labels_and_splits(fixture_slides):
  out, made = fixture_slides
  with open(out / "slides.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["slide_id"] for r in rows] == [s.slide_id for s in made]
  assert {r["case_id"] for r in rows} == {"benign_001-004", "invasive_001-004"}
  for case in {r["case_id"] for r in rows}:  # a case's slides share its label and split
    assert len({(r["label"], r["split"]) for r in rows if r["case_id"] == case}) == 1
  assert made[0].photos == ("b001", "b002") and made[3].photos == ("iv003", "iv004")


def test_tissue_mask_covers_the_photos_and_not_the_glass_or_the_pens(fixture_slides):
  for made in fixture_slides[1]:
    with slides.open_slide(made.path) as slide:
      mask = slides.tissue_mask(slide)
    sx, sy = mask.scale
    inside = np.zeros_like(mask.mask)
    outside = np.ones_like(mask.mask)
    for x, y, w, h in made.boxes:
      inside[int(y / sy) + 2:int((y + h) / sy) - 2, int(x / sx) + 2:int((x + w) / sx) - 2] = True
      outside[int(y / sy) - 2:int((y + h) / sy) + 2, int(x / sx) - 2:int((x + w) / sx) + 2] = False
    assert mask.mask[inside].mean() > 0.9, made.slide_id  # measured 0.997-1.0 (small lumens filled)
    assert mask.mask[outside].mean() < 0.005, made.slide_id
    for x, y, w, h in made.pens:  # blue, green and black strokes on the glass
      box = (slice(int(y / sy), int((y + h) / sy) + 1), slice(int(x / sx), int((x + w) / sx) + 1))
      assert not mask.mask[box].any() and mask.ink[box].mean() > 0.1, made.slide_id


def test_patches_are_the_photos_pixels_at_their_level0_coordinates(fixture_slides):
  made = fixture_slides[1][0]
  photos = [slide_fixtures._photo(p, SCALE) for p in _photo_paths(made)]  # noqa: SLF001  (as the fixture resized them)
  with slides.open_slide(made.path) as slide:
    grid = slides.patch_grid(slide, slides.tissue_mask(slide), patch_px=64, mpp=MPP)
    batch = next(slides.read_patches(slide, grid, batch_size=16))
  for (x, y), patch in zip(batch.coords, batch.images):
    (bx, by, _, _), i = _photo_box(made, x + 32, y + 32)
    crop = photos[i][y - by:y - by + 64, x - bx:x - bx + 64]
    if crop.shape == patch.shape:  # patches reaching past the photo's edge are left out of the comparison
      assert np.abs(crop.astype(int) - patch).mean() < 8  # JPEG q90: measured <= 5.5; a 1/4-patch shift >= 16


def _photo_paths(made):
  by_stem = {p.stem: p for ps in slide_fixtures.bach_photos(BACH).values() for _, p in ps}
  return [by_stem[stem] for stem in made.photos]


def test_patches_at_the_gallery_resolution_match_the_photo_builders_tiles(fixture_slides):
  """bach/x5_64 tiles photos resized by 0.25 (1.68 um/px) into 64 px; a slide patch cut at 1.68 um/px
  from the same place must look the same, or slides could not be searched against that gallery."""
  made = fixture_slides[1][2]
  photos = [tiling.resize(slide_fixtures._photo(p, 1.0), 0.25) for p in _photo_paths(made)]  # noqa: SLF001
  with slides.open_slide(made.path) as slide:
    grid = slides.patch_grid(slide, slides.tissue_mask(slide), patch_px=64, mpp=4 * slide_fixtures.BACH_MPP)
    batch = next(slides.read_patches(slide, grid, batch_size=32))
  compared = 0
  for (x, y), patch in zip(batch.coords, batch.images):
    (bx, by, _, _), i = _photo_box(made, x + 64, y + 64)
    px, py = (x - bx) // 2, (y - by) // 2  # level-0 (0.84 um/px) to 1.68 um/px
    crop = photos[i][py:py + 64, px:px + 64]
    if crop.shape == patch.shape and (x - bx) % 2 == 0 and (y - by) % 2 == 0:
      assert np.abs(crop.astype(int) - patch).mean() < 8  # measured <= 3.9; shifted by 16 px: >= 16
      compared += 1
  assert compared >= 10


def test_mosaic_of_a_real_slide_is_small_spread_and_repeatable(fixture_slides):
  made = fixture_slides[1][1]
  with slides.open_slide(made.path) as slide:
    grid = slides.patch_grid(slide, slides.tissue_mask(slide), patch_px=64, mpp=MPP)
    mosaic = slides.build_mosaic(slide, grid)
    again = slides.build_mosaic(slide, grid)
  assert len(grid) > 200 and mosaic.rows <= 0.05 * len(grid) + 9
  assert np.array_equal(mosaic.indices, again.indices)
  photos_hit = {_photo_box(made, x + 32, y + 32)[1] for x, y in mosaic.grid.coords}
  assert photos_hit == {0, 1}  # both tissue pieces stand in the mosaic
