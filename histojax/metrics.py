"""Retrieval metrics: pure numpy over ranked neighbour lists.

Conventions shared by every function here:
- `neighbors` is an int array [num_queries, k] of gallery row indices, best
  first; -1 marks "no result" (the gallery, after exclusions, ran out).
  `retrieved` is the same array mapped to gallery labels (`neighbor_labels`),
  -1 where there is no result.
- A retrieved item is *relevant* when its gallery label equals the query's.
- Averages are over queries, each query weighing the same ("micro"), unless
  the name says `macro` (mean over true classes of the per-class means) or
  `image` (one vote per source image, see `pooled_vote`).
- Labels are non-negative integers; -1 never counts as a label.

Pair metrics (`concordance_index`, `choose_pair_threshold`, `pair_c_index`)
score a similarity against a same/different truth per pair instead of a
ranked list.
"""

from __future__ import annotations

import numpy as np


# --- Own-source exclusion ----------------------------------------------------

def kept_columns(neighbors: np.ndarray, gallery_source: np.ndarray,
                 query_source: np.ndarray, k: int) -> np.ndarray:
  """Per query, the columns of `neighbors` that survive `drop_same_source`, in
  rank order, cut to `k` and padded with -1 (use them to carry scores along)."""
  valid = neighbors >= 0
  same = valid & (gallery_source[np.where(valid, neighbors, 0)] == query_source[:, None])
  keep = valid & ~same
  # A stable sort on "dropped" moves kept columns to the front in rank order.
  order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
  out = np.where(np.arange(order.shape[1])[None, :] < keep.sum(1, keepdims=True), order, -1)
  return np.pad(out, ((0, 0), (0, k - out.shape[1])), constant_values=-1).astype(np.int64)


def drop_same_source(neighbors: np.ndarray, gallery_source: np.ndarray,
                     query_source: np.ndarray, k: int) -> np.ndarray:
  """Removes results that come from the query's own source image.

  Patches of one photo are strongly correlated, so a query answered by its
  own photo's patches measures memorisation, not retrieval. The surviving
  results keep their order; rows are cut to `k` and padded with -1. Search
  with enough extra neighbours (see `max_shared_source`) for `k` to survive.
  """
  columns = kept_columns(neighbors, gallery_source, query_source, k)
  return np.where(columns >= 0, np.take_along_axis(neighbors, np.maximum(columns, 0), 1), -1)


def max_shared_source(gallery_source: np.ndarray, query_source: np.ndarray) -> int:
  """Most gallery rows any single query could lose to `drop_same_source`."""
  ids, counts = np.unique(gallery_source, return_counts=True)
  shared = np.isin(ids, np.unique(query_source))
  return int(counts[shared].max()) if shared.any() else 0


def neighbor_labels(neighbors: np.ndarray, gallery_labels: np.ndarray) -> np.ndarray:
  """Labels of the retrieved items; -1 where there is no result."""
  return np.where(neighbors >= 0, gallery_labels[np.maximum(neighbors, 0)], -1)


# --- Per-query ranking metrics -----------------------------------------------

def _relevance(retrieved: np.ndarray, query_labels: np.ndarray, k: int):
  retrieved = retrieved[:, :k]
  return retrieved == query_labels[:, None], retrieved >= 0


def precision_per_query(retrieved: np.ndarray, query_labels: np.ndarray, k: int) -> np.ndarray:
  """Per query: (relevant results in the top k) / (results in the top k).

  The denominator is the number of results actually returned (at most k), so
  a gallery smaller than k is not penalised for the slots it cannot fill. A
  query with no result scores 0.
  """
  relevant, present = _relevance(retrieved, query_labels, k)
  returned = present.sum(1)
  return np.where(returned > 0, relevant.sum(1) / np.maximum(returned, 1), 0.0)


def precision_at_k(retrieved: np.ndarray, query_labels: np.ndarray, k: int) -> float:
  """Mean over queries of `precision_per_query`."""
  return float(np.mean(precision_per_query(retrieved, query_labels, k)))


def hit_per_query(retrieved: np.ndarray, query_labels: np.ndarray, k: int) -> np.ndarray:
  """Per query: 1 if a relevant result is in the top k, else 0."""
  relevant, _ = _relevance(retrieved, query_labels, k)
  return relevant.any(1).astype(np.float64)


