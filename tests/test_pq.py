"""Product quantisation and asymmetric-distance search on synthetic codebooks."""

import numpy as np
import pytest

from histojax import indexing, pq
from histojax.indexing import writer


def _codebooks(m=4, k=16, sub=3, seed=0):
  return np.random.default_rng(seed).standard_normal((m, k, sub)).astype(np.float32)


def test_encode_picks_the_best_codeword_per_subvector():
  books = np.array([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]],  # book 0
                    [[0.0, 2.0], [3.0, 0.0], [0.0, -1.0]]], np.float32)  # book 1
  x = np.array([[0.9, 0.2, 0.1, -5.0]], np.float32)
  # Dot: book 0 -> (.9, .2, -.9) -> 0; book 1 -> (-10, .3, 5) -> 2.
  np.testing.assert_array_equal(pq.encode(x, books, "dot_product"), [[0, 2]])
  # L2: book 0 nearest (1, 0) -> 0; book 1: (.1, -5) is 4.0 from (0, -1) -> 2.
  np.testing.assert_array_equal(pq.encode(x, books, "squared_l2"), [[0, 2]])
  np.testing.assert_allclose(pq.reconstruct(np.array([[0, 2]]), books), [[1, 0, 0, -1]])
  assert pq.encode(x, books).dtype == np.uint8


@pytest.mark.parametrize("metric", ["dot_product", "squared_l2"])
def test_adc_scores_equal_scores_against_reconstructions(metric):
  books = _codebooks()
  rng = np.random.default_rng(1)
  codes = rng.integers(0, 16, (50, 4)).astype(np.uint8)
  queries = rng.standard_normal((7, 12)).astype(np.float32)
  recon = pq.reconstruct(codes, books)
  expected = queries @ recon.T if metric == "dot_product" else -((queries[:, None] - recon[None]) ** 2).sum(-1)
  got = pq.adc_scores(pq.tables(queries, books, metric), codes)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_adc_search_equals_exact_search_over_reconstructions_ties_included():
  books = _codebooks(k=4)  # few codewords: many gallery rows share a code -> exact ties
  rng = np.random.default_rng(2)
  codes = rng.integers(0, 4, (300, 4)).astype(np.uint8)
  queries = rng.standard_normal((9, 12)).astype(np.float32)
  found, scores = indexing.adc_search(queries, codes, books, k=20)
  exact, exact_scores = indexing.exact_search(pq.reconstruct(codes, books), queries, k=20)
  np.testing.assert_array_equal(found, exact)
  np.testing.assert_allclose(scores, exact_scores, rtol=1e-4, atol=1e-4)
  # Tied scores come lowest row first.
  for row, s in zip(found, scores):
    same = np.flatnonzero(np.isclose(s[:-1], s[1:], rtol=0, atol=0))
    assert np.all(row[same] < row[same + 1])


def test_adc_search_k_larger_than_gallery_and_chunked():
  books = _codebooks()
  codes = np.random.default_rng(3).integers(0, 16, (5, 4)).astype(np.uint8)
  found, scores = indexing.adc_search(np.ones((2, 12), np.float32), codes, books, k=8)
  assert (found[:, :5] >= 0).all() and (found[:, 5:] == -1).all() and np.isneginf(scores[:, 5:]).all()


def test_adc_index_recall_on_well_quantised_data_and_round_trip(tmp_path):
  # Gallery rows are codewords plus small noise, so codes recover them and ADC
  # ranks like exact L2 search over the float gallery.
  books = _codebooks(m=8, k=32, sub=4)
  rng = np.random.default_rng(4)
  true_codes = rng.integers(0, 32, (2000, 8))
  gallery = pq.reconstruct(true_codes, books) + 0.01 * rng.standard_normal((2000, 32)).astype(np.float32)
  codes = pq.encode(gallery, books, "squared_l2")
  np.testing.assert_array_equal(codes, true_codes)
  idx = indexing.build(None, {"pq_metric": "squared_l2"}, codes=codes, codebooks=books)
  assert idx.mode == "adc" and idx.gallery is None
  queries = gallery[:50] + 0.05 * rng.standard_normal((50, 32)).astype(np.float32)
  found, _ = indexing.search(idx, queries, 10)
  exact = np.argsort(((queries[:, None] - gallery[None]) ** 2).sum(-1), axis=1)[:, :10]
  assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact)]) >= 0.95
  assert found[:, 0].tolist() == list(range(50))
  writer.save(idx, tmp_path / "adc", {"dataset": "x"})
  loaded, manifest = indexing.load(tmp_path / "adc")
  assert manifest["mode"] == "adc" and manifest["metric"] == "squared_l2"
  assert not (tmp_path / "adc" / "gallery.npy").exists()  # codes only: the float gallery is not kept
  np.testing.assert_array_equal(indexing.search(loaded, queries, 10)[0], found)


def test_bits_and_bad_shapes():
  books = _codebooks(m=4, k=16)
  assert pq.bits_per_row(books) == 16.0  # 4 books x log2(16)
  with pytest.raises(ValueError, match="cover 12 dims"):
    pq.tables(np.zeros((1, 10), np.float32), books)
  with pytest.raises(ValueError, match="codeword 20"):
    pq.check_codes(np.array([[20, 0, 0, 0]]), books)
  with pytest.raises(ValueError, match=r"\[n, 4\]"):
    pq.check_codes(np.zeros((3, 2), np.uint8), books)
  with pytest.raises(ValueError, match="PQ metric"):
    pq.tables(np.zeros((1, 12), np.float32), books, "cosine")
  with pytest.raises(ValueError, match="has none"):
    indexing.build(np.zeros((3, 12), np.float32), {"mode": "adc"})
