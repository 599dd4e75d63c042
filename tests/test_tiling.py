"""Tiling and the tissue filter, on images whose answer is known by construction."""

import numpy as np
import pytest

from histojax.data import tiling


def test_grid_skips_partial_edge_tiles():
  # 250 x 130 px with 64 px tiles: rows at 0, 64, 128 (192 + 64 > 250); columns at 0, 64.
  coords = tiling.grid(250, 130, 64, 64)
  assert coords.tolist() == [[0, 0], [0, 64], [64, 0], [64, 64], [128, 0], [128, 64]]
  assert tiling.grid(100, 100, 64, 32).tolist() == [[0, 0], [0, 32], [32, 0], [32, 32]]
  assert len(tiling.grid(50, 500, 64, 64)) == 0


def _half_tissue(h=128, w=256):
  """Left half pink (saturated) tissue, right half white glass."""
  image = np.full((h, w, 3), 245, np.uint8)
  image[:, : w // 2] = (200, 110, 170)
  return image


def test_otsu_filter_keeps_tissue_and_counts_background():
  cfg = tiling.TilingConfig(patch_size=64, stride=64, min_tissue_fraction=0.5)
  tiles, dropped = tiling.tile_image(_half_tissue(), cfg)
  assert [(t.y, t.x) for t in tiles] == [(0, 0), (0, 64), (64, 0), (64, 64)]
  assert dropped == 4
  assert all(t.tissue_fraction == 1.0 and t.image.shape == (64, 64, 3) for t in tiles)


def test_fixed_threshold_and_keep_all():
  image = _half_tissue()
  cfg = tiling.TilingConfig(patch_size=64, stride=64, tissue_threshold=0.9, min_tissue_fraction=0.5)
  assert tiling.tile_image(image, cfg) == ([], 8)  # nothing is that saturated
  keep_all = tiling.TilingConfig(patch_size=64, stride=64, min_tissue_fraction=0.0)
  assert len(tiling.tile_image(image, keep_all)[0]) == 8


def test_resize_before_tiling():
  cfg = tiling.TilingConfig(patch_size=64, stride=64, resize=0.5, min_tissue_fraction=0.0)
  tiles, dropped = tiling.tile_image(_half_tissue(256, 512), cfg)  # -> 128 x 256 -> 2 x 4 tiles
  assert len(tiles) == 8 and dropped == 0


def test_image_smaller_than_a_patch_counts_as_dropped():
  assert tiling.tile_image(np.zeros((10, 10, 3), np.uint8), tiling.TilingConfig(patch_size=64)) == ([], 1)


def test_bad_config_names_the_field():
  with pytest.raises(ValueError, match="min_tissue_fraction"):
    tiling.TilingConfig(min_tissue_fraction=1.5)
  with pytest.raises(ValueError, match="resize"):
    tiling.TilingConfig(resize=0)


def test_saturation_of_grey_and_pure_colour():
  image = np.array([[[128, 128, 128], [255, 0, 0], [0, 0, 0]]], np.uint8)
  np.testing.assert_allclose(tiling.saturation(image), [[0.0, 1.0, 0.0]])
