"""histojax.slides on synthetic pyramidal TIFFs the tests write (no real photos needed).

The slides are small (1-4 Mpx) generic-tiff pyramids with downsamples 1, 4, 16
at 0.25 um/px, so a region at 1 um/px comes from level 1, at 4 um/px from level
2, and every level choice can be told apart by which level was read.
"""

from __future__ import annotations

import numpy as np
import pytest

from histojax import slides
from histojax.slides import mosaic as mosaic_lib
from tests import slide_fixtures

MPP = 0.25
BOXES = [(256, 256, 1024, 768), (1792, 512, 768, 1024)]  # tissue, level-0 (x, y, w, h)
MARK = (1400, 1600, 200, 200)  # a pure red square on the glass, to check coordinates


def _image() -> np.ndarray:
  image = slide_fixtures.tissue_image(2816, 2048, seed=1, boxes=BOXES)
  x, y, w, h = MARK
  image[y:y + h, x:x + w] = (230, 20, 20)
  return image


@pytest.fixture(scope="module")
def image() -> np.ndarray:
  return _image()


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory, image):
  path = tmp_path_factory.mktemp("slides") / "synthetic.tif"
  slide_fixtures.write_pyramid(path, image, MPP)
  return path


@pytest.fixture
def slide(slide_path):
  with slides.open_slide(slide_path) as s:
    yield s


def _record_levels(slide) -> list[int]:
  """Replaces `slide.read_level` with a wrapper that notes each level read."""
  levels, read = [], slide.read_level
  slide.read_level = lambda level, location, size: (levels.append(level), read(level, location, size))[1]
  return levels


def test_opens_generic_tiff_with_the_resolution_tags(slide):
  assert slide.vendor == "generic-tiff"
  assert slide.mpp == pytest.approx((MPP, MPP))
  assert slide.mpp_source == "openslide"  # OpenSlide 4 turns generic-tiff resolution tags into mpp-x/-y
  assert slide.dimensions == (2816, 2048)
  assert slide.level_downsamples == pytest.approx((1, 4, 16), rel=1e-3)
  assert slide.slide_id == "synthetic"
  assert slide.bounds == (0, 0, 2816, 2048)


def test_tiff_resolution_tags_are_the_fallback_when_openslide_has_no_mpp(tmp_path, image):
  path = tmp_path / "aperio_without_mpp.svs"  # Aperio takes MPP from its description only; here it has none
  slide_fixtures.write_pyramid(path, image[:1024, :1024], MPP, aperio=True, tags=True)
  with slides.open_slide(path) as slide:
    assert slide.vendor == "aperio" and "openslide.mpp-x" not in slide.properties
    assert slide.mpp == pytest.approx((MPP, MPP)) and slide.mpp_source == "tiff"


@pytest.mark.parametrize("downsample,level", [(0.96, 0), (1, 0), (2, 0), (3.9, 0), (3.97, 1), (4, 1), (7.9, 1),
                                              (15, 1), (16, 2), (100, 2)])
def test_best_level_is_the_coarsest_that_does_not_upsample(downsample, level):
  assert slides.best_level((1.0, 4.0, 16.0), downsample) == level


def test_best_level_takes_downsamples_rounded_by_level_sizes():
  # A 4863 px slide's 4x level is 1216 px: OpenSlide says 3.9992, and 4x is asked.
  assert slides.best_level((1.0, 3.9992, 15.99), 4.0) == 1
  assert slides.best_level((1.0, 4.05, 16.2), 4.0) == 0  # 1% too coarse: would upsample


@pytest.mark.parametrize("mpp,level", [(0.25, 0), (0.5, 0), (1.0, 1), (2.0, 1), (3.0, 1), (4.0, 2), (8.0, 2)])
def test_regions_come_from_the_coarsest_level_that_serves(slide, mpp, level):
  levels = _record_levels(slide)
  region = slide.read_region((300, 300), (32, 32), mpp)
  assert region.shape == (32, 32, 3) and region.dtype == np.uint8
  assert levels == [level]  # 1 um/px: level 1, never level 0; 2 um/px: level 1, never upsampled level 2


