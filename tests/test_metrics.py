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
  families = ("precision", "accuracy", "map", "majority_vote")
  expected = {f"{m}@{k}" for m in families for k in (1, 2)}
  expected |= {f"macro/{m}@{k}" for m in families for k in (1, 2)}
  expected |= {f"{e}@{k}" for e in ("eta_p", "eta_w", "eta_total") for k in (1, 2)}
  assert set(out) == expected
  assert out["precision@1"] == pytest.approx(0.5)
  with pytest.raises(ValueError, match="k=5"):
    M.retrieval_metrics(neighbors, np.array([0, 1]), np.array([0, 0]), ks=(5,))


# Four queries from two source images, A (q0, q1) and B (q2, q3).
RETRIEVED4 = np.array([[0, 1, 0, 0], [0, 0, 1, -1], [1, 0, 1, 0], [2, 2, 1, 1]])
SOURCE4 = np.array(["A", "A", "B", "B"])


def test_pooled_vote_per_source_image():
  ids, voted, counts = M.pooled_vote(RETRIEVED4, SOURCE4, 2)
  # k=2. A pools 0 1 | 0 0 -> three 0s. B pools 1 0 | 2 2 -> 2 has two votes.
  assert ids.tolist() == ["A", "B"]
  np.testing.assert_array_equal(voted, [0, 2])
  np.testing.assert_array_equal(counts, [[3, 1, 0], [1, 1, 2]])
  # k=4. B pools 1 0 1 0 | 2 2 1 1 -> 1 has four votes, 0 and 2 two each.
  np.testing.assert_array_equal(M.pooled_vote(RETRIEVED4, SOURCE4, 4)[1], [0, 1])


def test_pooled_vote_ties_go_to_the_earliest_rank_then_lowest_label():
  # Labels 1 and 2 both have two votes; 2 is at rank 1 in both lists, 1 only at rank 2.
  tied_by_rank = np.array([[2, 1], [2, 1]])
  assert M.pooled_vote(tied_by_rank, np.array(["x", "x"]), 2)[1].tolist() == [2]
  # Both at rank 1 somewhere: the lower label id wins.
  tied_fully = np.array([[2, 1], [1, 2]])
  assert M.pooled_vote(tied_fully, np.array(["x", "x"]), 2)[1].tolist() == [1]
  # A group with no result at all votes -1.
  assert M.pooled_vote(np.array([[-1, -1]]), np.array(["x"]), 2)[1].tolist() == [-1]


def test_image_majority_vote_at_k():
  labels = np.array([0, 0, 1, 1])  # image A is class 0, B class 1
  assert M.group_labels(labels, SOURCE4)[1].tolist() == [0, 1]
  assert M.image_majority_vote_at_k(RETRIEVED4, labels, SOURCE4, 2) == pytest.approx(0.5)  # B voted 2
  assert M.image_majority_vote_at_k(RETRIEVED4, labels, SOURCE4, 4) == pytest.approx(1.0)
  # The image's label is its patches' most frequent label, ties to the lower id.
  assert M.group_labels(np.array([3, 1, 1, 3]), np.array(["a", "a", "a", "b"]))[1].tolist() == [1, 3]


def test_per_class_and_macro():
  values, labels = np.array([1.0, 0.0, 1.0, 1.0]), np.array([0, 0, 1, 2])
  np.testing.assert_allclose(M.per_class_mean(values, labels, 4), [0.5, 1.0, 1.0, np.nan])
  assert M.macro_average(values, labels) == pytest.approx((0.5 + 1 + 1) / 3)  # micro would be 0.75


def test_kimia_eta():
  predicted, truth = np.array([0, 0, 1, 2, 2]), np.array([0, 0, 1, 1, 2])
  eta = M.kimia_eta(predicted, truth)
  # 4 of 5 patches right; per class 2/2, 1/2, 1/1.
  assert eta["eta_p"] == pytest.approx(0.8)
  assert eta["eta_w"] == pytest.approx((1 + 0.5 + 1) / 3)
  assert eta["eta_total"] == pytest.approx(0.8 * 2.5 / 3)


