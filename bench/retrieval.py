"""Nearest-neighbour search: ScaNN (histojax's automatic config) vs exact numpy vs faiss.

    python -m bench.retrieval [--sizes 100000,1000000] [--dims 128,512] [--out FILE]
    PYTHONPATH=/path/to/faiss python -m bench.retrieval   # adds faiss rows when it imports

Galleries are clustered unit vectors (what a trained embedding looks like: a
few large class clusters, 24 by default as in Kimia Path24, so the k nearest
neighbours must be told apart inside one crowded cluster, the hard case for
quantisation), queries come from the same clusters. For every (size, dim) and method: build seconds, queries per
second over `--queries` queries (one batch, all cores the library uses by
default), recall@k against exact search on a `--gt_queries` subsample, and
the bytes the index needs on disk. Exact search is timed on the subsample
only (on 1M x 512 it is ~0.5 TFLOP per 1000 queries). faiss is optional and
never a requirement: `faiss_flat` (exact inner product) and `faiss_ivfpq`
(IVF sqrt(n) lists, a tenth probed, 4-bit fast-scan PQ of the residuals with
d/2 sub-spaces, exact re-ranking of 25 k candidates: the same recipe as
ScaNN's tree + AH + reorder; without residuals it reached only 0.62 recall@10
on 100k x 128) and `faiss_hnsw` (HNSW, M 32, efConstruction 100, the graph
index most users would pick). Results are rewritten after every (size, dim),
so a run cut short keeps what it measured.

`--matched 0.95,0.99` adds queries/s at matched recall@k: each method's
search-time knob is swept on the ground-truth queries (ScaNN: leaves searched
x candidates re-ranked around what the automatic configuration picked;
HNSW: efSearch) and the fastest setting reaching each recall is reported
(exact search: recall 1 at its one speed), in `matched` and `matched_markdown`.
"""

from __future__ import annotations

import gc
import math
import os
import tempfile
import time

import numpy as np
from absl import app, flags

from bench import common
from histojax import index as index_lib


def clustered(n: int, dim: int, clusters: int, noise: float, seed: int, chunk: int = 100_000) -> np.ndarray:
  """Unit vectors around `clusters` random centres; float32, made in chunks (1M x 512 is 2 GB)."""
  rng = np.random.default_rng(seed)
  centres = np.random.default_rng(1234 + dim).standard_normal((clusters, dim), dtype=np.float32)
  centres /= np.linalg.norm(centres, axis=1, keepdims=True)
  out = np.empty((n, dim), np.float32)
  for start in range(0, n, chunk):
    m = min(chunk, n - start)
    block = centres[rng.integers(0, clusters, m)]
    block += rng.standard_normal((m, dim), dtype=np.float32) * np.float32(noise / math.sqrt(dim))
    out[start:start + m] = block / np.linalg.norm(block, axis=1, keepdims=True)
  return out


def recall(found: np.ndarray, truth: np.ndarray) -> float:
  k = truth.shape[1]
  return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found[:, :k], truth)]))


def dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def timed(fn):
  start = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - start


def run_scann(gallery, queries, truth, k, mode):
  cfg = index_lib.IndexConfig(mode=mode)
  idx, build_s = timed(lambda: index_lib.build(gallery, cfg, k=k))
  (found, _), search_s = timed(lambda: index_lib.search(idx, queries, k))
  with tempfile.TemporaryDirectory() as tmp:
    index_lib.save(idx, os.path.join(tmp, "index"), {})
    size = dir_bytes(os.path.join(tmp, "index"))
  return {"method": f"scann_{mode}", "resolved_mode": idx.mode, "params": idx.params, "build_s": build_s,
          "qps": len(queries) / search_s, "recall": recall(found[:len(truth)], truth), "index_bytes": size}


def run_exact(gallery, gt_queries, exact_s):
  return {"method": "exact_numpy", "build_s": 0.0, "qps": len(gt_queries) / exact_s, "recall": 1.0,
          "index_bytes": gallery.nbytes, "qps_queries": len(gt_queries)}


