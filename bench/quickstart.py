"""Wall time of the README's quickstart command, from an empty workdir.

    python -m bench.quickstart [--fresh_data] [--out FILE]

Runs `python -m histojax.train --config configs/quickstart.py` in a
subprocess exactly as a user would, then records wall time, the final
metrics, the logged loss at start and end, and the mean steps/s.
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


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  with tempfile.TemporaryDirectory() as tmp:
    env = dict(os.environ)
    if FLAGS.fresh_data:
      env["TFDS_DATA_DIR"] = os.path.join(tmp, "tfds")
    workdir = os.path.join(tmp, "work")
    cmd = [sys.executable, "-m", "histojax.train", "--config", "configs/quickstart.py", "--workdir", workdir]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    with open(os.path.join(workdir, "eval", "metrics.json")) as f:
      metrics = json.load(f)
    rows = _logged(os.path.join(workdir, "train_metrics.jsonl"))
  rates = [r["steps_per_sec"] for r in rows[1:]]  # the first interval includes compilation
  common.write("quickstart", {
      "command": " ".join(cmd[1:]), "fresh_data": FLAGS.fresh_data, "wall_seconds": round(wall, 1),
      "steps_per_sec": round(sum(rates) / len(rates), 2) if rates else None,
      "loss_first_logged": rows[0]["loss"], "loss_last_logged": rows[-1]["loss"], "metrics": metrics}, FLAGS.out)


if __name__ == "__main__":
  flags.DEFINE_bool("fresh_data", True, "Prepare the dataset inside the timed run.")
  flags.DEFINE_string("out", None, "JSON path; default bench/results/quickstart.json.")
  app.run(main)
