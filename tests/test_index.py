"""ScaNN index against exact search, and its round trip on disk."""

import ml_collections
import numpy as np
import pytest

from histojax import index


def _cfg(mode="auto"):
  return ml_collections.ConfigDict(dict(mode=mode, num_leaves=0, leaves_to_search=0, reorder=0, dims_per_block=2))


def _clustered(n, dim=32, clusters=20, seed=0):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(clusters, dim))
  return centres[rng.integers(0, clusters, n)] + 0.3 * rng.normal(size=(n, dim))


def test_exact_search_by_hand():
  gallery = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
  neighbors, scores = index.exact_search(gallery, np.array([[0.8, 0.6]]), k=5)
  # Dot products with (.8, .6): 0.8, 0.6 and .48 + .48 = 0.96.
  np.testing.assert_array_equal(neighbors, [[2, 0, 1, -1, -1]])
  np.testing.assert_allclose(scores[0, :3], [0.96, 0.8, 0.6], rtol=1e-6)


@pytest.mark.parametrize("mode,n", [("brute_force", 2000), ("tree_ah", 25000)])
def test_scann_recall_against_exact(mode, n):
  gallery, queries = _clustered(n), _clustered(300, seed=1)
  idx = index.build(gallery, _cfg(mode))
  found, _ = index.search(idx, queries, 10)
  exact, _ = index.exact_search(index.l2_normalize(gallery), index.l2_normalize(queries), 10)
  recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact)])
  assert recall >= 0.95


def test_auto_mode_by_size():
  assert index.resolve_mode(19_999, _cfg()) == "brute_force"
  assert index.resolve_mode(20_000, _cfg()) == "tree_ah"
  assert index.resolve_mode(10, _cfg("exact")) == "exact"
  with pytest.raises(ValueError, match="eval.index.mode"):
    index.resolve_mode(10, _cfg("fast"))


def test_k_larger_than_gallery_pads():
  idx = index.build(_clustered(5), _cfg("brute_force"))
  neighbors, scores = index.search(idx, _clustered(2, seed=3), 8)
  assert (neighbors[:, :5] >= 0).all() and (neighbors[:, 5:] == -1).all()
  assert np.isneginf(scores[:, 5:]).all()


def test_save_load_gives_identical_results(tmp_path):
  gallery, queries = _clustered(3000), _clustered(50, seed=2)
  idx = index.build(gallery, _cfg("tree_ah"))
  index.save(idx, tmp_path / "index", {"dataset": "x"})
  (tmp_path / "index").rename(tmp_path / "moved")  # relocatable: no absolute paths inside
  loaded, manifest = index.load(tmp_path / "moved")
  assert manifest == {"dataset": "x", "mode": "tree_ah"}
  np.testing.assert_array_equal(index.search(loaded, queries, 10)[0], index.search(idx, queries, 10)[0])


def test_load_refuses_a_folder_without_manifest(tmp_path):
  with pytest.raises(FileNotFoundError, match="no manifest.json"):
    index.load(tmp_path)
