"""Slide galleries at archive scale with synthetic embeddings: slide-query latency and index bytes
per slide (run from `bench.slides --latency_slides ...`).

A gallery of N slides holds, per slide, a mosaic's worth of rows (Poisson around the rows per
slide measured on the fixture slides) of unit embeddings: 4 classes, each slide a point near
its class's centre, each row near its slide's. A query is one gallery slide's rows with fresh
noise (a re-scan of it, as it were), searched as `search --slides` searches after embedding
(`slide_query.answer_slide`): its own slide taken out of every list (`metrics.drop_rows`, k +
its rows searched), then the top slides pooled with their regions (`query.slide_ranking`).
Times are per query slide, medians, embedding excluded (the embed stage is timed on its own).

Index bytes per slide are the index folder as `writer.save` writes it (the searcher's arrays
and rows.npz with slide ids, cases and regions) over N.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import numpy as np

from histojax import indexing, metrics, query
from histojax.indexing import writer

CLASSES = 4


def synthetic_gallery(slides: int, rows_per_slide: float, dim: int, seed: int = 0):
  """(embeddings [n, dim] unit float32, rows dict as the index keeps them, slide centres)."""
  rng = np.random.default_rng(seed)
  counts = rng.poisson(max(rows_per_slide - 1, 0), slides) + 1
  classes = rng.normal(size=(CLASSES, dim))
  label = rng.integers(0, CLASSES, slides)
  centres = classes[label] + 0.8 * rng.normal(size=(slides, dim))
  owner = np.repeat(np.arange(slides), counts)
  emb = centres[owner] + 0.6 * rng.normal(size=(len(owner), dim))
  emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
  xy = rng.integers(0, 100_000, (len(owner), 2))
  rows = {"label": label[owner].astype(np.int64), "source_id": np.char.add("slide_", owner.astype(str)),
          "coords": xy[:, ::-1].astype(np.int32), "case_id": np.char.add("case_", (owner // 2).astype(str)),
          "region": np.column_stack([xy, np.full((len(owner), 2), 448)]).astype(np.int32)}
  return emb, rows, centres


def query_times(idx, emb: np.ndarray, rows: dict, k: int, queries: int, seed: int = 1) -> dict:
  rng = np.random.default_rng(seed)
  is_slide = np.ones(len(emb), bool)
  slides = np.unique(rows["source_id"])
  search_s, pool_s, found_own = [], [], 0
  for slide in rng.choice(slides, queries, replace=False):
    mine = rows["source_id"] == slide
    q = emb[mine] + 0.02 * rng.normal(size=(mine.sum(), emb.shape[1])).astype(np.float32)
    start = time.perf_counter()
    neighbors, scores = metrics.drop_rows(*indexing.search(idx, q, k + int(mine.sum())), mine, k)
    middle = time.perf_counter()
    ranked = query.slide_ranking(rows, is_slide, neighbors, scores, str)
    pool_s.append(time.perf_counter() - middle)
    search_s.append(middle - start)
    found_own += any(s["slide_id"] == slide for s in ranked)
  assert found_own == 0, "a query slide answered itself"
  return {"search_ms_median": round(1e3 * statistics.median(search_s), 3),
          "pool_ms_median": round(1e3 * statistics.median(pool_s), 3),
          "total_ms_median": round(1e3 * statistics.median(np.add(search_s, pool_s)), 3),
          "total_ms_p90": round(1e3 * float(np.percentile(np.add(search_s, pool_s), 90)), 3),
          "total_ms_min": round(1e3 * float(np.min(np.add(search_s, pool_s))), 3),  # the least disturbed by load
          "query_rows_mean": round(float(np.mean([(rows["source_id"] == s).sum() for s in slides[:200]])), 1)}


def recall(approx, exact, emb: np.ndarray, rows: dict, k: int, queries: int, seed: int = 2) -> float:
  """Recall@k of `approx`'s patch neighbours against exact search, on query slides' rows."""
  rng = np.random.default_rng(seed)
  picks = rng.choice(len(emb), min(queries * 12, len(emb)), replace=False)
  a, _ = indexing.search(approx, emb[picks], k)
  e, _ = indexing.search(exact, emb[picks], k)
  return round(float(np.mean([len(set(x) & set(y)) / k for x, y in zip(a, e)])), 4)


def folder_bytes(folder: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


def one_size(slides: int, rows_per_slide: float, dim: int, k: int, queries: int) -> dict:
  emb, rows, _ = synthetic_gallery(slides, rows_per_slide, dim)
  out = {"slides": slides, "rows": len(emb), "dim": dim, "modes": {}}
  exact = None
  for mode in ("brute_force", "tree_ah"):
    if mode == "tree_ah" and len(emb) < 20_000:
      continue  # 'auto' keeps brute force below 20,000 rows
    start = time.perf_counter()
    idx = indexing.build(emb, {"mode": mode}, k=k)
    built = time.perf_counter() - start
    entry = {"build_s": round(built, 2), **query_times(idx, emb, rows, k, queries)}
    if exact is None:
      exact = idx
    else:
      entry["recall_at_k_vs_exact"] = recall(idx, exact, emb, rows, k, queries)
    with tempfile.TemporaryDirectory() as tmp:
      writer.save(idx, os.path.join(tmp, "index"), {}, rows)
      size = folder_bytes(os.path.join(tmp, "index"))
    entry.update(index_bytes=size, index_bytes_per_slide=round(size / slides))
    out["modes"][mode] = entry
  return out


def latency(slide_counts: list[int], dims: list[int], rows_per_slide: float, k: int = 10, queries: int = 30) -> dict:
  return {"rows_per_slide": rows_per_slide, "k": k, "queries_per_point": queries,
          "what": "per query slide, embedding excluded: search of its mosaic rows (k + its own rows, own slide "
                  "dropped) and the slide ranking with regions; medians over the query slides",
          "points": [one_size(n, rows_per_slide, d, k, queries) for d in dims for n in slide_counts]}


def index_dir_bytes(named: dict[str, str]) -> dict:
  """Bytes per slide of real index folders (every patch / mosaic)."""
  out = {}
  for name, folder in named.items():
    rows = indexing.load_rows(folder)
    slides = len(np.unique(rows["source_id"][indexing.slide_mask(rows)]))
    size = folder_bytes(folder)
    manifest = indexing.read_manifest(folder)
    out[name] = {"folder": folder, "slides": slides, "rows": int(manifest["count"]), "dim": manifest["dim"],
                 "mode": manifest["mode"], "bytes": size, "bytes_per_slide": round(size / max(slides, 1)),
                 "rows_per_slide": round(manifest["count"] / max(slides, 1), 1)}
  return out
