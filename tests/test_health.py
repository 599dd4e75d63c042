"""histojax.health on sets whose spread is known by hand."""

import warnings

import numpy as np
import pytest

from histojax import health, indexing
from histojax.indexing import writer


def test_identical_rows_are_fully_collapsed():
  x = np.tile([[3.0, 4.0, 0.0]], (5, 1))  # one direction, any length
  assert health.mean_norm(x) == pytest.approx(1.0)
  assert health.effective_dim(x) is None  # no variance at all
  record = health.spread(x)
  assert record["collapsed"] and record["rows"] == 5 and record["dim"] == 3


def test_orthonormal_basis_by_hand():
  # Rows e1..e4 of R^4: mean (1/4, 1/4, 1/4, 1/4), norm 1/2 (= sqrt of the mean cosine, 4/16).
  # Centred, the covariance has eigenvalues 1/3 (x3, up to scale) and 0 (along the mean): PR = 3.
  x = np.eye(4)
  assert health.mean_norm(x) == pytest.approx(0.5)
  assert health.effective_dim(x) == pytest.approx(3.0)
  assert not health.spread(x)["collapsed"]


def test_a_narrow_cone_is_collapsed_and_its_direction_count_is_kept():
  # The shape: unit rows = 0.999 * one axis + 0.045 * noise over 8 other axes.
  rng = np.random.default_rng(0)
  noise = rng.standard_normal((4000, 8))
  x = np.concatenate([np.ones((4000, 1)), 0.045 * noise / np.sqrt(8), np.zeros((4000, 7))], 1)
  norm = health.mean_norm(x)
  assert 0.998 < norm < 1.0  # hand: 1 / sqrt(1 + 0.045^2) = 0.99899
  assert health.effective_dim(x) == pytest.approx(8.0, rel=0.1)  # isotropic noise in 8 directions
  assert health.spread(x)["collapsed"]


def test_isotropic_gaussian_is_healthy():
  # n random directions in R^d: mean norm about 1/sqrt(n), participation ratio about d
  # (d / (1 + d / n) for a sample covariance: 63.5 here).
  rng = np.random.default_rng(1)
  x = rng.standard_normal((8000, 64))
  assert health.mean_norm(x) == pytest.approx(1 / np.sqrt(8000), rel=0.5)
  assert 56 < health.effective_dim(x) <= 64
  assert not health.spread(x)["collapsed"]


def test_row_thinning_and_wide_sets():
  rng = np.random.default_rng(2)
  x = rng.standard_normal((3000, 16))
  assert health.effective_dim(x, max_rows=1000) == pytest.approx(health.effective_dim(x), rel=0.05)
  wide = rng.standard_normal((10, 500))  # d > n: the 10 x 10 Gram has the same non-zero eigenvalues
  centred = health.unit_rows(wide) - health.unit_rows(wide).mean(0)
  eig = np.linalg.eigvalsh(centred.T @ centred)
  assert health.effective_dim(wide) == pytest.approx(eig.sum() ** 2 / (eig ** 2).sum(), rel=1e-4)
  assert health.mean_norm(np.zeros((1, 3))) == 0.0  # a zero row has no direction


def test_warn_only_above_the_threshold_and_names_the_set():
  with pytest.warns(health.CollapsedEmbeddingWarning, match=r"gallery X: collapsed .* 0\.9997"):
    health.warn({"mean_norm": 0.9997, "effective_dim": 11.8, "dim": 384}, "gallery X")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert health.warn({"mean_norm": 0.36, "effective_dim": 40.0, "dim": 192}, "ok") is None
    assert health.warn(None, "an old manifest without a record") is None


@pytest.mark.parametrize("bad", [np.zeros((0, 4)), np.zeros(4), np.zeros((3, 0))])
def test_bad_shapes_are_named(bad):
  with pytest.raises(ValueError, match="non-empty"):
    health.spread(bad)


def test_index_build_and_load_warn_on_a_collapsed_gallery(tmp_path):
  rng = np.random.default_rng(3)
  cone = np.concatenate([np.ones((50, 1)), 0.01 * rng.standard_normal((50, 7))], 1)
  with pytest.warns(health.CollapsedEmbeddingWarning, match="index gallery of 50 rows"):
    idx = indexing.build(cone, {"mode": "exact"})
  writer.save(idx, tmp_path / "cone", {"spread": health.spread(cone)})
  with pytest.warns(health.CollapsedEmbeddingWarning, match=f"index {tmp_path / 'cone'}: collapsed"):
    indexing.load(tmp_path / "cone")
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # a healthy gallery, and an old manifest without a record, are quiet
    healthy = indexing.build(rng.standard_normal((50, 8)), {"mode": "exact"})
    writer.save(healthy, tmp_path / "healthy", {})
    indexing.load(tmp_path / "healthy")