def accuracy_at_k(retrieved: np.ndarray, query_labels: np.ndarray, k: int) -> float:
  """Fraction of queries with at least one relevant result in the top k (hit@k).

  Also called recall@k in the metric-learning literature (a query is
  "recalled" when any relevant item is among its k nearest neighbours).
  """
  return float(np.mean(hit_per_query(retrieved, query_labels, k)))


def average_precision_at_k(retrieved: np.ndarray, query_labels: np.ndarray, k: int) -> np.ndarray:
  """Per-query AP@k = (1 / R) * sum_{i<=k, item i relevant} precision@i.

  R is the number of relevant items within the top k (the convention of the
  hashing and product-quantisation literature, e.g. mAP@1000 in SPQ); a query
  with no relevant result in the top k has AP 0.
  """
  relevant, _ = _relevance(retrieved, query_labels, k)
  hits = np.cumsum(relevant, axis=1)
  ranks = np.arange(1, relevant.shape[1] + 1)
  total = relevant.sum(1)
  return np.where(total > 0, (hits / ranks * relevant).sum(1) / np.maximum(total, 1), 0.0)


def map_at_k(retrieved: np.ndarray, query_labels: np.ndarray, k: int) -> float:
  """Mean of `average_precision_at_k` over queries."""
  return float(np.mean(average_precision_at_k(retrieved, query_labels, k)))


# --- Majority votes: per patch and per source image --------------------------

def _vote_tallies(retrieved: np.ndarray, k: int, num_labels: int):
  """Per query and label: votes in the top k, and the first rank (0-based) it reaches (k if never)."""
  top = retrieved[:, :k]
  is_label = top[:, :, None] == np.arange(num_labels)[None, None, :]  # [Q, k, L]
  first = np.where(is_label, np.arange(top.shape[1])[None, :, None], k).min(1)
  return is_label.sum(1), first


def _winner(counts: np.ndarray, first: np.ndarray, k: int) -> np.ndarray:
  """Most votes; among equal votes the earliest first appearance; then the lowest label id."""
  score = counts.astype(np.int64) * (k + 1) - first  # first <= k, so counts dominate
  return np.where(counts.max(1, initial=0) > 0, np.argmax(score, axis=1), -1)


def _num_labels(*arrays) -> int:
  return max(max((int(a.max(initial=-1)) for a in arrays), default=-1) + 1, 1)


def majority_vote(retrieved: np.ndarray, k: int) -> np.ndarray:
  """Per query, the label most frequent among its top-k results.

  Ties go to the tied label that appears first in the ranking (the closest
  result). A query with no result votes -1.
  """
  counts, first = _vote_tallies(retrieved, k, _num_labels(retrieved))
  return _winner(counts, first, k)


def majority_vote_at_k(retrieved: np.ndarray, query_labels: np.ndarray, k: int) -> float:
  """Fraction of queries whose `majority_vote` over the top k is their own label."""
  return float(np.mean(majority_vote(retrieved, k) == query_labels))


def pooled_vote(retrieved: np.ndarray, groups: np.ndarray, k: int):
  """One vote per group of queries (e.g. the patches of one source image).

  Every query of a group casts its top-k labels; the group's label is the one
  with the most votes in the pool. Ties go to the label reaching the earliest
  rank in any of the group's lists, then to the lowest label id. Returns
  (group ids sorted, voted label [G] (-1 for a group with no result),
  vote counts [G, num_labels]).
  """
  ids, inverse = np.unique(groups, return_inverse=True)
  num_labels = _num_labels(retrieved)
  counts, first = _vote_tallies(retrieved, k, num_labels)
  pooled = np.zeros((len(ids), num_labels), np.int64)
  np.add.at(pooled, inverse, counts)
  earliest = np.full((len(ids), num_labels), k, np.int64)
  np.minimum.at(earliest, inverse, first)
  return ids, _winner(pooled, earliest, k), pooled


def weighted_pooled_vote(retrieved: np.ndarray, scores: np.ndarray, groups: np.ndarray, k: int):
  """`pooled_vote` with each result weighted by its similarity instead of 1.

  A tile whose neighbours are all far (glass, fat, an odd field) then sways
  its photo's answer less than a tile with close matches. Similarities are
  shifted so the lowest used is 0 (cosine scores can be negative). Returns
  (group ids sorted, voted label [G], -1 for a group with no result).
  """
  top, weight = retrieved[:, :k], np.asarray(scores, np.float64)[:, :k]
  present = top >= 0
  if present.any():
    weight = weight - weight[present].min()
  ids, inverse = np.unique(groups, return_inverse=True)
  num_labels = _num_labels(retrieved)
  pooled = np.zeros((len(ids), num_labels))
  rows = np.broadcast_to(inverse[:, None], top.shape)
  np.add.at(pooled, (rows[present], top[present]), weight[present] + 1e-9)  # every result counts a little
  return ids, np.where(pooled.max(1, initial=0) > 0, np.argmax(pooled, axis=1), -1)