def test_confusion_matrix_counts_no_result_apart():
  m = M.confusion_matrix(np.array([0, 0, 1, 1, 1]), np.array([0, 1, 1, -1, 1]), 2)
  np.testing.assert_array_equal(m, [[1, 1, 0], [0, 2, 1]])


def test_concordance_index_with_ties():
  # Same-class pairs (target 1) score .9 and .8, different-class .8 and .1:
  # .9>.8, .9>.1, .8=.8 (half), .8>.1 -> 3.5 of 4.
  assert M.concordance_index([0.9, 0.8, 0.8, 0.1], [1, 0, 1, 0]) == pytest.approx(0.875)
  # Ordinal targets: (2 vs 1) 3>1, (2 vs 0) 3>2, (1 vs 0) 1<2 -> 2 of 3.
  assert M.concordance_index([3.0, 1.0, 2.0], [2, 1, 0]) == pytest.approx(2 / 3)
  assert np.isnan(M.concordance_index([1.0, 2.0], [1, 1]))


def test_pair_threshold_and_c_index():
  sim = np.array([0.9, 0.7, 0.6, 0.4, 0.2])
  same = np.array([1, 1, 0, 1, 0], bool)
  # "same" from .4 up: .9 .7 .4 right, .6 wrong, .2 right -> 4; from .7 up also 4; the lower wins.
  threshold = M.choose_pair_threshold(sim, same)
  assert threshold == pytest.approx(0.3)
  assert M.pair_c_index(sim, same, threshold) == pytest.approx(0.8)
  assert M.choose_pair_threshold(np.array([0.5, 0.1]), np.array([True, True])) == -np.inf
  assert M.choose_pair_threshold(np.array([0.5, 0.1]), np.array([False, False])) == np.inf
  with pytest.raises(ValueError, match="at least one"):
    M.choose_pair_threshold(np.array([]), np.array([], bool))


def test_retrieval_metrics_with_k_larger_than_gallery():
  # Gallery of two rows (labels 0, 1), k=4: each query has two results and two -1s.
  neighbors = np.array([[0, 1, -1, -1], [1, 0, -1, -1], [0, 1, -1, -1]])
  out = M.retrieval_metrics(neighbors, np.array([0, 1]), np.array([0, 1, 1]), ks=(1, 4),
                            query_source=np.array(["a", "b", "b"]), class_names=["c0", "c1"])
  assert out["precision@4"] == pytest.approx(0.5)  # one relevant of two returned, every query
  assert out["accuracy@4"] == pytest.approx(1.0)
  assert out["map@4"] == pytest.approx((1 + 1 + 0.5) / 3)
  assert out["precision@1"] == pytest.approx(2 / 3)
  assert out["macro/precision@1"] == pytest.approx((1 + 0.5) / 2)
  # Image b pools 1 0 | 0 1 -> tie at rank 1, lower id 0 -> wrong; image a right.
  assert out["image_majority_vote@4"] == pytest.approx(0.5)
  assert out["per_class"]["c1"]["precision@1"] == pytest.approx(0.5)
  assert out["eta_p@1"] == pytest.approx(2 / 3) and out["eta_w@1"] == pytest.approx(0.75)


def test_weighted_pooled_vote_trusts_close_matches():
  # Photo "a": two tiles with far label-1 matches, one tile with close label-0 matches.
  retrieved = np.array([[1, 1], [1, 1], [0, 0], [2, -1]])
  scores = np.array([[0.1, 0.1], [0.1, 0.1], [0.9, 0.9], [0.5, -np.inf]])
  groups = np.array(["a", "a", "a", "b"])
  assert M.pooled_vote(retrieved, groups, 2)[1].tolist() == [1, 2]  # one vote per result: label 1 wins 4-2
  ids, voted = M.weighted_pooled_vote(retrieved, scores, groups, 2)
  assert ids.tolist() == ["a", "b"] and voted.tolist() == [0, 2]  # weights 0, 0 vs 0.8 + 0.8
  assert M.weighted_pooled_vote(np.array([[-1]]), np.array([[-np.inf]]), np.array(["x"]), 1)[1].tolist() == [-1]


