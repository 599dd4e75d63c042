"""Embedding health of trained runs: spread, how scores read, and what a quantised index makes of it.

    python -m bench.embedding_health --workdirs LABEL=W[,LABEL=W...] [--query_split test] [--copies 5]

For each run's exports (`W/export/train` as gallery, `W/export/<query_split>`
as queries, written by its evaluation):
- spread (`histojax.health`): the norm of the mean unit gallery embedding and
  the effective dimension (participation ratio of the covariance);
- the top-10 neighbour scores of the queries: range, same-class against
  other-class means, the share that prints as 1.000 (the page's 3 decimals),
  and for one query photo its tiles' top-10 range;
- ScaNN at scale: the gallery tiled `--copies` times with tiny noise (each copy
  moved by a random vector of norm `--noise`, then renormalised), searched with
  histojax's tree + AH + reorder (mode tree_ah, automatic knobs) against exact
  search: recall@10 as is and with gallery and queries centred on the gallery
  mean (then renormalised). ScaNN's k-means is threaded and not reproducible,
  so each recall is the mean of `--repeats` builds (min and max kept).

Writes bench/results/embedding_health.json (or --out).
"""

from __future__ import annotations

import numpy as np
from absl import app, flags

from bench import common
from bench.retrieval import recall
from histojax import export, health, index

K = 10


def define_flags():
  flags.DEFINE_list("workdirs", None, "LABEL=WORKDIR pairs", required=True)
  flags.DEFINE_string("query_split", "test", "query export under W/export/")
  flags.DEFINE_integer("copies", 5, "gallery copies for the ScaNN test (6208 rows x 5 = 31k, above brute force)")
  flags.DEFINE_float("noise", 1e-3, "norm of the random move of each copy")
  flags.DEFINE_integer("repeats", 3, "ScaNN builds per recall")
  flags.DEFINE_string("out", None, "JSON path (default bench/results/embedding_health.json)")


def tiled(gallery: np.ndarray, copies: int, noise: float, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  rows = np.concatenate([gallery] * copies)
  move = rng.standard_normal(rows.shape).astype(np.float32)
  rows = rows + noise * move / np.linalg.norm(move, axis=1, keepdims=True)
  return index.l2_normalize(rows)


def scann_recall(gallery: np.ndarray, queries: np.ndarray, repeats: int) -> dict:
  truth, _ = index.exact_search(gallery, queries, K)
  values = []
  for _ in range(repeats):
    found, _ = index.search(index.build(gallery, {"mode": "tree_ah"}, k=K), queries, K)
    values.append(recall(found, truth))
  return {"recall@10": float(np.mean(values)), "min": float(min(values)), "max": float(max(values))}


def scores_read(gallery: export.Export, query: export.Export) -> dict:
  similarity = query.embeddings @ gallery.embeddings.T
  order = np.argsort(-similarity, axis=1, kind="stable")[:, :K]
  scores = np.take_along_axis(similarity, order, 1)
  relevant = gallery.label[order] == query.label[:, None]
  photo = query.source_id[0]
  rows = query.source_id == photo
  return {"top10": health.score_separation(scores, relevant),
          "one_photo": {"source_id": str(photo), "tiles": int(rows.sum()),
                        "top10_min": float(scores[rows].min()), "top10_max": float(scores[rows].max())}}


def measure(workdir: str, query_split: str, copies: int, noise: float, repeats: int) -> dict:
  gallery = export.load(f"{workdir}/export/train")
  query = export.load(f"{workdir}/export/{query_split}")
  big = tiled(gallery.embeddings, copies, noise)
  mean = gallery.embeddings.mean(0)
  return {"workdir": workdir, "gallery_rows": len(gallery.label), "spread": health.spread(gallery.embeddings),
          "scores": scores_read(gallery, query),
          "scann": {"rows": len(big), "as_is": scann_recall(big, query.embeddings, repeats),
                    "centred": scann_recall(index.l2_normalize(big - mean),
                                            index.l2_normalize(query.embeddings - mean), repeats)}}


def main(argv):
  del argv
  f = flags.FLAGS
  runs = dict(item.split("=", 1) for item in f.workdirs)
  result = {"query_split": f.query_split, "copies": f.copies, "noise": f.noise, "repeats": f.repeats, "runs": {}}
  for label, workdir in runs.items():
    result["runs"][label] = measure(workdir, f.query_split, f.copies, f.noise, f.repeats)
    common.write("embedding_health", result, f.out, quiet=True)
    r = result["runs"][label]
    print(f"{label}: mean norm {r['spread']['mean_norm']:.4f}, effective dim {r['spread']['effective_dim']:.1f}; "
          f"top-10 scores {r['scores']['top10']['min']:.4f}..{r['scores']['top10']['max']:.4f}; "
          f"ScaNN recall@10 {r['scann']['as_is']['recall@10']:.3f} (centred {r['scann']['centred']['recall@10']:.3f})")


if __name__ == "__main__":
  define_flags()
  app.run(main)
