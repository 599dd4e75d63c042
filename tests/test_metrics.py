"""Retrieval metrics against cases worked out by hand."""

import numpy as np
import pytest

from histojax import metrics as M

# Three queries with labels 0, 1, 2; the labels of their ranked results:
#   q0: 0 1 0 0   q1: 0 0 1 -1 (only three results)   q2: 1 0 1 0
RETRIEVED = np.array([[0, 1, 0, 0], [0, 0, 1, -1], [1, 0, 1, 0]])
QUERY = np.array([0, 1, 2])


def test_precision_at_k():
  # k=1: 1, 0, 0.  k=4: 3/4, 1/3 (three results returned), 0.
  assert M.precision_at_k(RETRIEVED, QUERY, 1) == pytest.approx(1 / 3)
  assert M.precision_at_k(RETRIEVED, QUERY, 4) == pytest.approx((3 / 4 + 1 / 3 + 0) / 3)


def test_accuracy_at_k():
  assert M.accuracy_at_k(RETRIEVED, QUERY, 2) == pytest.approx(1 / 3)
  assert M.accuracy_at_k(RETRIEVED, QUERY, 3) == pytest.approx(2 / 3)


def test_average_precision_at_k():
  # q0: relevant at ranks 1, 3, 4 -> (1/1 + 2/3 + 3/4) / 3.  q1: rank 3 -> (1/3) / 1.  q2: none -> 0.
  ap = M.average_precision_at_k(RETRIEVED, QUERY, 4)
  np.testing.assert_allclose(ap, [(1 + 2 / 3 + 3 / 4) / 3, 1 / 3, 0.0])
  assert M.map_at_k(RETRIEVED, QUERY, 4) == pytest.approx(np.mean(ap))
  # Cut at k=2, q0 has one relevant result (rank 1): AP 1.
  np.testing.assert_allclose(M.average_precision_at_k(RETRIEVED, QUERY, 2), [1.0, 0.0, 0.0])


def test_majority_vote_breaks_ties_by_rank():
  # q0 top-4: three 0s -> 0. q1 top-3: 0,0,1 -> 0. q2 top-4: two 1s, two 0s, 1 ranks first -> 1.
  np.testing.assert_array_equal(M.majority_vote(RETRIEVED, 4), [0, 0, 1])
  # Top-2: q0 has 0,1 tied -> 0 (first); q2 has 1,0 tied -> 1.
  np.testing.assert_array_equal(M.majority_vote(RETRIEVED, 2), [0, 0, 1])
  assert M.majority_vote_at_k(RETRIEVED, QUERY, 4) == pytest.approx(1 / 3)
  assert M.majority_vote(np.array([[-1, -1]]), 2)[0] == -1


def test_drop_same_source_keeps_order_and_pads():
  gallery_source = np.array(["a", "a", "b", "b", "c", "c", "d"])
  query_source = np.array(["a", "c", "d"])
  neighbors = np.array([[0, 1, 2, 3], [4, -1, -1, -1], [5, 6, 0, 1]])
  out = M.drop_same_source(neighbors, gallery_source, query_source, 3)
  np.testing.assert_array_equal(out, [[2, 3, -1], [-1, -1, -1], [5, 0, 1]])
  # Asking for more than was searched pads with -1.
  assert M.drop_same_source(neighbors, gallery_source, query_source, 6).shape == (3, 6)


def test_max_shared_source():
  assert M.max_shared_source(np.array(["a", "a", "a", "b"]), np.array(["b", "c"])) == 1
  assert M.max_shared_source(np.array(["a", "a", "a", "b"]), np.array(["a"])) == 3
  assert M.max_shared_source(np.array(["a"]), np.array(["z"])) == 0


def test_retrieval_metrics_keys_and_k_too_large():
  neighbors = np.array([[0, 1], [1, 0]])
  out = M.retrieval_metrics(neighbors, np.array([0, 1]), np.array([0, 0]), ks=(1, 2))
  assert set(out) == {f"{m}@{k}" for m in ("precision", "accuracy", "map", "majority_vote") for k in (1, 2)}
  assert out["precision@1"] == pytest.approx(0.5)
  with pytest.raises(ValueError, match="k=5"):
    M.retrieval_metrics(neighbors, np.array([0, 1]), np.array([0, 0]), ks=(5,))