def test_centroid_vote_ranks_whole_sources():
  gallery = np.array([[1, 0], [0.8, 0.6], [0, 1], [0, 1], [-1, 0]], np.float64)
  gallery_groups = np.array(["g1", "g1", "g2", "g2", "g3"])
  gallery_labels = np.array([0, 0, 1, 1, 2])
  ids, centroids = M.source_centroids(gallery, gallery_groups)
  np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0)
  np.testing.assert_allclose(centroids[1], [0, 1])
  query = np.array([[0.2, 1], [0.1, 1], [-1, 0.1]])
  q_ids, voted = M.centroid_vote(query, np.array(["q1", "q1", "q2"]), gallery, gallery_groups, gallery_labels, 1)
  assert q_ids.tolist() == ["q1", "q2"] and voted.tolist() == [1, 2]
  # A source is never its own neighbour when gallery and queries are one split.
  _, self_voted = M.centroid_vote(gallery, gallery_groups, gallery, gallery_groups, gallery_labels, 1)
  assert self_voted.tolist() == [1, 0, 1]  # g1 -> g2 (cosine 0.32 against -0.95), g2 -> g1, g3 -> g2


def test_rank_sources_pools_each_tiles_best_hit_by_source():
  # 3 query tiles x top 3; gallery rows 0-1 are photo "a", 2 is "b", 3-4 are "c".
  source = np.array(["a", "a", "b", "c", "c"])
  neighbors = np.array([[0, 1, 2],    # tile 0: a 0.9, a 0.8 (only the best counts), b 0.5
                        [3, 0, -1],   # tile 1: c 0.7, a 0.6, one slot past the gallery's end
                        [2, 4, 3]])   # tile 2: b 0.9, c 0.4, c 0.3
  scores = np.array([[0.9, 0.8, 0.5], [0.7, 0.6, -np.inf], [0.9, 0.4, 0.3]])
  ids, pooled, matched, row = M.rank_sources(neighbors, scores, source, top=3)
  # By hand: a (0.9 + 0.6 + 0) / 3 = 0.5; b (0.5 + 0 + 0.9) / 3 = 0.4667; c (0 + 0.7 + 0.4) / 3 = 0.3667.
  assert ids.tolist() == ["a", "b", "c"]
  np.testing.assert_allclose(pooled, [0.5, 1.4 / 3, 1.1 / 3])
  assert matched.tolist() == [2, 2, 2] and row.tolist() == [0, 2, 3]
  top1 = M.rank_sources(neighbors, scores, source, top=1)
  assert top1[0].tolist() == ["a"]
  # Equal pooled score: the source matched by more tiles first, then the id.
  ids, pooled, matched, _ = M.rank_sources(np.array([[0, 2], [0, 3]]), np.array([[0.4, 0.4], [0.4, 0.4]]),
                                                 source, top=5)
  assert ids.tolist() == ["a", "b", "c"] and matched.tolist() == [2, 1, 1]
  np.testing.assert_allclose(pooled, [0.4, 0.2, 0.2])
  empty = M.rank_sources(np.full((2, 3), -1), np.full((2, 3), -np.inf), source, top=3)
  assert [len(x) for x in empty] == [0, 0, 0, 0]


# THUNDER's k-NN protocol, on BACH's labels: ours are Normal 0, Benign 1, InSitu 2, Invasive 3;
# THUNDER numbers the classes alphabetically (Benign 0, InSitu 1, Invasive 2, Normal 3) and
# breaks ties to its lowest id.
BACH_NAMES = ["Normal", "Benign", "InSitu", "Invasive"]
T_RETRIEVED = np.array([[0, 1, 1, 0],     # k=4: Normal 2, Benign 2 -> Benign (THUNDER 0 < 3)
                        [1, 1, 2, 2],
                        [3, 2, 3, 2],     # k=4: InSitu (1) beats Invasive (2)
                        [3, 0, 0, 3],     # k=4: Invasive (2) beats Normal (3)
                        [0, 3, -1, -1],   # two results: k=3 ties Normal/Invasive -> Invasive
                        [2, 0, 3, 2]])    # k=3: a three-way tie -> InSitu
