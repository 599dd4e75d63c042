"""Embedding health: how widely a set of unit embeddings spreads over the sphere.

A retrieval model can rank well and still export a collapsed gallery: every
row in one narrow cone, every neighbour score 0.9998-1.0000. Ranks then rest
on the fourth decimal, a quantised index (ScaNN AH, PQ) loses them, and a
score on the page says nothing about how good a match is. Every export
records its spread (`spread`), and evaluation and index build/load warn when
it is collapsed (`warn`).

Two numbers, both pure numpy:
- `mean_norm`: the norm of the mean unit embedding. Its square is the mean
  cosine similarity over all ordered pairs (self-pairs included), so 1 means
  every row is the same direction and 0 means no shared direction; n random
  directions give about 1/sqrt(n). Above `COLLAPSE_ABOVE` (0.9: mean cosine
  0.81) the set is reported collapsed.
- `effective_dim`: the participation ratio of the covariance of the unit rows,
  (sum of eigenvalues)^2 / sum of squared eigenvalues = trace(C)^2 / ||C||_F^2
  (Gao et al. 2017; Recanatesi et al. 2019). d for variance spread evenly over
  d directions, 1 for variance along a single direction. It is blind to the
  mean: it says how many directions the rows vary in around it, which is why
  both numbers are recorded.
"""

from __future__ import annotations

import warnings

import numpy as np

from histojax import metrics

COLLAPSE_ABOVE = 0.9
MAX_ROWS = 20_000  # covariance from at most this many rows (evenly strided): O(rows d^2) per export
CHUNK = 65_536  # rows normalised at a time: a 1M x 1536 export is never copied whole
DEFINITION = ("mean_norm: norm of the mean unit embedding (its square is the mean pairwise cosine); "
              "effective_dim: participation ratio trace(C)^2 / ||C||_F^2 of the unit rows' covariance C")


class CollapsedEmbeddingWarning(UserWarning):
  """A gallery whose unit embeddings share one direction (norm of their mean > COLLAPSE_ABOVE)."""


def _check(embeddings) -> np.ndarray:
  x = np.asarray(embeddings)
  if x.ndim != 2 or not len(x) or not x.shape[1]:
    raise ValueError(f"embeddings must be a non-empty [n, d] array, got shape {x.shape}")
  return x


