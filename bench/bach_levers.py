"""Eval-side levers of one trained BACH run, measured without retraining.

For each embedding mode (`eval.tta`: none, d8) and each query split
(validation for choosing, test for reporting), exports gallery and queries
from the run's last checkpoint and scores them with exact search: the
project's ranking metrics, the photo vote (one vote per retrieved tile), the
similarity-weighted vote and the mean-embedding (whole-photo) vote.

    python -m bench.bach_levers --workdir W [--splits validation,test] [--tta none,d8]

Writes W/levers.json; prints one line per (tta, split).
"""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
from absl import app, flags
from etils import epath

from histojax import config as config_lib
from histojax import checkpoint, evaluate, export, identity, metrics

KS = (1, 5, 10)
HEADLINE = ("precision@5", "map@10", "majority_vote@5", "image_majority_vote@5", "image_weighted_vote@5",
            "image_centroid_vote@5")


def define_flags():
  flags.DEFINE_string("workdir", None, "a finished training run", required=True)
  flags.DEFINE_list("splits", ["validation", "test"], "query splits")
  flags.DEFINE_list("tta", ["none", "d8"], "eval.tta modes")


def exact_neighbors(gallery: export.Export, query: export.Export, k: int) -> tuple[np.ndarray, np.ndarray]:
  similarity = query.embeddings @ gallery.embeddings.T
  order = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
  return order, np.take_along_axis(similarity, order, 1)


def measure(workdir: epath.Path, splits, modes) -> dict:
  config = config_lib.load(workdir / "config.json")  # the run's own config, data_dir included
  trainer, state, step = checkpoint.restore_for_eval(config, workdir, None)
  fp = identity.fingerprint(trainer, state)
  out = {"workdir": str(workdir), "step": step, "results": {}}
  for mode in modes:
    config.eval.tta = mode
    trainer = dataclasses.replace(trainer, tta=mode)  # the embedding function reads the mode from here
    start = time.perf_counter()
    folder = workdir / "export" if mode == "none" else workdir / "levers" / mode  # none: reuse train's exports
    gallery = export.export_split(trainer, state, config, "train", folder / "train", step, fp)
    for split in splits:
      query = export.export_split(trainer, state, config, split, folder / split, step, fp)
      neighbors, scores = exact_neighbors(gallery, query, max(KS))
      class_names = gallery.manifest.get("class_names")
      result = metrics.retrieval_metrics(neighbors, gallery.label, query.label, KS, query.source_id, class_names)
      result.update(evaluate.image_vote_variants(gallery, query, neighbors, scores, KS))
      result.update(num_query_images=int(len(np.unique(query.source_id))), num_gallery=len(gallery.label),
                    seconds=time.perf_counter() - start)
      out["results"][f"{mode}/{split}"] = result
      print(f"{mode:5s} {split:10s} " + "  ".join(f"{h}={result[h]:.3f}" for h in HEADLINE), flush=True)
  return out


def main(argv):
  del argv
  workdir = epath.Path(flags.FLAGS.workdir)
  out = measure(workdir, flags.FLAGS.splits, flags.FLAGS.tta)
  (workdir / "levers.json").write_text(json.dumps(out, indent=1, sort_keys=True))


if __name__ == "__main__":
  define_flags()
  app.run(main)
