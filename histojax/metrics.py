"""Retrieval metrics: pure numpy over ranked neighbour lists.

Conventions shared by every function here:
- `neighbors` is an int array [num_queries, k] of gallery row indices, best
  first; -1 marks "no result" (the gallery, after exclusions, ran out).
- A retrieved item is *relevant* when its gallery label equals the query's.
- Averages are over queries, each query weighing the same.
"""

from __future__ import annotations

import numpy as np


def drop_same_source(neighbors: np.ndarray, gallery_source: np.ndarray,
                     query_source: np.ndarray, k: int) -> np.ndarray:
  """Removes results that come from the query's own source image.

  Patches of one photo are strongly correlated, so a query answered by its
  own photo's patches measures memorisation, not retrieval. The surviving
  results keep their order; rows are cut to `k` and padded with -1. Search
  with enough extra neighbours (see `max_shared_source`) for `k` to survive.
  """
  valid = neighbors >= 0
  same = valid & (gallery_source[np.where(valid, neighbors, 0)] == query_source[:, None])
  keep = valid & ~same
  # A stable sort on "dropped" moves kept results to the front in rank order.
  order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
  compact = np.take_along_axis(neighbors, order, axis=1)
  out = np.where(np.arange(order.shape[1])[None, :] < keep.sum(1, keepdims=True), compact, -1)
  return np.pad(out, ((0, 0), (0, k - out.shape[1])), constant_values=-1).astype(np.int64)


def max_shared_source(gallery_source: np.ndarray, query_source: np.ndarray) -> int:
  """Most gallery rows any single query could lose to `drop_same_source`."""
  ids, counts = np.unique(gallery_source, return_counts=True)
  shared = np.isin(ids, np.unique(query_source))
  return int(counts[shared].max()) if shared.any() else 0


def neighbor_labels(neighbors: np.ndarray, gallery_labels: np.ndarray) -> np.ndarray:
  """Labels of the retrieved items; -1 where there is no result."""
  return np.where(neighbors >= 0, gallery_labels[np.maximum(neighbors, 0)], -1)


def _relevance(retrieved: np.ndarray, query_labels: np.ndarray, k: int):
  retrieved = retrieved[:, :k]
  return retrieved == query_labels[:, None], retrieved >= 0


def precision_at_k(retrieved: np.ndarray, query_labels: np.ndarray, k: int) -> float:
  """Mean over queries of (relevant results in the top k) / (results in the top k).

  The denominator is the number of results actually returned (at most k), so
  a gallery smaller than k is not penalised for the slots it cannot fill. A
  query with no result scores 0.
  """
  relevant, present = _relevance(retrieved, query_labels, k)
  returned = present.sum(1)
  return float(np.mean(np.where(returned > 0, relevant.sum(1) / np.maximum(returned, 1), 0.0)))


def accuracy_at_k(retrieved: np.ndarray, query_labels: np.ndarray, k: int) -> float:
  """Fraction of queries with at least one relevant result in the top k (hit@k)."""
  relevant, _ = _relevance(retrieved, query_labels, k)
  return float(np.mean(relevant.any(1)))


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


def majority_vote(retrieved: np.ndarray, k: int) -> np.ndarray:
  """Per query, the label most frequent among its top-k results.

  Ties go to the tied label that appears first in the ranking (the closest
  result). A query with no result votes -1.
  """
  top = retrieved[:, :k]
  num_labels = max(int(top.max(initial=-1)) + 1, 1)
  is_label = top[:, :, None] == np.arange(num_labels)[None, None, :]  # [Q, k, L]
  counts = is_label.sum(1)
  first = np.where(is_label, np.arange(top.shape[1])[None, :, None], top.shape[1]).min(1)
  # More votes wins; among equal votes the earlier first appearance wins.
  score = counts * (top.shape[1] + 1) - first
  return np.where(counts.max(1) > 0, np.argmax(score, axis=1), -1)


def majority_vote_at_k(retrieved: np.ndarray, query_labels: np.ndarray, k: int) -> float:
  """Fraction of queries whose `majority_vote` over the top k is their own label."""
  return float(np.mean(majority_vote(retrieved, k) == query_labels))


def retrieval_metrics(neighbors: np.ndarray, gallery_labels: np.ndarray,
                      query_labels: np.ndarray, ks) -> dict[str, float]:
  """Flat dict: precision@k, accuracy@k, map@k and majority_vote@k for each k."""
  retrieved = neighbor_labels(neighbors, gallery_labels)
  out = {}
  for k in ks:
    if k > neighbors.shape[1]:
      raise ValueError(f"metric at k={k} needs at least {k} neighbours, got {neighbors.shape[1]}")
    out[f"precision@{k}"] = precision_at_k(retrieved, query_labels, k)
    out[f"accuracy@{k}"] = accuracy_at_k(retrieved, query_labels, k)
    out[f"map@{k}"] = map_at_k(retrieved, query_labels, k)
    out[f"majority_vote@{k}"] = majority_vote_at_k(retrieved, query_labels, k)
  return out
