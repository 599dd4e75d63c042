"""Seconds per 1,000 tiles added to a saved index, and what a search finds before and after.

    python -m bench.index_growth --index WORKDIR/index [--images 16] [--size 512]
    python -m bench.index_growth --synthetic_rows 100000   # tree/AH at scale, no model

Works on a copy of the index. Paints `--images` new source images of
`--size` px (the synthetic_tissue painter, labelled by their class folder),
then times `python -m histojax.index add` as a user runs it (one process:
model load included) and, inside it, cutting + embedding and the append +
crash-safe write. One new image is searched before the add, after it, and
after `remove --source` of every new image (which must give back the first
answer exactly).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from bench import common

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string("index", None, "index folder (copied; the original is not changed)")
  flags.DEFINE_string("workdir", None, "query model workdir (default: the manifest's)")
  flags.DEFINE_integer("images", 16, "new source images")
  flags.DEFINE_integer("size", 512, "side of each new image in px")
  flags.DEFINE_integer("k", 5, "neighbours per tile for the before/after searches")
  flags.DEFINE_string("out", None, "JSON path (default bench/results/index_growth.json)")
  flags.DEFINE_integer("synthetic_rows", 0, "also time adding 1,000 rows to a tree/AH index of this many "
                       "clustered 128-d rows (no model), with recall@10 before and after")


def paint(folder: str, n: int, size: int) -> list[str]:
  import PIL.Image  # noqa: PLC0415

  from tfds_builders.synthetic_tissue import painter  # noqa: PLC0415
  paths = []
  for i in range(n):
    label = painter.CLASS_NAMES[i % len(painter.CLASS_NAMES)]
    os.makedirs(os.path.join(folder, label), exist_ok=True)
    path = os.path.join(folder, label, f"new_{label}_{i:03d}.png")
    PIL.Image.fromarray(painter.paint_tissue(i % len(painter.CLASS_NAMES), 5000 + i, size)).save(path)
    paths.append(path)
  return paths


def summary(answer: dict) -> dict:
  """What a user reads first: the vote, the top source images, each tile's best match."""
  return {"vote": answer["vote"], "top_sources": [(s["source_id"], s["label"], round(s["score"], 3))
                                                  for s in answer.get("sources", [])[:3]],
          "tiles_whose_best_match_is_the_image_itself":
              sum(t["results"][0]["source_id"] == os.path.splitext(answer["query"])[0] for t in answer["tiles"])}


def search(engine, path: str, k: int) -> dict:
  from histojax.data import images  # noqa: PLC0415
  engine.reload_if_changed()
  image = images.read_image(path, max_pixels=images.DEFAULT_MAX_PIXELS["search"])
  return engine.answer(os.path.basename(path), image, k)


def at_scale(n: int, added: int = 1000, dim: int = 128, k: int = 10) -> dict:
  """Append + crash-safe write of `added` rows into a saved tree/AH index of `n` rows, and
  recall@10 (against exact search) of queries near the new rows, in-distribution and not."""
  import numpy as np  # noqa: PLC0415

  from histojax import indexing  # noqa: PLC0415
  from histojax.indexing import curator, writer  # noqa: PLC0415
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(30, dim))

  def rows(m, cs):
    return indexing.l2_normalize(cs[rng.integers(0, len(cs), m)] + 0.35 * rng.normal(size=(m, dim)))
  gallery = rows(n, centers[:24])
  out = {"rows": n, "dim": dim, "rows_added": added}
  for name, cs in (("same_clusters", centers[:24]), ("new_clusters", centers[24:])):
    with tempfile.TemporaryDirectory() as tmp:
      directory = os.path.join(tmp, "index")
      meta = {"label": np.zeros(n, np.int64), "source_id": np.array([f"s{i // 100}" for i in range(n)]),
              "coords": np.zeros((n, 2), np.int32)}
      writer.save(indexing.build(gallery, {"mode": "tree_ah"}), directory, {"class_names": ["c"]}, meta)
      new = rows(added, cs)
      cases = curator.Cases(np.zeros((added, 8, 8, 3), np.uint8), new, np.zeros(added, np.int64),
                           np.array([f"new{i // 100}" for i in range(added)]), np.zeros((added, 2), np.int32))
      start = time.perf_counter()
      summary = curator.add(directory, cases)  # 1%: under the drift threshold; the probe decides
      seconds = time.perf_counter() - start
      idx, _ = indexing.load(directory)
      queries = rows(200, cs)
      truth = indexing.exact_search(np.concatenate([gallery, new]), queries, k)[0]
      found = indexing.search(idx, queries, k)[0]
      out[name] = {"seconds_add_1000": round(seconds, 2), "probe_recall": summary["probe_recall"],
                   "rebalanced": summary["rebalanced"],
                   "recall@10_after_add": round(float(np.mean([len(set(a) & set(b)) / k
                                                               for a, b in zip(found, truth)])), 4)}
  return out


def main(argv):
  del argv
  if FLAGS.synthetic_rows:
    common.write("index_growth_scale", at_scale(FLAGS.synthetic_rows), FLAGS.out)
    return
  if not FLAGS.index:
    raise app.UsageError("--index is required (or --synthetic_rows N)")
  from histojax import query  # noqa: PLC0415
  from histojax.indexing import curator  # noqa: PLC0415
  with tempfile.TemporaryDirectory() as tmp:
    served = os.path.join(tmp, "index")
    shutil.copytree(FLAGS.index, served)
    tree = os.path.join(tmp, "new")
    paths = paint(tree, FLAGS.images, FLAGS.size)
    engine = query.QueryEngine.open(served, FLAGS.workdir)
    probe = paths[3 % len(paths)]
    before = search(engine, probe, FLAGS.k)
    cmd = [sys.executable, "-m", "histojax.index", "add", "--index", served, "--images", tree]
    if FLAGS.workdir:
      cmd += ["--workdir", FLAGS.workdir]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    cli_seconds = time.perf_counter() - start
    if done.returncode:
      raise RuntimeError(done.stderr[-3000:])
    added = json.loads(done.stdout)
    after = search(engine, probe, FLAGS.k)
    sources = sorted({os.path.splitext(os.path.basename(p))[0] for p in paths})
    start = time.perf_counter()
    removed = curator.remove(served, sources)
    remove_seconds = time.perf_counter() - start
    again = search(engine, probe, FLAGS.k)
  per_k = 1000 / added["rows_added"]
  with open("/proc/loadavg") as f:
    loadavg = f.read().split()[:3]
  result = {
      "index_rows_before": added["rows_before"], "tiles_added": added["rows_added"], "images_added": len(paths),
      "image_px": FLAGS.size, "cli_seconds": round(cli_seconds, 2),
      "seconds_per_1000_tiles": {"cli_total": round(cli_seconds * per_k, 2),
                                 "cut_and_embed": round(added["seconds_cut_embed"] * per_k, 2),
                                 "append_and_write": round(added["seconds_write"] * per_k, 2)},
      "remove": {"rows_removed": removed["rows_removed"], "seconds": round(remove_seconds, 3)},
      "probe": os.path.basename(probe), "before": summary(before), "after_add": summary(after),
      "after_remove": summary(again), "after_remove_equals_before": again == before,
      "load_average_after": loadavg}
  common.write("index_growth", result, FLAGS.out)


if __name__ == "__main__":
  define_flags()
  app.run(main)