def test_finer_than_the_scan_is_refused_and_a_little_finer_is_allowed(slide):
  assert slide.read_region((0, 0), (16, 16), MPP * 0.97).shape == (16, 16, 3)  # "20x" scans at 0.504 um/px
  with pytest.raises(slides.ResolutionTooCoarseError, match="synthetic.tif.*coarser than the 0.125"):
    slide.read_region((0, 0), (16, 16), MPP / 2)


def test_region_pixels_are_the_level0_pixels_at_those_coordinates(slide, image):
  x, y = 300, 400
  region = slide.read_region((x, y), (200, 150), MPP).astype(int)
  assert np.abs(region - image[y:y + 150, x:x + 200]).mean() < 4  # JPEG quality 90


def test_coarse_regions_keep_the_level0_frame(slide):
  """The red mark at level-0 (1400, 1600), 200 px, read at 1 um/px (level 1, 4x) from (1200, 1400):
  it must sit at (50, 50)-(100, 100) of the 100 px region."""
  region = slide.read_region((1200, 1400), (100, 100), 1.0).astype(int)
  red = (region[..., 0] > 180) & (region[..., 1] < 80)
  ys, xs = np.nonzero(red)
  assert abs(xs.min() - 50) <= 1 and abs(xs.max() - 99) <= 1 and abs(ys.min() - 50) <= 1 and abs(ys.max() - 99) <= 1


def test_outside_the_slide_is_glass_white(slide):
  region = slide.read_region((2816 - 8, 0), (16, 16), MPP)
  assert (region[:, 8:] == 255).all()


def test_tissue_mask_finds_the_tissue_and_not_the_glass(slide):
  mask = slides.tissue_mask(slide)
  assert mask.mpp == pytest.approx(8.0, rel=0.3)
  inside, outside = _coverage(mask, BOXES)
  assert inside > 0.97
  assert outside < 0.01


def _coverage(mask, boxes, margin: int = 2):
  """Tissue fraction inside the boxes, and outside them (a margin of mask pixels left out of both)."""
  sx, sy = mask.scale
  inner = np.zeros_like(mask.mask)
  outer = np.ones_like(mask.mask)
  for x, y, w, h in boxes:
    x0, y0, x1, y1 = int(x / sx), int(y / sy), int((x + w) / sx), int((y + h) / sy)
    inner[y0 + margin:y1 - margin, x0 + margin:x1 - margin] = True
    outer[max(0, y0 - margin):y1 + margin, max(0, x0 - margin):x1 + margin] = False
  return mask.mask[inner].mean(), mask.mask[outer].mean()


def test_pen_marks_are_not_tissue(tmp_path):
  image = slide_fixtures.tissue_image(2816, 2560, seed=2, boxes=BOXES)
  pens = slide_fixtures.draw_pens(image, top=2048, band=512, margin=128)
  path = tmp_path / "pens.tif"
  slide_fixtures.write_pyramid(path, image, MPP)
  with slides.open_slide(path) as slide:
    mask = slides.tissue_mask(slide)
  inside, _ = _coverage(mask, BOXES)
  assert inside > 0.97
  sx, sy = mask.scale
  for x, y, w, h in pens:  # blue, green, black strokes: no tissue anywhere in their boxes, all seen as ink
    box = (slice(int(y / sy), int((y + h) / sy) + 1), slice(int(x / sx), int((x + w) / sx) + 1))
    assert not mask.mask[box].any()
    assert mask.ink[box].any()


def test_glass_and_ink_only_slides_have_no_tissue(tmp_path):
  glass = slide_fixtures.tissue_image(2048, 2048, seed=3)
  slide_fixtures.draw_pens(glass, top=1024, band=512, margin=128)
  path = tmp_path / "glass_and_pen.tif"
  slide_fixtures.write_pyramid(path, glass, MPP)
  with slides.open_slide(path) as slide, pytest.raises(slides.NoTissueError, match="glass_and_pen.tif.*no tissue"):
    slides.tissue_mask(slide)


