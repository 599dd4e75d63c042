"""ScaNN index against exact search, its automatic configuration, and its round trip on disk."""

import ml_collections
import numpy as np
import pytest

from histojax import indexing
from histojax.indexing import searcher, writer


def _cfg(mode="auto", **overrides):
  return ml_collections.ConfigDict({**dict(mode=mode, num_leaves=0, leaves_to_search=0, reorder=0, dims_per_block=0),
                                    **overrides})


def _clustered(n, dim=32, clusters=20, seed=0):
  rng = np.random.default_rng(seed)
  centres = np.random.default_rng(99).normal(size=(clusters, dim))
  return centres[rng.integers(0, clusters, n)] + 0.3 * rng.normal(size=(n, dim))


def _recall(found, exact):
  return np.mean([len(set(a) & set(b)) / exact.shape[1] for a, b in zip(found, exact)])


def test_exact_search_by_hand():
  gallery = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
  neighbors, scores = indexing.exact_search(gallery, np.array([[0.8, 0.6]]), k=5)
  # Dot products with (.8, .6): 0.8, 0.6 and .48 + .48 = 0.96.
  np.testing.assert_array_equal(neighbors, [[2, 0, 1, -1, -1]])
  np.testing.assert_allclose(scores[0, :3], [0.96, 0.8, 0.6], rtol=1e-6)


def test_exact_search_ties_keep_the_lower_row_across_chunks():
  # Rows 0, 3, 5 are the same vector: equal scores, in row order, also when
  # they fall in different blocks of the blocked search.
  gallery = np.array([[1, 0], [0, 1], [0.6, 0.8], [1, 0], [-1, 0], [1, 0]], np.float32)
  query = np.array([[1, 0]], np.float32)
  for cells in (1 << 24, 2):
    neighbors, _ = searcher._blocked_top_k(lambda qs, rs: query[qs] @ gallery[rs].T, 1, 6, 4, cells)
    assert neighbors.tolist() == [[0, 3, 5, 2]]
  scores = np.array([[0.5, 0.9, 0.5, 0.5, 0.1]], np.float32)
  assert indexing.top_k(scores, 3)[0].tolist() == [[1, 0, 2]]  # the tie at the cut keeps rows 0 and 2


@pytest.mark.parametrize("n", [3000, 30_000])
def test_scann_recall_at_the_automatic_configuration(n):
  gallery, queries = _clustered(n), _clustered(300, seed=1)
  idx = indexing.build(gallery, indexing.IndexConfig(), k=10)
  assert idx.mode == ("brute_force" if n < 20_000 else "tree_ah")
  found, _ = indexing.search(idx, queries, 10)
  exact, _ = indexing.exact_search(indexing.l2_normalize(gallery), indexing.l2_normalize(queries), 10)
  assert _recall(found, exact) >= 0.95


def test_auto_mode_by_size_and_every_knob_overridable():
  assert indexing.resolve_mode(19_999, _cfg()) == "brute_force"
  assert indexing.resolve_mode(20_000, _cfg()) == "tree_ah"
  assert indexing.resolve_mode(50_000, _cfg(ah_below=100_000)) == "ah"
  assert indexing.resolve_mode(10, _cfg(brute_force_below=5)) == "tree_ah"
  assert indexing.resolve_mode(10, _cfg("exact")) == "exact"
  assert indexing.resolve_mode(10, _cfg(), has_codes=True) == "adc"
  with pytest.raises(ValueError, match="eval.index.mode"):
    indexing.resolve_mode(10, _cfg("fast"))
  with pytest.raises(ValueError, match="reorder_dtype"):
    indexing.IndexConfig.from_config({"reorder_dtype": "fp8"})
  with pytest.raises(ValueError, match="num_leavs"):
    indexing.IndexConfig.from_config({"num_leavs": 3})
  idx = indexing.build(_clustered(2000), _cfg("tree_ah", num_leaves=7, leaves_to_search=3, reorder=40,
                                           reorder_dtype="int8"), k=10)
  assert idx.params["num_leaves"] == 7 and idx.params["leaves_to_search"] == 3
  assert idx.params["reorder"] == 40 and idx.params["reorder_dtype"] == "int8"
  assert indexing.build(_clustered(2000), _cfg("tree_ah"), k=10).params["reorder"] == 250
  assert indexing.default_reorder(1_000_000, 10) == 1000 and indexing.default_reorder(100_000, 20) == 500