T_TRUTH = np.array([0, 1, 2, 3, 3, 1])


def test_thunder_vote_breaks_ties_to_its_lowest_class_id():
  order = [1, 2, 3, 0]  # our ids in THUNDER's order
  assert M.lowest_id_vote(T_RETRIEVED, 1, order).tolist() == [0, 1, 3, 3, 0, 2]
  assert M.lowest_id_vote(T_RETRIEVED, 3, order).tolist() == [1, 1, 3, 0, 3, 2]
  assert M.lowest_id_vote(T_RETRIEVED, 4, order).tolist() == [1, 1, 2, 3, 3, 2]
  # Our own vote gives a tie to the closest result (q0 -> Normal), plain ids to the lowest id.
  assert M.majority_vote(T_RETRIEVED, 4)[0] == 0 and M.lowest_id_vote(T_RETRIEVED, 4)[0] == 0
  assert M.lowest_id_vote(np.array([[-1, -1]]), 2).tolist() == [-1]


def test_thunder_metrics_by_hand():
  got = M.thunder_metrics(T_RETRIEVED, T_TRUTH, BACH_NAMES, ks=(1, 3, 4, 10))
  assert "thunder/accuracy@10" not in got  # deeper than the results
  # k=1: predicted 0 1 3 3 0 2.  Recall per true class: Normal 1, Benign 1/2, InSitu 0, Invasive 1/2.
  # F1 = 2TP / (2TP + FP + FN): Normal 2/3, Benign 2/3, InSitu 0, Invasive 2/4.
  assert got["thunder/accuracy@1"] == pytest.approx(3 / 6)
  assert got["thunder/balanced_accuracy@1"] == pytest.approx((1 + 1 / 2 + 0 + 1 / 2) / 4)
  assert got["thunder/macro_f1@1"] == pytest.approx((2 / 3 + 2 / 3 + 0 + 1 / 2) / 4)
  # k=3: predicted 1 1 3 0 3 2: recalls 0, 1/2, 0, 1/2; F1 0, 1/2, 0, 1/2.
  assert got["thunder/accuracy@3"] == pytest.approx(2 / 6)
  assert got["thunder/balanced_accuracy@3"] == pytest.approx(1 / 4)
  assert got["thunder/macro_f1@3"] == pytest.approx(1 / 4)
  # k=4: predicted 1 1 2 3 3 2: recalls 0, 1/2, 1, 1; F1 0 (never predicted), 1/2, 2/3, 1.
  assert got["thunder/accuracy@4"] == pytest.approx(4 / 6)
  assert got["thunder/balanced_accuracy@4"] == pytest.approx(2.5 / 4)
  assert got["thunder/macro_f1@4"] == pytest.approx((0 + 1 / 2 + 2 / 3 + 1) / 4)


def test_thunder_vote_is_thunders_bincount_argmax():
  # A transcription of THUNDER's topk_retrieval vote on its own ids, on random ranked lists.
  rng = np.random.default_rng(0)
  retrieved = rng.integers(0, 4, (500, 10))
  to_thunder = np.array([3, 0, 1, 2])  # ours -> THUNDER's (alphabetical) id
  for k in M.THUNDER_KS:
    theirs = [int(np.bincount(to_thunder[row[:k]]).argmax()) for row in retrieved]
    ours = to_thunder[M.lowest_id_vote(retrieved, k, [1, 2, 3, 0])]
    assert ours.tolist() == theirs


def test_macro_f1_and_balanced_accuracy_edge_cases():
  # A label only predicted counts in macro-F1 with 0 but not in balanced accuracy (sklearn's rules);
  # -1 (no answer) is wrong for its query but no label of its own.
  truth, predicted = np.array([0, 0, 1]), np.array([0, 2, -1])
  assert M.balanced_accuracy(truth, predicted) == pytest.approx((1 / 2 + 0) / 2)
  assert M.macro_f1(truth, predicted) == pytest.approx((2 / 3 + 0 + 0) / 3)
