"""The pair query task: do two patches show the same tissue class?

Any embedding model answers it the same way: the cosine distance between the
two patches' embeddings is compared with a threshold chosen on labelled
validation pairs; below it means "same". The score is the c-index, the
fraction of pairs decided correctly.
"""

from __future__ import annotations

import numpy as np


def pair_distances(embeddings: np.ndarray, pairs: np.ndarray) -> np.ndarray:
  """Cosine distance (1 - cos) for each (i, j) row of `pairs` into `embeddings`."""
  e = np.asarray(embeddings, np.float32)
  e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
  return 1.0 - np.sum(e[pairs[:, 0]] * e[pairs[:, 1]], axis=1)


def decide(distances: np.ndarray, threshold: float) -> np.ndarray:
  """True ("same class") where the distance is at most the threshold."""
  return np.asarray(distances) <= threshold


def c_index(decisions: np.ndarray, same: np.ndarray) -> float:
  """Correct decisions / pairs."""
  decisions, same = np.asarray(decisions, bool), np.asarray(same, bool)
  if decisions.shape != same.shape or decisions.size == 0:
    raise ValueError(f"need equal, non-empty decision and label arrays, got {decisions.shape} and {same.shape}")
  return float(np.mean(decisions == same))


def choose_threshold(distances: np.ndarray, same: np.ndarray) -> float:
  """The threshold that decides the most validation pairs correctly.

  Candidates are the midpoints between consecutive distinct distances plus one
  below the smallest and one above the largest, so every possible split of
  the sorted pairs is tried once. Ties between equally good thresholds go to
  the smallest, the conservative choice: fewer pairs called "same".
  """
  d = np.asarray(distances, np.float64)
  same = np.asarray(same, bool)
  if d.size == 0:
    raise ValueError("no validation pairs to choose a threshold from")
  values = np.unique(d)
  candidates = np.concatenate([[values[0] - 1e-6], (values[:-1] + values[1:]) / 2, [values[-1] + 1e-6]])
  # Correct decisions for each candidate, without an O(pairs x candidates) matrix.
  order = np.argsort(d, kind="stable")
  d_sorted, same_sorted = d[order], same[order]
  called_same = np.searchsorted(d_sorted, candidates, side="right")  # pairs with d <= t
  same_below = np.concatenate([[0], np.cumsum(same_sorted)])[called_same]
  different_above = np.sum(~same) - (called_same - same_below)
  correct = same_below + different_above
  return float(candidates[int(np.argmax(correct))])
