"""Slide search on held-out patients: a gallery of the fixture slides' train split, the test
split's slides as queries, scored by slide label.

    python -m tests.slide_fixtures --out /tmp/bach_slides            # 40 slides, 28/4/8 by case
    python -m histojax.prepare --dataset slides/x5_64 --manual_dir /tmp/bach_slides --data_dir D
    python -m histojax.prepare --dataset slides/x5_64_mosaic --manual_dir /tmp/bach_slides --data_dir D
    python -m histojax.train --config configs/bach_cgd.py:cpu_x5 --config.dataset.name=slides/x5_64 \\
        --config.dataset.data_dir=D [--config.seed=S] --workdir W      # W/index: every patch of the train slides
    python -m bench.slides_search --workdirs W0,W1,W2 --slides /tmp/bach_slides [--out FILE]

Per training run (a seed), two galleries of the 28 train-split slides: every patch with
tissue (evaluate's W/index), and the 5% mosaic (`slides/x5_64_mosaic`, the same checkpoint
evaluated into W.mosaic). Every test-split slide (and, separately, every validation one)
is a query through `search --slides`'s path (`slide_query.answer_slide`: tissue, 64 px at
1.68 um/px, the query's 5% mosaic, the index's model with its D8 averaging, k=10). Two
answers are scored against the slide's label: the top slide's label (top-1), and the
majority vote of the query patches' neighbours. Each split holds other patients' slides
than train (cases are blocks of 5 BACH photo numbers, as the BACH builder splits them).

Noise: 8 test slides (2 per class) means one slide moves accuracy by 12.5 points, and the
binomial 95% interval of a single run is about +-30 points; validation has 4 slides. Seeds
change the model, not the slides, so the spread between seeds understates that interval.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time

import numpy as np
from absl import app, flags
from etils import epath

from bench import common
from histojax import config as config_lib
from histojax import evaluate, query, slide_query, slides

flags.DEFINE_list("workdirs", None, "training workdirs (one per seed) of bach_cgd.py:cpu_x5 on slides/x5_64")
flags.DEFINE_string("slides", None, "the fixture slides folder (python -m tests.slide_fixtures --out DIR)")
flags.DEFINE_integer("k", 10, "neighbours per query patch")
flags.DEFINE_string("out", None, "JSON path (default bench/results/slides_search.json)")

SPLITS = ("test", "validation")


def mosaic_workdir(workdir: str) -> str:
  """The same checkpoint evaluated with the mosaic dataset (W.mosaic, its checkpoints a link to W's)."""
  target = epath.Path(workdir.rstrip("/") + ".mosaic")
  if (target / "index" / "manifest.json").exists():
    return os.fspath(target)
  target.mkdir(parents=True, exist_ok=True)
  if not (target / "checkpoints").exists():
    os.symlink(os.path.abspath(os.path.join(workdir, "checkpoints")), target / "checkpoints")
  config = config_lib.load(epath.Path(workdir) / "config.json")
  config.dataset.name = config.dataset.name.split("/")[0] + "/x5_64_mosaic"
  config_lib.save(config, target / "config.json")
  evaluate.evaluate(config, target)
  return os.fspath(target)


def queries(folder: str) -> dict[str, list[tuple[str, str]]]:
  """split -> [(slide path, label)] from the fixture's slides.csv."""
  table = {r.slide_id: r for r in slides.read_slide_table(os.path.join(folder, "slides.csv"))}
  found = {slides.slide_id(p): p for p in slides.slide_paths(folder)}
  return {split: [(str(found[sid]), r.label) for sid, r in sorted(table.items()) if r.split == split]
          for split in SPLITS}


def ask(engine: query.QueryEngine, items: list[tuple[str, str]], k: int) -> dict:
  cut = slide_query.slide_cut(engine)
  rows, seconds = [], []
  for path, label in items:
    start = time.perf_counter()
    answer = slide_query.answer_slide(engine, path, k, cut, exclude_case=True)
    seconds.append(time.perf_counter() - start)
    top = answer["slides"][0]
    rows.append({"slide": answer["slide_id"], "label": label, "top1": top["label"], "top1_slide": top["slide_id"],
                 "top1_score": top["score"], "vote": answer["vote"]["label"],
                 "top5_labels": [s["label"] for s in answer["slides"][:5]], "patches": answer["patches_searched"],
                 "seconds": answer["seconds"]})
  n = len(rows)
  return {"slides": n, "top1_accuracy": sum(r["top1"] == r["label"] for r in rows) / n,
          "vote_accuracy": sum(r["vote"] == r["label"] for r in rows) / n,
          "seconds_per_slide_query": round(statistics.mean(seconds), 3), "per_slide": rows}


def wilson(successes: int, n: int, z: float = 1.96) -> list[float]:
  """95% interval of a proportion (Wilson score)."""
  if n == 0:
    return [0.0, 1.0]
  p = successes / n
  centre = (p + z * z / (2 * n)) / (1 + z * z / n)
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
  return [round(centre - half, 3), round(centre + half, 3)]


def summarise(runs: list[dict], gallery: str, split: str) -> dict:
  results = [r["galleries"][gallery][split] for r in runs]
  out = {}
  for metric in ("top1_accuracy", "vote_accuracy"):
    values = [r[metric] for r in results]
    n = results[0]["slides"]
    out[metric] = {"per_seed": [round(v, 3) for v in values], "mean": round(statistics.mean(values), 3),
                   "sd_over_seeds": round(statistics.stdev(values), 3) if len(values) > 1 else None,
                   "one_slide_moves": round(1 / n, 3),
                   "wilson_95_of_the_mean_run": wilson(round(statistics.mean(values) * n), n)}
  return out


def main(argv):
  del argv
  F = flags.FLAGS
  if not F.workdirs or not F.slides:
    raise app.UsageError("--workdirs and --slides are required")
  items, runs = queries(F.slides), []
  for workdir in F.workdirs:
    config = config_lib.load(epath.Path(workdir) / "config.json")
    run = {"workdir": workdir, "seed": int(config.seed), "galleries": {}}
    for gallery, folder in (("every_patch", workdir), ("mosaic_5pct", mosaic_workdir(workdir))):
      engine = query.QueryEngine.open(os.path.join(folder, "index"), folder)
      run["galleries"][gallery] = {"rows": engine.num_rows, "slides": int(len(np.unique(engine.rows["source_id"]))),
                                   **{split: ask(engine, items[split], F.k) for split in SPLITS}}
      print(json.dumps({k: v for k, v in run["galleries"][gallery]["test"].items() if k != "per_slide"}))
    runs.append(run)
  result = {
      "what": "slide-level search on held-out patients: 40 BACH fixture slides (5 photos of one class each, 0.42 "
              "um/px generic TIFF), gallery = the 28 train-split slides, queries = the 8 test-split slides (4 "
              "validation), each of other patients; model bach_cgd.py:cpu_x5 (CGD, ResNet-18x0.5, 450 steps, D8 "
              "averaging) trained on slides/x5_64's train split (64 px at 1.68 um/px); query = the slide's 5% "
              "mosaic, k=10, its own case excluded",
      "score": "top-1: label of the top slide by the pooled score (mean over the query's patches of the best "
               "similarity any patch of that slide reached in the patch's top k); vote: majority of the query "
               "patches' neighbours' labels",
      "noise": "8 test slides: one slide moves accuracy by 0.125; a single run's binomial 95% interval is about "
               "+-0.3 (Wilson, below). Seeds change the model, not the slides: the spread between seeds "
               "understates the interval. Chance is 0.25 (4 balanced classes).",
      "chance": 0.25,
      "summary": {g: {s: summarise(runs, g, s) for s in SPLITS} for g in ("every_patch", "mosaic_5pct")},
      "runs": runs}
  common.write("slides_search", result, F.out, quiet=True)
  print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
  app.run(main)