def test_segment_tissue_drops_specks_and_fills_small_holes():
  rgb = np.full((200, 200, 3), slide_fixtures.GLASS, np.uint8)
  rgb[50:150, 50:150] = (200, 120, 180)  # 0.64 mm^2 of tissue at 8 um/px
  rgb[95:98, 95:98] = slide_fixtures.GLASS  # a 24 um hole: filled
  rgb[10:12, 10:12] = (200, 120, 180)  # a 16 um speck: dropped
  mask, ink = slides.segment_tissue(rgb, 8.0)
  assert mask[50:150, 50:150].all() and mask.sum() == 100 * 100
  assert not ink.any()


def test_patch_grid_is_in_level0_pixels_at_the_asked_resolution(slide):
  mask = slides.tissue_mask(slide)
  grid = slides.patch_grid(slide, mask, patch_px=50, mpp=1.0)
  assert grid.size == (200, 200) and grid.patch_px == 50  # 50 px at 1 um/px = 200 level-0 px at 0.25 um/px
  assert (grid.coords % 200 == 0).all()
  slack = mask.scale[0]  # one mask pixel
  for x, y in grid.coords:  # half a patch or more on tissue: its centre is on tissue
    assert any(bx - slack <= x + 100 < bx + bw + slack and by - slack <= y + 100 < by + bh + slack
               for bx, by, bw, bh in BOXES)
  assert (grid.tissue >= 0.5).all() and (grid.tissue == 1.0).sum() >= 2 * (4 * 3)  # whole cells in both boxes
  some, whole = (len(slides.patch_grid(slide, mask, patch_px=50, mpp=1.0, min_tissue=t)) for t in (0.0, 1.0))
  assert some > len(grid) > whole


def test_patch_grid_starts_at_the_bounds_and_keeps_the_level0_frame(slide, image):
  slide.properties.update({"openslide.bounds-x": "1792", "openslide.bounds-y": "512",
                           "openslide.bounds-width": "768", "openslide.bounds-height": "1024"})
  grid = slides.patch_grid(slide, slides.tissue_mask(slide), patch_px=64, mpp=MPP)
  assert grid.coords[:, 0].min() == 1792 and grid.coords[:, 1].min() == 512
  assert (grid.coords[:, 0] + 64 <= 1792 + 768).all() and (grid.coords[:, 1] + 64 <= 512 + 1024).all()
  x, y = grid.coords[5]  # read where the grid says: the level-0 pixels there, not shifted by the bounds
  assert np.abs(slide.read_region((x, y), (64, 64), MPP).astype(int) - image[y:y + 64, x:x + 64]).mean() < 4


