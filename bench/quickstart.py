"""Wall time and results of training commands, run exactly as a user would.

    python -m bench.quickstart                                   # the README's quickstart
    python -m bench.quickstart --name methods --configs configs/bach_dml.py:quickstart,configs/bach_byol.py:quickstart

Each config runs as `python -m histojax.train --config CONFIG --workdir TMP`
in a subprocess, from an empty workdir; recorded per run: wall time, mean
steps/s (the first logged interval, which includes compilation, left out),
the logged loss at the start and at the end, and the final metrics.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from bench import common


def _logged(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f]


def run(config: str, tmp: str, fresh_data: bool) -> dict:
  env = dict(os.environ)
  if fresh_data:
    env["TFDS_DATA_DIR"] = os.path.join(tmp, "tfds")
  workdir = os.path.join(tmp, "work_" + config.replace("/", "_").replace(":", "_").replace(",", "_"))
  cmd = [sys.executable, "-m", "histojax.train", "--config", config, "--workdir", workdir]
  start = time.perf_counter()
  done = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  wall = time.perf_counter() - start
  if done.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
  with open(os.path.join(workdir, "eval", "metrics.json")) as f:
    metrics = json.load(f)
  rows = [r for r in _logged(os.path.join(workdir, "train_metrics.jsonl")) if "loss" in r]  # not during/ rows
  rates = [r["steps_per_sec"] for r in rows[1:]]
  return {"config": config, "command": " ".join(cmd[1:]), "fresh_data": fresh_data, "wall_seconds": round(wall, 1),
          "steps_per_sec": round(sum(rates) / len(rates), 2) if rates else None,
          "loss_first_logged": rows[0]["loss"], "loss_last_logged": rows[-1]["loss"], "metrics": metrics}


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  configs = FLAGS.configs.split(",configs/")
  configs = [c if c.startswith("configs/") else "configs/" + c for c in configs]
  with tempfile.TemporaryDirectory() as tmp:
    runs = [run(config, tmp, FLAGS.fresh_data) for config in configs]
  common.write(FLAGS.name, runs[0] if len(runs) == 1 else {"runs": runs}, FLAGS.out)


if __name__ == "__main__":
  flags.DEFINE_string("configs", "configs/quickstart.py",
                      "Comma-separated configs (each configs/x.py[:variants]); variants may hold commas.")
  flags.DEFINE_string("name", "quickstart", "Result name: bench/results/<name>.json.")
  flags.DEFINE_bool("fresh_data", True, "Prepare the dataset inside the timed run (once per run).")
  flags.DEFINE_string("out", None, "JSON path; default bench/results/<name>.json.")
  app.run(main)
