"""Photo votes of finished BACH runs pooled across runs, and a larger gallery, without retraining.

    python -m bench.bach_ensembles --runs W1,W2,W3 [--others W4,W5,W6] [--tta none,d8] [--out FILE]

Reads the exports `bench.bach_levers` left in each workdir (`export/` for
`none`, `levers/d8/` for `d8`: gallery = train, queries = validation and
test) and, per query split, prints the photo vote@5 (one vote per retrieved
tile, `metrics.pooled_vote`) of

- each run alone, and for test queries with the validation photos added to
  the gallery (`+val_gallery`);
- the runs' per-photo vote shares averaged (`vote_mean`), and their
  embeddings concatenated (`concat`; `--runs` must share one dataset);
- with `--others` (runs on another dataset, e.g. the reference at 10x), their
  vote shares averaged, everything averaged, and run i with other i, over the
  photos both have tiles for.
"""

from __future__ import annotations

import json

import numpy as np
from absl import app, flags
from etils import epath

from histojax import export, metrics

K = 5


def define_flags():
  flags.DEFINE_list("runs", None, "workdirs of finished runs on one dataset", required=True)
  flags.DEFINE_list("others", [], "workdirs of runs on another dataset (pooled per photo only)")
  flags.DEFINE_list("tta", ["none", "d8"], "embedding modes bench.bach_levers exported")
  flags.DEFINE_string("out", None, "JSON path (default: print only)")


def _load(run: str, mode: str, split: str) -> export.Export:
  base = epath.Path(run) / ("export" if mode == "none" else f"levers/{mode}")
  return export.load(base / split)


def vote_shares(gallery_emb, gallery_label, query: export.Export, query_emb=None):
  """(photo ids, per-photo share of the k-NN votes per class [P, C], photo truth [P])."""
  similarity = (query.embeddings if query_emb is None else query_emb) @ gallery_emb.T
  order = np.argsort(-similarity, axis=1, kind="stable")[:, :K]
  ids, _, counts = metrics.pooled_vote(metrics.neighbor_labels(order, gallery_label), query.source_id, K)
  truth_ids, truth = metrics.group_labels(query.label, query.source_id)
  assert (ids == truth_ids).all()
  return ids, counts / np.maximum(counts.sum(1, keepdims=True), 1), truth


def _accuracy(shares, truth) -> float:
  return round(float(np.mean(shares.argmax(1) == truth)), 3)


def _on(ids, shares, truth, keep):
  mask = np.isin(ids, keep)
  return shares[mask], truth[mask]


def measure(runs, others, mode: str, split: str) -> dict:
  out, shares = {}, {}
  for run in list(runs) + list(others):
    gallery, query = _load(run, mode, "train"), _load(run, mode, split)
    shares[run] = vote_shares(gallery.embeddings, gallery.label, query)
    out[run] = _accuracy(*shares[run][1:])
    if split == "test":
      extra = _load(run, mode, "validation")
      bigger = vote_shares(np.concatenate([gallery.embeddings, extra.embeddings]),
                           np.concatenate([gallery.label, extra.label]), query)
      out[f"{run}+val_gallery"] = _accuracy(*bigger[1:])
  galleries = [_load(r, mode, "train") for r in runs]
  queries = [_load(r, mode, split) for r in runs]
  if not all(np.array_equal(g.source_id, galleries[0].source_id) for g in galleries):
    raise ValueError("--runs must share one dataset (their gallery tiles differ)")
  concat = vote_shares(np.concatenate([g.embeddings for g in galleries], 1), galleries[0].label, queries[0],
                       np.concatenate([q.embeddings for q in queries], 1))
  out["concat"] = _accuracy(*concat[1:])
  ids, truth = shares[runs[0]][0], shares[runs[0]][2]
  out["vote_mean"] = _accuracy(np.mean([shares[r][1] for r in runs], 0), truth)
  if others:
    o_ids, o_truth = shares[others[0]][0], shares[others[0]][2]
    out["others_vote_mean"] = _accuracy(np.mean([shares[r][1] for r in others], 0), o_truth)
    both = np.intersect1d(ids, o_ids)
    pooled = [_on(*shares[r], both) for r in list(runs) + list(others)]
    out["all_vote_mean"] = _accuracy(np.mean([p[0] for p in pooled], 0), pooled[0][1])
    out["photos_in_both"] = len(both)
    for i, (a, b) in enumerate(zip(runs, others)):
      (sa, ta), (sb, _) = _on(*shares[a], both), _on(*shares[b], both)
      out[f"pair_{i}_vote_mean"] = _accuracy((sa + sb) / 2, ta)
  return out


def main(argv):
  del argv
  F = flags.FLAGS
  result = {f"{mode}/{split}": measure(F.runs, F.others, mode, split)
            for mode in F.tta for split in ("validation", "test")}
  for key, row in result.items():
    print(key, json.dumps(row))
  if F.out:
    epath.Path(F.out).write_text(json.dumps({"runs": F.runs, "others": F.others, "k": K, "photo_vote": result},
                                            indent=1))


if __name__ == "__main__":
  define_flags()
  app.run(main)
