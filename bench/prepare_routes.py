"""The local route of `histojax.prepare` (`--workers N`) against the Beam route
(`--beam_runner DirectRunner`, N worker processes), run back to back as a user would.

    python -m bench.prepare_routes --manual_dir DIR [--dataset bach --config x10_256] [--workers 2] [--rounds 1]

Each round builds the dataset twice from scratch, in a subprocess, into fresh
data_dirs (the order alternates per round, so a drift in machine load does
not favour one route); records the wall time, the seconds
the summary reports and the load average before and after each build, and
checks that both routes wrote the same records (canonical tf.Example bytes).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from bench import common

FLAGS = flags.FLAGS


def _build(route: str, data_dir: str) -> dict:
  cmd = [sys.executable, "-m", "histojax.prepare", "--dataset", FLAGS.dataset, "--manual_dir", FLAGS.manual_dir,
         "--data_dir", data_dir, "--workers", str(FLAGS.workers)]
  if FLAGS.config:
    cmd += ["--config", FLAGS.config]
  if route == "beam":
    cmd += ["--beam_runner", "DirectRunner"]
  load = os.getloadavg()[0]
  start = time.perf_counter()
  done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  wall = time.perf_counter() - start
  if done.returncode:
    raise RuntimeError(f"{route} build failed:\n{done.stderr[-3000:]}")
  return {"route": route, "wall_seconds": round(wall, 1), "load_before": round(load, 2),
          "load_after": round(os.getloadavg()[0], 2), "summary": done.stdout}


def _records(data_dir: str) -> dict[str, list[bytes]]:
  from array_record.python.array_record_data_source import ArrayRecordDataSource
  from tensorflow_datasets.proto import tf_example_pb2

  from histojax.data import sources
  name = f"{FLAGS.dataset}/{FLAGS.config}" if FLAGS.config else FLAGS.dataset
  b = sources.builder(name, data_dir)
  out = {}
  for split, info in b.info.splits.items():
    source = ArrayRecordDataSource([os.fspath(p) for p in info.filepaths])
    # upb orders a record's feature map per process; deterministic bytes compare the features.
    out[split] = [tf_example_pb2.Example.FromString(source[i]).SerializeToString(deterministic=True)
                  for i in range(len(source))]
  return out


def _difference(a: dict[str, list[bytes]], b: dict[str, list[bytes]]) -> dict:
  """Where two builds' records part: per split, the counts and the first differing index."""
  out = {}
  for split in sorted(set(a) | set(b)):
    x, y = a.get(split, []), b.get(split, [])
    first = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), None if len(x) == len(y) else min(len(x), len(y)))
    if first is not None:
      out[split] = {"records": [len(x), len(y)], "first_difference": first,
                    "same_set": sorted(x) == sorted(y)}
  return out


def main(argv):
  del argv
  runs = []
  tmp = tempfile.mkdtemp(dir=FLAGS.tmp_dir)
  for r in range(FLAGS.rounds):
    order = ("local", "beam") if (r + FLAGS.beam_first) % 2 == 0 else ("beam", "local")
    dirs = {route: os.path.join(tmp, f"{route}_{r}") for route in order}
    built = [_build(route, dirs[route]) for route in order]
    difference = _difference(_records(dirs["local"]), _records(dirs["beam"]))
    for b in built:
      runs.append({"round": r, **b, "same_records_as_other_route": not difference, "difference": difference})
      print(f"round {r} {b['route']}: {b['wall_seconds']} s (load {b['load_before']} -> {b['load_after']})")
    if difference:
      print(f"round {r}: the routes wrote different records (kept in {tmp}): {difference}")
    else:
      shutil.rmtree(dirs["local"]), shutil.rmtree(dirs["beam"])
  common.write("prepare_routes", {"dataset": FLAGS.dataset, "config": FLAGS.config, "workers": FLAGS.workers,
                                  "runs": runs}, quiet=True)
  if any(run["difference"] for run in runs):
    raise SystemExit("the two routes wrote different records")


if __name__ == "__main__":
  flags.DEFINE_string("manual_dir", None, "The archive (e.g. the BACH photos).", required=True)
  flags.DEFINE_string("dataset", "bach", "Dataset to build.")
  flags.DEFINE_string("config", "x10_256", "Builder config.")
  flags.DEFINE_integer("workers", 2, "Processes: --workers for the local route, DirectRunner workers for Beam.")
  flags.DEFINE_integer("rounds", 1, "Back-to-back pairs of builds.")
  flags.DEFINE_bool("beam_first", False, "Start with the Beam route (the order alternates per round).")
  flags.DEFINE_string("tmp_dir", None, "Where the data_dirs go (kept only where the routes differ).")
  app.run(main)
