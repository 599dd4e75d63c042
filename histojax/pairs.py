"""The pair query task: do two patches show the same tissue class?

Any embedding model answers it: the cosine similarity of the two patches'
embeddings is compared with a threshold chosen on labelled validation pairs
(`metrics.choose_pair_threshold`); at or above it means "same". The score
is the c-index, correct decisions / pairs (`metrics.pair_c_index`).

Pairs come from a pair-task dataset (`sources.read_pairs`): validation pairs
with answers over one split, query pairs over another, each patch named by
its source id. The query answers are usually hidden, so the reported c-index
is a held-out estimate on the validation pairs: the threshold is chosen on
one half and scored on the other, both ways.
"""

from __future__ import annotations

import numpy as np

from histojax import metrics

MAX_PAIR_ANCHORS = 20_000  # pairs per side for the c-index: plenty for 3 decimals, bounded memory


def similarities(embeddings: np.ndarray, ids: np.ndarray, pairs) -> np.ndarray:
  """Cosine similarity of each (id_a, id_b) pair, looked up by source id."""
  row = {str(i): r for r, i in enumerate(ids)}
  missing = sorted({p for pair in pairs for p in pair[:2] if str(p) not in row})
  if missing:
    raise KeyError(f"{len(missing)} pair ids are not in the exported split, e.g. {missing[:5]}")
  e = np.asarray(embeddings, np.float32)
  e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
  a = np.array([row[str(p[0])] for p in pairs])
  b = np.array([row[str(p[1])] for p in pairs])
  return np.sum(e[a] * e[b], axis=1)


def held_out_c_index(similarity: np.ndarray, same: np.ndarray, seed: int = 0) -> float:
  """Two-fold estimate: threshold from one random half, c-index on the other, averaged."""
  order = np.random.default_rng(seed).permutation(len(same))
  halves = np.array_split(order, 2)
  scores = []
  for fit, held in (halves, halves[::-1]):
    if len(fit) == 0 or len(held) == 0:
      continue
    threshold = metrics.choose_pair_threshold(similarity[fit], same[fit])
    scores.append(metrics.pair_c_index(similarity[held], same[held], threshold))
  return float(np.mean(scores)) if scores else float("nan")


def answer(validation_emb, validation_ids, query_emb, query_ids, pairs: dict, seed: int = 0):
  """Decides every query pair; returns (results dict, [(a, b, same 0/1), ...])."""
  validation = pairs.get("validation") or []
  if not validation:
    raise ValueError("the pair task needs validation pairs with answers to choose a threshold")
  val_sim = similarities(validation_emb, validation_ids, validation)
  val_same = np.array([bool(int(p[2])) for p in validation])
  threshold = metrics.choose_pair_threshold(val_sim, val_same)
  query = pairs.get("query") or []
  query_sim = similarities(query_emb, query_ids, query) if query else np.zeros(0)
  decisions = [(str(p[0]), str(p[1]), int(s >= threshold)) for p, s in zip(query, query_sim)]
  results = {
      "pair_task_threshold": float(threshold) if np.isfinite(threshold) else None,
      "pair_task_validation_c_index": metrics.pair_c_index(val_sim, val_same, threshold),
      "pair_task_held_out_c_index": held_out_c_index(val_sim, val_same, seed),
      "pair_task_validation_pairs": len(validation),
      "pair_task_query_pairs": len(query),
      "pair_task_query_same_fraction": float(np.mean([d[2] for d in decisions])) if decisions else None,
  }
  return results, decisions


# --- Balanced pairs from labelled exports (any split, any dataset) ----------------------

def sample_pairs(anchor, other, rng: np.random.Generator, same_split: bool,
                 max_anchors: int = MAX_PAIR_ANCHORS):
  """For each anchor row (at most `max_anchors`, drawn at random), one same-class and one
  other-class partner drawn from `other`, never from the anchor's own source image (nor
  the row itself): balanced pairs. Returns (similarity, same); an anchor whose class
  offers no partner is left out."""
  chosen = np.arange(len(anchor.label))
  if len(chosen) > max_anchors:
    chosen = np.sort(rng.choice(len(chosen), max_anchors, replace=False))
  sims, same = [], []
  for want_same in (True, False):
    partner = np.full(len(anchor.label), -1)
    for c in np.unique(anchor.label[chosen]):
      anchors = chosen[anchor.label[chosen] == c]
      pool = np.flatnonzero((other.label == c) == want_same)
      for _ in range(16 if len(pool) else 0):  # rejection rounds against own-source draws
        todo = anchors[partner[anchors] < 0]
        if not len(todo):
          break
        draw = pool[rng.integers(0, len(pool), len(todo))]
        ok = other.source_id[draw] != anchor.source_id[todo]
        if same_split:
          ok &= draw != todo
        partner[todo[ok]] = draw[ok]
    rows = np.flatnonzero(partner >= 0)
    sims.append(np.sum(anchor.embeddings[rows] * other.embeddings[partner[rows]], 1))
    same.append(np.full(len(rows), want_same))
  return np.concatenate(sims), np.concatenate(same)


def pair_metrics(gallery, query, seed: int = 0) -> dict:
  """c-index on balanced same/different pairs: the threshold is chosen on gallery-gallery
  pairs (labelled validation pairs), then applied to query-gallery pairs."""
  rng = np.random.default_rng(seed)
  val_sim, val_same = sample_pairs(gallery, gallery, rng, same_split=True)
  sim, same = sample_pairs(query, gallery, rng, same_split=query is gallery)
  if not len(val_sim) or not len(sim) or same.all() or not same.any():
    return {}
  threshold = metrics.choose_pair_threshold(val_sim, val_same)
  return {"pair_threshold": threshold if np.isfinite(threshold) else None,  # JSON has no infinity
          "pair_c_index": metrics.pair_c_index(sim, same, threshold),
          "pair_concordance": metrics.concordance_index(sim, same.astype(np.int64)), "num_pairs": int(len(sim))}