def unit_rows(embeddings: np.ndarray) -> np.ndarray:
  """float32 rows scaled to unit norm (zero rows stay zero)."""
  x = np.asarray(embeddings, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def mean_norm(embeddings: np.ndarray) -> float:
  """Norm of the mean of the L2-normalised rows, in [0, 1]."""
  x = _check(embeddings)
  total = np.zeros(x.shape[1], np.float64)
  for start in range(0, len(x), CHUNK):
    total += unit_rows(x[start:start + CHUNK]).sum(0, dtype=np.float64)
  return float(np.linalg.norm(total / len(x)))


def effective_dim(embeddings: np.ndarray, max_rows: int = MAX_ROWS) -> float | None:
  """Participation ratio of the unit rows' covariance; None below 2 rows or without variance.

  Rows beyond `max_rows` are thinned by an even stride (deterministic), so a
  1M-row export costs what a 20k-row one does.
  """
  x = _check(embeddings)
  if len(x) > max_rows:
    x = x[np.linspace(0, len(x) - 1, max_rows).astype(np.int64)]
  if len(x) < 2:
    return None
  x = unit_rows(x)
  x = x - x.mean(0, dtype=np.float64).astype(np.float32)
  # C = X^T X / (n - 1); its trace and Frobenius norm need no eigendecomposition, and the
  # smaller of X^T X and X X^T has the same non-zero eigenvalues.
  gram = (x.T @ x if x.shape[1] <= x.shape[0] else x @ x.T).astype(np.float64)
  trace, frobenius2 = float(np.trace(gram)), float(np.sum(gram * gram))
  return None if frobenius2 <= 0 else trace * trace / frobenius2


def spread(embeddings: np.ndarray) -> dict:
  """What an export manifest records: {mean_norm, effective_dim, dim, rows, collapsed, definition}."""
  x = np.asarray(embeddings)
  norm = mean_norm(x)
  dim = effective_dim(x)
  return {"mean_norm": round(norm, 6), "effective_dim": None if dim is None else round(dim, 3),
          "dim": int(x.shape[1]), "rows": int(x.shape[0]), "collapsed": bool(norm > COLLAPSE_ABOVE),
          "definition": DEFINITION}


def message(record: dict | None, what: str) -> str | None:
  """The warning for a collapsed `spread` record, or None (healthy, or no record: an old manifest)."""
  if not record or record.get("mean_norm") is None or record["mean_norm"] <= COLLAPSE_ABOVE:
    return None
  dim = record.get("effective_dim")
  return (f"{what}: collapsed embeddings: the norm of the mean unit embedding is {record['mean_norm']:.4f} "
          f"(> {COLLAPSE_ABOVE}; mean pairwise cosine {record['mean_norm'] ** 2:.4f})"
          + ("" if dim is None else f", effective dimension {dim:.1f} of {record.get('dim')}")
          + ". Neighbour scores crowd near 1 and say little about match quality, and quantised "
            "search (tree_ah, PQ) loses ranks. A trained model: retrain with a head that centres its "
            "features (cgd: model.head.descriptor_norm='batch_norm'); imported weights: check the preset's "
            "normalisation and feature against its model card (random or wrongly mapped weights look like this).")


def warn(record: dict | None, what: str) -> str | None:
  """Issues `CollapsedEmbeddingWarning` when `record` is collapsed; returns the message (or None)."""
  text = message(record, what)
  if text is not None:
    warnings.warn(text, CollapsedEmbeddingWarning, stacklevel=2)
  return text


def score_separation(scores: np.ndarray, relevant: np.ndarray, decimals: int = 3) -> dict:
  """How the scores of retrieved results read: do they tell good matches from poor ones?

  `scores` [n, k] (non-finite where there is no result), `relevant` [n, k]
  (same label as the query). Returns the mean score of relevant and of other
  results and their gap, the range, the fraction that print as 1 at
  `decimals` (the page shows 3), and the concordance of score with relevance
  (ROC AUC; blind to scale, so a collapsed set can rank well and still print
  "1.000" for every result: the gap and range are what a reader sees).
  """
  scores, relevant = np.asarray(scores, np.float64), np.asarray(relevant, bool)
  found = np.isfinite(scores)
  s, r = scores[found], relevant[found]
  if not len(s):
    return {"results": 0}
  mean = lambda v: float(v.mean()) if len(v) else None
  good, poor = mean(s[r]), mean(s[~r])
  return {"results": int(len(s)), "relevant_mean": good, "other_mean": poor,
          "gap": None if good is None or poor is None else good - poor,
          "min": float(s.min()), "max": float(s.max()),
          "shown_as_one": float(np.mean(np.round(s, decimals) >= 1.0)),
          "concordance": metrics.concordance_index(s, r.astype(np.int8))}


def summary(record: dict) -> str:
  """One line for the printed table: the gallery's spread and how the top-k scores read."""
  g, sep = record.get("gallery") or {}, record.get("scores") or {}
  line = "embedding health: gallery norm of mean " + (
      "not recorded" if g.get("mean_norm") is None else
      f"{g['mean_norm']:.4f}{' (COLLAPSED: above %s)' % COLLAPSE_ABOVE if g.get('collapsed') else ''}, "
      f"effective dimension {g.get('effective_dim') or float('nan'):.1f} of {g.get('dim')}")
  if sep.get("results"):
    fmt = lambda v: "-" if v is None else f"{v:.4f}"
    line += (f"; top-{record.get('k')} scores {sep['min']:.4f}..{sep['max']:.4f}, same class {fmt(sep['relevant_mean'])}"
             f" vs other {fmt(sep['other_mean'])}, {100 * sep['shown_as_one']:.0f}% print as 1.000")
  return line


def evaluation_record(gallery_embeddings: np.ndarray, gallery_record: dict | None, neighbors, scores,
                      gallery_labels: np.ndarray, query_labels: np.ndarray, k: int) -> dict:
  """metrics.json's `health`: the gallery's spread (as its export recorded it, else measured now)
  and, for labelled retrieval, how the top-k scores separate same-class from other results."""
  out = {"gallery": gallery_record or spread(gallery_embeddings), "k": int(k)}
  if neighbors is not None:
    neighbors = np.asarray(neighbors)[:, :k]
    relevant = (neighbors >= 0) & (np.asarray(gallery_labels)[np.maximum(neighbors, 0)] == np.asarray(query_labels)[:, None])
    out["scores"] = score_separation(np.asarray(scores)[:, :k], relevant)
  return out