def test_k_larger_than_gallery_pads():
  idx = indexing.build(_clustered(5), _cfg("brute_force"))
  neighbors, scores = indexing.search(idx, _clustered(2, seed=3), 8)
  assert (neighbors[:, :5] >= 0).all() and (neighbors[:, 5:] == -1).all()
  assert np.isneginf(scores[:, 5:]).all()


def test_k_beyond_the_reorder_depth_is_still_answered():
  gallery, queries = _clustered(3000), _clustered(20, seed=4)
  idx = indexing.build(gallery, _cfg("tree_ah", reorder=20, leaves_to_search=54), k=10)
  found, _ = indexing.search(idx, queries, 60)
  exact, _ = indexing.exact_search(indexing.l2_normalize(gallery), indexing.l2_normalize(queries), 60)
  assert (found >= 0).all() and _recall(found, exact) >= 0.9


@pytest.mark.parametrize("mode", ["exact", "brute_force", "tree_ah"])
def test_save_load_gives_identical_results(tmp_path, mode):
  gallery, queries = _clustered(3000), _clustered(50, seed=2)
  idx = indexing.build(gallery, _cfg(mode))
  rows = {"label": np.arange(3000) % 7, "source_id": np.array([f"s{i % 13}" for i in range(3000)])}
  writer.save(idx, tmp_path / "index", {"dataset": "x"}, rows)
  (tmp_path / "index").rename(tmp_path / "moved")  # relocatable: no absolute paths inside
  loaded, manifest = indexing.load(tmp_path / "moved")
  assert manifest["dataset"] == "x" and manifest["mode"] == mode and manifest["count"] == 3000
  assert manifest["dim"] == 32 and manifest["format_version"] == indexing.FORMAT_VERSION
  original = indexing.search(idx, queries, 10)
  again = indexing.search(loaded, queries, 10)
  np.testing.assert_array_equal(again[0], original[0])
  np.testing.assert_array_equal(again[1], original[1])
  np.testing.assert_array_equal(indexing.load_rows(tmp_path / "moved")["label"], rows["label"])


def test_save_replaces_an_older_index_whole(tmp_path):
  writer.save(indexing.build(_clustered(100), _cfg("brute_force")), tmp_path / "index", {"v": 1})
  writer.save(indexing.build(_clustered(50), _cfg("exact")), tmp_path / "index", {"v": 2})
  loaded, manifest = indexing.load(tmp_path / "index")
  assert manifest["v"] == 2 and loaded.size == 50 and not (tmp_path / "index" / "scann").exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]  # no staging left behind


def test_manifest_mismatch_is_refused_naming_the_fields(tmp_path):
  writer.save(indexing.build(_clustered(100), _cfg("exact")), tmp_path / "index",
             {"step": 400, "fingerprint": "aaaa", "image_size": 56})
  manifest = indexing.read_manifest(tmp_path / "index")
  indexing.check_manifest(manifest, {"step": 400, "image_size": 56}, tmp_path / "index")  # matches: no error
  with pytest.raises(indexing.ManifestMismatch) as e:
    indexing.check_manifest(manifest, {"step": 300, "fingerprint": "bbbb", "image_size": 56}, tmp_path / "index")
  assert "step: index has 400, query has 300" in str(e.value)
  assert "fingerprint: index has 'aaaa', query has 'bbbb'" in str(e.value)
  assert "image_size" not in str(e.value)
  assert indexing.load_if_matching(tmp_path / "index", {"step": 300}) is None
  assert indexing.load_if_matching(tmp_path / "index", {"step": 400})[0].size == 100


def test_load_refuses_a_folder_without_manifest_or_of_another_format(tmp_path):
  with pytest.raises(FileNotFoundError, match="no manifest.json"):
    indexing.load(tmp_path)
  (tmp_path / "manifest.json").write_text('{"mode": "exact"}')
  with pytest.raises(ValueError, match="format version"):
    indexing.load(tmp_path)