def run_faiss(faiss, gallery, queries, truth, k, kind):
  n, dim = gallery.shape
  if kind == "faiss_flat":
    factory, nprobe, k_factor = "Flat", None, None
  else:
    nlist = max(2, int(math.sqrt(n)))
    factory, nprobe, k_factor = f"IVF{nlist},PQ{dim // 2}x4fsr,RFlat", max(1, nlist // 10), max(250, 25 * k) // k

  def build():
    idx = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if not idx.is_trained:
      idx.train(gallery[np.random.default_rng(0).permutation(n)[:min(n, 250_000)]])
    idx.add(gallery)
    return idx

  idx, build_s = timed(build)
  if nprobe:
    faiss.extract_index_ivf(idx).nprobe = nprobe
    idx.k_factor = k_factor  # the RFlat wrapper re-ranks k * k_factor candidates exactly
  (_, found), search_s = timed(lambda: idx.search(queries, k))
  return {"method": kind, "factory": factory, "nprobe": nprobe, "k_factor": k_factor, "build_s": build_s,
          "qps": len(queries) / search_s, "recall": recall(found[:len(truth)], truth),
          "index_bytes": int(faiss.serialize_index(idx).nbytes)}


def _sweep_point(search, queries, truth, k, **params) -> dict:
  found, seconds = timed(lambda: search(queries, k, **params))
  return {**params, "qps": len(queries) / seconds, "recall": recall(found, truth)}


def sweep_scann(gallery, queries, truth, k) -> tuple[dict, list[dict]]:
  """The automatic index, searched with its own knobs and with leaves x re-ranking around them."""
  idx = index_lib.build(gallery, index_lib.IndexConfig(mode="auto"), k=k)
  if idx.searcher is None or idx.mode != "tree_ah":
    return idx.params | {"mode": idx.mode}, []
  leaves, reorder = idx.params["leaves_to_search"], idx.params["reorder"]

  def search(q, k, leaves_to_search, pre_reorder_num_neighbors):
    return idx.searcher.search_batched_parallel(q, final_num_neighbors=k, leaves_to_search=leaves_to_search,
                                                pre_reorder_num_neighbors=pre_reorder_num_neighbors)[0]

  points = [_sweep_point(search, queries, truth, k, leaves_to_search=max(1, int(leaves * f)),
                         pre_reorder_num_neighbors=max(k, int(reorder * g)))
            for f in (0.25, 0.5, 1.0, 2.0) for g in (0.25, 0.5, 1.0, 2.0)]
  return idx.params | {"mode": idx.mode}, points


def sweep_hnsw(faiss, gallery, queries, truth, k) -> tuple[dict, list[dict]]:
  idx, build_s = timed(lambda: _hnsw(faiss, gallery))

  def search(q, k, ef_search):
    idx.hnsw.efSearch = ef_search
    return idx.search(q, k)[1]

  points = [_sweep_point(search, queries, truth, k, ef_search=ef) for ef in (16, 32, 64, 128, 256, 512)]
  return {"M": 32, "ef_construction": 100, "build_s": build_s}, points


def _hnsw(faiss, gallery):
  idx = faiss.IndexHNSWFlat(gallery.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
  idx.hnsw.efConstruction = 100
  idx.add(gallery)
  return idx


def at_recall(points: list[dict], target: float) -> dict | None:
  """The fastest swept setting whose recall reaches `target` (None: none does)."""
  ok = [p for p in points if p["recall"] >= target]
  return max(ok, key=lambda p: p["qps"]) if ok else None


def matched(gallery, gt_queries, truth, k, exact_qps, targets, faiss) -> list[dict]:
  n, dim = gallery.shape
  sweeps = {"scann_auto": sweep_scann(gallery, gt_queries, truth, k)}
  if faiss is not None:
    sweeps["faiss_hnsw"] = sweep_hnsw(faiss, gallery, gt_queries, truth, k)
  rows = []
  for target in targets:
    rows.append({"n": n, "dim": dim, "recall_target": target, "method": "exact_numpy", "qps": exact_qps,
                 "recall": 1.0})
    for method, (params, points) in sweeps.items():
      best = at_recall(points, target)
      rows.append({"n": n, "dim": dim, "recall_target": target, "method": method, "index": params,
                   "qps": None if best is None else best["qps"], "recall": None if best is None else best["recall"],
                   "setting": best, "sweep": points})
  for r in rows:
    qps = "not reached" if r["qps"] is None else f"{r['qps']:10.1f}"
    print(f"n={n:>8} d={dim:>4} recall>={r['recall_target']} {r['method']:<12} qps {qps}", flush=True)
  return rows


def matched_markdown(rows: list[dict]) -> str:
  lines = ["| gallery | dim | recall@10 target | method | queries/s | recall@10 | setting |", "|---|---|---|---|---|---|---|"]
  for r in rows:
    setting = ", ".join(f"{k}={v}" for k, v in (r.get("setting") or {}).items() if k not in ("qps", "recall"))
    qps = "not reached" if r["qps"] is None else f"{r['qps']:,.0f}"
    rec = "" if r["recall"] is None else f"{r['recall']:.3f}"
    lines.append(f"| {r['n']:,} | {r['dim']} | {r['recall_target']} | {r['method']} | {qps} | {rec} | {setting} |")
  return "\n".join(lines)


def bench_one(n: int, dim: int, FLAGS, faiss) -> list[dict]:
  k = FLAGS.k
  gallery = clustered(n, dim, FLAGS.clusters, FLAGS.noise, seed=0)
  queries = clustered(FLAGS.queries, dim, FLAGS.clusters, FLAGS.noise, seed=1)
  gt_queries = queries[:FLAGS.gt_queries]
  (truth, _), exact_s = timed(lambda: index_lib.exact_search(gallery, gt_queries, k))
  rows = [run_exact(gallery, gt_queries, exact_s)]
  for mode in [] if FLAGS.matched_only else FLAGS.scann_modes:
    rows.append(run_scann(gallery, queries, truth, k, mode))
    gc.collect()
  if faiss is not None and not FLAGS.matched_only:
    for kind in ("faiss_flat", "faiss_ivfpq"):
      # Exact search is timed on the ground-truth queries only, like exact_numpy.
      rows.append(run_faiss(faiss, gallery, gt_queries if kind == "faiss_flat" else queries, truth, k, kind))
      gc.collect()
  if FLAGS.matched:
    rows.extend(dict(r, matched=True) for r in matched(gallery, gt_queries, truth, k, rows[0]["qps"],
                                                       [float(t) for t in FLAGS.matched], faiss))
  for row in rows:
    if row.get("matched"):
      continue
    row.update(n=n, dim=dim, k=k)
    print(f"n={n:>8} d={dim:>4} {row['method']:<16} build {row['build_s']:8.2f} s  qps {row['qps']:10.1f}  "
          f"recall@{k} {row['recall']:.4f}  {row['index_bytes'] / 2**20:9.1f} MiB", flush=True)
  return rows


def markdown(rows: list[dict]) -> str:
  k = rows[0]["k"] if rows else 10
  lines = [f"| gallery | dim | method | build s | queries/s | recall@{k} | index MiB |", "|---|---|---|---|---|---|---|"]
  for r in rows:
    method = r["method"] + (f" ({r['resolved_mode']})" if r.get("resolved_mode") not in (None, r["method"][6:]) else "")
    lines.append(f"| {r['n']:,} | {r['dim']} | {method} | {r['build_s']:.1f} | {r['qps']:,.0f} | "
                 f"{r['recall']:.3f} | {r['index_bytes'] / 2**20:,.1f} |")
  return "\n".join(lines)


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  try:
    import faiss  # noqa: PLC0415  (optional: bench only, never a requirement)
  except ImportError:
    faiss = None
    print("faiss not importable: faiss rows skipped")
  rows = []
  settings = {"sizes": FLAGS.sizes, "dims": FLAGS.dims, "queries": FLAGS.queries, "gt_queries": FLAGS.gt_queries,
              "clusters": FLAGS.clusters, "noise": FLAGS.noise, "k": FLAGS.k, "scann_modes": FLAGS.scann_modes,
              "faiss": getattr(faiss, "__version__", None), "note": FLAGS.note}
  for n in FLAGS.sizes:
    for dim in FLAGS.dims:
      rows.extend(bench_one(int(n), int(dim), FLAGS, faiss))
      gc.collect()
      plain = [r for r in rows if not r.get("matched")]
      at = [r for r in rows if r.get("matched")]
      common.write("retrieval", {"settings": settings, "rows": plain, "markdown": markdown(plain),
                                 "matched": at, "matched_markdown": matched_markdown(at)}, FLAGS.out, quiet=True)
  print(markdown([r for r in rows if not r.get("matched")]))
  print(matched_markdown([r for r in rows if r.get("matched")]))


if __name__ == "__main__":
  flags.DEFINE_list("sizes", ["100000", "1000000"], "Gallery sizes.")
  flags.DEFINE_list("dims", ["128", "512"], "Embedding dims.")
  flags.DEFINE_integer("queries", 10_000, "Queries timed per ANN method (one batch).")
  flags.DEFINE_integer("gt_queries", 1_000, "Queries with exact ground truth (a prefix of the queries).")
  flags.DEFINE_integer("clusters", 24, "Clusters (classes) in the synthetic embeddings; few and large is the hard case.")
  flags.DEFINE_float("noise", 0.5, "Within-cluster spread: noise norm relative to the unit centre.")
  flags.DEFINE_integer("k", 10, "Neighbours per query (recall@k).")
  flags.DEFINE_list("scann_modes", ["auto"], "histojax index modes to time: auto, brute_force, ah, tree_ah.")
  flags.DEFINE_list("matched", [], "Recall@k targets for queries/s at matched recall, e.g. 0.95,0.99.")
  flags.DEFINE_bool("matched_only", False, "With --matched: skip the fixed-configuration rows.")
  flags.DEFINE_string("out", None, "JSON path; default bench/results/retrieval.json.")
  flags.DEFINE_string("note", "", "Free text stored with the results (e.g. machine load).")
  app.run(main)