def test_read_patches_gives_the_grid_in_order_from_one_level(slide):
  grid = slides.patch_grid(slide, slides.tissue_mask(slide), patch_px=32, mpp=1.0)
  levels = _record_levels(slide)
  stats = slides.ReadStats()
  batches = list(slides.read_patches(slide, grid, batch_size=7, workers=3, stats=stats))
  assert [len(b.images) for b in batches[:-1]] == [7] * (len(batches) - 1)
  assert np.array_equal(np.concatenate([b.indices for b in batches]), np.arange(len(grid)))
  assert np.array_equal(np.concatenate([b.coords for b in batches]), grid.coords)
  assert set(levels) == {1} and len(levels) == len(grid)
  images = np.concatenate([b.images for b in batches])
  for i in (0, len(grid) // 2, len(grid) - 1):  # the same pixels as one region read alone
    assert np.array_equal(images[i], slide.read_region(tuple(grid.coords[i]), (32, 32), 1.0))
  assert stats.patches == len(grid) and stats.read_s > 0 and stats.resize_s > 0


def test_read_patches_keeps_a_bounded_number_of_batches_in_flight(slide):
  grid = slides.patch_grid(slide, slides.tissue_mask(slide), patch_px=16, mpp=MPP, min_tissue=0.0)
  assert len(grid) > 100
  levels = _record_levels(slide)
  batches = slides.read_patches(slide, grid, batch_size=4, workers=2, prefetch=2)
  next(batches)
  assert len(levels) <= 3 * 4  # the batch handed out and the 2 prefetched, nothing more
  batches.close()  # the consumer stops early: what was queued is cancelled, nothing more is submitted
  assert len(levels) <= 3 * 4


def test_a_damaged_tile_surfaces_in_the_consumer(slide):
  grid = slides.patch_grid(slide, slides.tissue_mask(slide), patch_px=32, mpp=1.0)

  def broken(level, location, size):
    raise slides.DamagedSlideError(f"{slide.path}: damaged")
  slide.read_level = broken
  with pytest.raises(slides.DamagedSlideError, match="synthetic.tif"):
    list(slides.read_patches(slide, grid, batch_size=4))


def test_colour_histograms_count_each_channel():
  images = np.zeros((2, 4, 4, 3), np.uint8)
  images[0, ..., 0] = 255  # pure red
  images[1, :2] = 128
  hist = slides.colour_histograms(images, bins=4)
  assert hist.shape == (2, 12)
  assert np.allclose(hist.reshape(2, 3, 4).sum(-1), 1.0)
  assert hist[0].tolist() == [0, 0, 0, 1, 1, 0, 0, 0, 1, 0, 0, 0]
  assert hist[1].tolist() == [0.5, 0, 0.5, 0] * 3


def _two_tissues(n: int = 20):
  """An n x n grid of patches: the left half one colour, the right half another."""
  ys, xs = np.mgrid[0:n, 0:n]
  coords = np.stack([xs.ravel(), ys.ravel()], 1) * 256
  right = coords[:, 0] >= n * 128
  rng = np.random.default_rng(0)
  hist = np.where(right[:, None], [0.8, 0.2, 0.0], [0.1, 0.3, 0.6]) + rng.normal(0, 0.01, (n * n, 3))
  return hist.astype(np.float32), coords, right


def test_mosaic_keeps_a_few_spread_patches_of_every_colour():
  hist, coords, right = _two_tissues()
  settings = slides.MosaicSettings(fraction=0.05, colour_clusters=2)
  chosen = slides.select_mosaic(hist, coords, settings)
  assert np.array_equal(chosen, np.unique(chosen))
  assert len(chosen) == 20  # 5% of each colour's 200 patches
  assert right[chosen].sum() == 10  # both colours, in proportion
  for side in (right, ~right):  # spread: each colour's picks reach all four quarters of its half
    picked = coords[chosen[side[chosen]]]
    assert len({(x >= np.median(coords[side][:, 0]), y >= 2560) for x, y in picked}) == 4
  assert np.array_equal(chosen, slides.select_mosaic(hist, coords, settings))  # seeded: the same every run


def test_mosaic_fraction_one_keeps_every_patch_and_records_it():
  hist, coords, _ = _two_tissues(5)
  settings = slides.MosaicSettings(fraction=1.0)
  assert np.array_equal(slides.select_mosaic(hist, coords, settings), np.arange(25))
  assert settings.record() == {"method": "all_patches"}
  record = slides.MosaicSettings().record()
  assert record["fraction"] == 0.05 and record["colour_clusters"] == 9 and record["seed"] == 0


def test_mosaic_of_a_tiny_or_uniform_slide():
  coords = np.array([[0, 0], [256, 0], [512, 0]])
  same = np.ones((3, 6), np.float32)
  assert len(slides.select_mosaic(same, coords, slides.MosaicSettings())) == 1
  assert len(slides.select_mosaic(same[:1], coords[:1], slides.MosaicSettings())) == 1


def test_build_mosaic_reads_previews_and_returns_a_subgrid(slide):
  grid = slides.patch_grid(slide, slides.tissue_mask(slide), patch_px=64, mpp=MPP)
  levels = _record_levels(slide)
  mosaic = slides.build_mosaic(slide, grid, slides.MosaicSettings(fraction=0.05, preview_px=16))
  assert set(levels) == {1}  # previews at 4x coarser come from level 1
  assert mosaic.patches == len(grid) and 9 <= mosaic.rows <= 0.05 * len(grid) + 9
  assert np.array_equal(mosaic.grid.coords, grid.coords[mosaic.indices])
  for x, y, w, h in BOXES:  # both tissue pieces are in the mosaic
    assert any(x <= cx < x + w and y <= cy < y + h for cx, cy in mosaic.grid.coords)


@pytest.mark.parametrize("bad", [dict(fraction=0), dict(fraction=1.5), dict(bins=10), dict(colour_clusters=0)])
def test_mosaic_settings_are_checked(bad):
  with pytest.raises(ValueError):
    mosaic_lib.MosaicSettings(**bad)