def source_centroids(embeddings: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(group ids sorted, the L2-normalised mean embedding of each group's rows)."""
  ids, inverse = np.unique(groups, return_inverse=True)
  sums = np.zeros((len(ids), embeddings.shape[1]), np.float64)
  np.add.at(sums, inverse, embeddings)
  return ids, sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)


def centroid_vote(query_emb: np.ndarray, query_groups: np.ndarray, gallery_emb: np.ndarray,
                  gallery_groups: np.ndarray, gallery_labels: np.ndarray, k: int):
  """One answer per query source from whole-source similarity: each query source's
  mean embedding against each gallery source's, top-k gallery sources' majority vote.

  A gallery source that is also a query source is never its own neighbour.
  Returns (query group ids sorted, voted label [G]).
  """
  q_ids, q_centroids = source_centroids(query_emb, query_groups)
  g_ids, g_centroids = source_centroids(gallery_emb, gallery_groups)
  _, g_labels = group_labels(gallery_labels, gallery_groups)
  similarity = q_centroids @ g_centroids.T
  similarity[q_ids[:, None] == g_ids[None, :]] = -np.inf
  order = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
  ranked = np.where(np.take_along_axis(similarity, order, 1) > -np.inf, g_labels[order], -1)
  return q_ids, majority_vote(ranked, min(k, ranked.shape[1]))


def rank_sources(neighbors: np.ndarray, scores: np.ndarray, gallery_source: np.ndarray, top: int):
  """Gallery source images (photos, slides) ranked for one query image by pooled similarity.

  `neighbors`/`scores` [T, k] are the top-k gallery rows of the query's T tiles
  (-1 past the gallery's end). A source's score is the mean over the T tiles of
  the best score any of its patches reached in that tile's top k, a tile whose
  top k holds none of its patches adding 0:

      score(s) = (1/T) * sum_t max{score[t, r] : source(neighbors[t, r]) == s}

  Why this pooling: "which cases look like this one" asks for a source that
  resembles the whole query, so a source matching every region beats one
  matching a single region very well (the mean over tiles); and only each
  tile's best hit counts, so a large slide with many near-identical patches
  does not outrank a small photo by patch count alone (max, not sum).
  Ties: more tiles matched first, then the source id.

  Returns (source ids [m], scores [m] float64, tiles matched [m], a gallery row
  of each source [m] (its best hit, to read its label)), best first, m <= top.
  """
  neighbors = np.asarray(neighbors)
  scores = np.asarray(scores, np.float64)
  found = neighbors >= 0
  if neighbors.shape[0] == 0 or not found.any():
    return np.zeros(0, np.asarray(gallery_source).dtype), np.zeros(0), np.zeros(0, np.int64), np.zeros(0, np.int64)
  tile, rank = np.nonzero(found)
  rows = neighbors[tile, rank]
  ids, source = np.unique(np.asarray(gallery_source)[rows], return_inverse=True)
  best = np.full((len(ids), neighbors.shape[0]), -np.inf)
  np.maximum.at(best, (source, tile), scores[tile, rank])
  matched = np.isfinite(best)
  pooled = np.where(matched, best, 0.0).sum(1) / neighbors.shape[0]
  hits = matched.sum(1)
  order = np.lexsort((ids, -hits, -pooled))[:top]
  # The row of each source's best hit, for its label.
  hit_score = scores[tile, rank]
  best_row = np.zeros(len(ids), np.int64)
  for i in order:
    mine = source == i
    best_row[i] = rows[mine][np.argmax(hit_score[mine])]
  return ids[order], pooled[order], hits[order].astype(np.int64), best_row[order]


def only_rows(neighbors: np.ndarray, keep: np.ndarray) -> np.ndarray:
  """`neighbors` with every gallery row that `keep` (a bool per gallery row) leaves out set to
  -1 (to rank one kind of source, slides or photos, over the same top-k lists)."""
  neighbors = np.asarray(neighbors)
  return np.where((neighbors >= 0) & np.asarray(keep)[np.maximum(neighbors, 0)], neighbors, -1)


def drop_rows(neighbors: np.ndarray, scores: np.ndarray, dropped: np.ndarray, k: int):
  """Results whose gallery row is `dropped` (a bool per gallery row: the query's own slide or
  patient) taken out; the rest keep their order, cut to `k` and padded with -1 / -inf.
  Search with k + dropped.sum() neighbours for `k` to survive."""
  neighbors, scores = np.asarray(neighbors), np.asarray(scores)
  gone = (neighbors >= 0) & np.asarray(dropped)[np.maximum(neighbors, 0)]
  kept = (neighbors >= 0) & ~gone
  order = np.argsort(~kept, axis=1, kind="stable")[:, :k]  # kept columns first, in rank order
  valid = np.take_along_axis(kept, order, 1)
  out_n = np.where(valid, np.take_along_axis(neighbors, order, 1), -1)
  out_s = np.where(valid, np.take_along_axis(scores, order, 1), -np.inf)
  pad = ((0, 0), (0, k - out_n.shape[1]))
  return (np.pad(out_n, pad, constant_values=-1).astype(np.int64),
          np.pad(out_s, pad, constant_values=-np.inf).astype(np.float32))


def matched_rows(neighbors: np.ndarray, scores: np.ndarray, gallery_source: np.ndarray, source) -> tuple:
  """The gallery rows of `source` found in any of the query's top-k lists, each with the best
  score it reached, best first (a result slide's matched regions). Returns (rows, scores)."""
  neighbors, scores = np.asarray(neighbors), np.asarray(scores, np.float64)
  found = neighbors >= 0
  mine = found & (np.asarray(gallery_source)[np.maximum(neighbors, 0)] == source)
  rows, best = np.unique(neighbors[mine]), np.full(0, 0.0)
  if len(rows):
    best = np.full(len(rows), -np.inf)
    np.maximum.at(best, np.searchsorted(rows, neighbors[mine]), scores[mine])
  order = np.lexsort((rows, -best))
  return rows[order].astype(np.int64), best[order]


def group_labels(labels: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(group ids sorted, each group's most frequent label; ties to the lowest id).

  A source image's label is its patches' label; datasets with one label per
  photo (BACH, Kimia Path24) have no ties.
  """
  ids, inverse = np.unique(groups, return_inverse=True)
  counts = np.zeros((len(ids), _num_labels(labels)), np.int64)
  np.add.at(counts, (inverse, labels), 1)
  return ids, np.argmax(counts, axis=1)


def image_majority_vote_at_k(retrieved: np.ndarray, query_labels: np.ndarray,
                             query_source: np.ndarray, k: int) -> float:
  """Fraction of query source images whose `pooled_vote` over all their patches' top k
  equals the image's label (`group_labels`). Each image weighs the same."""
  _, voted, _ = pooled_vote(retrieved, query_source, k)
  _, truth = group_labels(query_labels, query_source)
  return float(np.mean(voted == truth))


# --- Per class, macro, confusion, Kimia Path24 -------------------------------

def per_class_mean(values: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
  """Mean of a per-query value over the queries of each true class; NaN for a class with no query."""
  sums = np.bincount(labels, weights=values, minlength=num_classes)[:num_classes]
  counts = np.bincount(labels, minlength=num_classes)[:num_classes]
  return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def macro_average(values: np.ndarray, labels: np.ndarray) -> float:
  """Mean over the true classes present among the queries of `per_class_mean`.

  Every class weighs the same however many queries it has, so a rare class
  retrieved badly is not hidden by a common one retrieved well.
  """
  per_class = per_class_mean(values, labels, _num_labels(labels))
  return float(np.nanmean(per_class))


def confusion_matrix(true_labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
  """Counts [true, predicted]; the last column counts predictions of -1 (no result)."""
  matrix = np.zeros((num_classes, num_classes + 1), np.int64)
  np.add.at(matrix, (true_labels, np.where(predicted >= 0, predicted, num_classes)), 1)
  return matrix


def kimia_eta(predicted: np.ndarray, true_labels: np.ndarray) -> dict[str, float]:
  """Kimia Path24 accuracies (Babaie et al., CVPR-W 2017).

  eta_p = |correct| / n_tot, the patch-to-scan accuracy over all test patches;
  eta_w = (1 / |classes|) * sum_s |correct in s| / |patches of s|, the mean over
  true classes (whole scans) of per-class accuracy; eta_total = eta_p * eta_w.
  The paper's "retrieved class" is the top-1 result's; `predicted` may be any
  per-query decision (e.g. `majority_vote` at k).
  """
  correct = (predicted == true_labels).astype(np.float64)
  eta_p = float(np.mean(correct))
  eta_w = macro_average(correct, true_labels)
  return {"eta_p": eta_p, "eta_w": eta_w, "eta_total": eta_p * eta_w}


# --- Pairs: same / different decisions ----------------------------------------

def concordance_index(scores: np.ndarray, targets: np.ndarray) -> float:
  """Harrell's c-index: over pairs (i, j) with targets[i] > targets[j], the
  fraction with scores[i] > scores[j], score ties counting 1/2.

  With a binary target (same class = 1) and similarity as score, it is the
  probability that a random same-class pair is more similar than a random
  different-class pair (ROC AUC). O(T n log n) for T distinct targets.
  NaN when no pair is comparable.
  """
  scores, targets = np.asarray(scores, np.float64), np.asarray(targets)
  levels = np.unique(targets)
  if len(levels) < 2:
    return float("nan")
  concordant, comparable = 0.0, 0
  below = np.sort(scores[targets == levels[0]])
  for level in levels[1:]:
    current = scores[targets == level]
    lower = np.searchsorted(below, current, side="left")
    tied = np.searchsorted(below, current, side="right") - lower
    concordant += float(lower.sum()) + 0.5 * float(tied.sum())
    comparable += len(current) * len(below)
    below = np.sort(np.concatenate([below, current]))
  return concordant / comparable if comparable else float("nan")


def choose_pair_threshold(similarity: np.ndarray, same: np.ndarray) -> float:
  """Similarity threshold maximising correct decisions on labelled pairs.

  A pair is decided "same" when similarity >= threshold. Candidates are the
  midpoints between consecutive distinct similarities, plus -inf (all same)
  and +inf (all different); the lowest best candidate wins ties. Choose it on
  validation pairs and apply it to held-out pairs with `pair_c_index`.
  """
  similarity, same = np.asarray(similarity, np.float64), np.asarray(same, bool)
  if similarity.size == 0:
    raise ValueError("choose_pair_threshold needs at least one labelled pair")
  values = np.unique(similarity)
  # Threshold at values[j]: pairs with similarity >= values[j] are called same.
  below_same = np.searchsorted(np.sort(similarity[same]), values, side="left")
  below_diff = np.searchsorted(np.sort(similarity[~same]), values, side="left")
  correct = np.append((same.sum() - below_same) + below_diff, (~same).sum())  # last: +inf
  best = int(np.argmax(correct))
  if best == 0:
    return float("-inf")
  if best == len(values):
    return float("inf")
  return float((values[best - 1] + values[best]) / 2)


def pair_c_index(similarity: np.ndarray, same: np.ndarray, threshold: float) -> float:
  """Correct same/different decisions / pairs, deciding "same" when similarity >= threshold.

  The pair-query task's c-index (correct decisions over all query pairs).
  """
  decided = np.asarray(similarity) >= threshold
  return float(np.mean(decided == np.asarray(same, bool)))


# --- THUNDER's k-NN protocol ---------------------------------------------------
# As MICS-Lab/thunder scores retrieval (tasks/image_retrieval.py `topk_retrieval`, metrics from
# utils/downstream_metrics.py `compute_metrics`, i.e. sklearn): each query takes the labels of its
# k most similar gallery rows and predicts `np.bincount(labels).argmax()`, so a tie goes to the
# lowest class id in THUNDER's numbering, which for BACH is alphabetical (Benign 0, InSitu 1,
# Invasive 2, Normal 3), not our builder's label order. Reported at k = 1, 3, 5, 10 as accuracy,
# balanced accuracy and macro-F1 of those predictions.

THUNDER_KS = (1, 3, 5, 10)


def lowest_id_vote(retrieved: np.ndarray, k: int, order=None) -> np.ndarray:
  """Per query, the label most frequent among its top k; ties to the label earliest in `order`
  (label ids, lowest THUNDER id first; default ascending ids). -1 results do not vote; a query
  with no result predicts -1."""
  num = max(_num_labels(retrieved), 0 if order is None else len(order))
  order = np.arange(num) if order is None else np.asarray(order, np.int64)
  counts, _ = _vote_tallies(retrieved, k, num)
  in_order = counts[:, order]
  return np.where(in_order.max(1, initial=0) > 0, order[np.argmax(in_order, axis=1)], -1)


def balanced_accuracy(truth: np.ndarray, predicted: np.ndarray) -> float:
  """Mean over the labels present in `truth` of their recall (sklearn's balanced_accuracy_score)."""
  truth, predicted = np.asarray(truth), np.asarray(predicted)
  return float(np.mean([np.mean(predicted[truth == c] == c) for c in np.unique(truth)]))


def macro_f1(truth: np.ndarray, predicted: np.ndarray) -> float:
  """Mean over labels in `truth` or `predicted` (-1, no answer, excluded) of 2TP / (2TP + FP + FN)
  (sklearn's f1_score(average="macro"): a label only ever predicted scores 0)."""
  truth, predicted = np.asarray(truth), np.asarray(predicted)
  labels = np.unique(np.concatenate([truth, predicted[predicted >= 0]]))
  scores = []
  for c in labels:
    tp = np.sum((predicted == c) & (truth == c))
    wrong = np.sum((predicted == c) != (truth == c))  # FP + FN
    scores.append(2 * tp / (2 * tp + wrong))
  return float(np.mean(scores))


def thunder_metrics(retrieved: np.ndarray, query_labels: np.ndarray, class_names=None, ks=THUNDER_KS,
                    order=None) -> dict:
  """`thunder/{accuracy,balanced_accuracy,macro_f1}@k` of `lowest_id_vote` for each k in `ks`
  that `retrieved` is deep enough for. Ties follow `order`, else the alphabetical order of
  `class_names` (THUNDER's and torchvision ImageFolder's ids), else ascending label ids."""
  if order is None and class_names is not None:
    order = np.argsort(np.asarray(class_names, dtype=str), kind="stable")
  out = {}
  for k in (k for k in ks if k <= retrieved.shape[1]):
    predicted = lowest_id_vote(retrieved, k, order)
    out[f"thunder/accuracy@{k}"] = float(np.mean(predicted == query_labels))
    out[f"thunder/balanced_accuracy@{k}"] = balanced_accuracy(query_labels, predicted)
    out[f"thunder/macro_f1@{k}"] = macro_f1(query_labels, predicted)
  return out


# --- Everything at once -------------------------------------------------------

FAMILIES = ("precision", "accuracy", "map", "majority_vote")


def _per_query(family: str, retrieved, query_labels, k) -> np.ndarray:
  if family == "precision":
    return precision_per_query(retrieved, query_labels, k)
  if family == "accuracy":
    return hit_per_query(retrieved, query_labels, k)
  if family == "map":
    return average_precision_at_k(retrieved, query_labels, k)
  return (majority_vote(retrieved, k) == query_labels).astype(np.float64)


def retrieval_metrics(neighbors: np.ndarray, gallery_labels: np.ndarray,
                      query_labels: np.ndarray, ks, query_source: np.ndarray | None = None,
                      class_names=None) -> dict:
  """Flat dict of every ranking metric for each k.

  Keys: `<family>@k` (micro, over queries) and `macro/<family>@k` for family in
  precision, accuracy, map, majority_vote; `image_majority_vote@k` when
  `query_source` is given; `eta_p@k`, `eta_w@k`, `eta_total@k` (Kimia, on the
  majority vote at k; at k=1 the top-1 label as in the paper). With
  `class_names`, `per_class` maps each class name to its `<family>@k` values.
  """
  retrieved = neighbor_labels(neighbors, gallery_labels)
  num_classes = len(class_names) if class_names is not None else _num_labels(query_labels, gallery_labels)
  out, per_class = {}, {}
  for k in ks:
    if k > neighbors.shape[1]:
      raise ValueError(f"metric at k={k} needs at least {k} neighbours, got {neighbors.shape[1]}")
    for family in FAMILIES:
      values = _per_query(family, retrieved, query_labels, k)
      out[f"{family}@{k}"] = float(np.mean(values))
      out[f"macro/{family}@{k}"] = macro_average(values, query_labels)
      per_class[f"{family}@{k}"] = per_class_mean(values, query_labels, num_classes)
    if query_source is not None:
      out[f"image_majority_vote@{k}"] = image_majority_vote_at_k(retrieved, query_labels, query_source, k)
    for name, value in kimia_eta(majority_vote(retrieved, k), query_labels).items():
      out[f"{name}@{k}"] = value
  if class_names is not None:
    out["per_class"] = {name: {key: _json_float(v[c]) for key, v in per_class.items()}
                        for c, name in enumerate(class_names)}
  return out


def _json_float(value: float) -> float | None:
  """NaN (a class with no query) as None, which JSON can hold."""
  return None if np.isnan(value) else float(value)
