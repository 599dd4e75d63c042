"""What evaluation during training (`eval.every_steps`) costs, inside one training run.

    python -m bench.eval_during_training --data_dir DIR [--config configs/bach_dml.py:cpu]

Runs `python -m histojax.train` once, as a user would, from an empty workdir
on a prepared dataset, and reads its train_metrics.jsonl: the evaluator's
seconds (the one-off `during/setup_seconds` plus every `during/seconds`) over
the command's wall time. On a shared machine absolute times move with the
load; both sides of the ratio come from the same run, under the same load.
Also recorded: seconds per evaluation, the training rate (steps/s with the
evaluations left out, as the monitor logs it; the first interval, which
compiles, dropped), the whole command's steps per wall second, the
validation curve and the final evaluation.
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

HEADLINE = ("precision@5", "map@10", "majority_vote@5", "image_majority_vote@5")


def _rows(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "train_metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def summarise(rows: list[dict], wall: float, total_steps: int) -> dict:
  """The cost figures from a run's logged rows and its wall time."""
  evals = [r for r in rows if "during/seconds" in r]
  train = [r for r in rows if "loss" in r]
  setup = sum(r.get("during/setup_seconds", 0.0) for r in evals)
  per_eval = [r["during/seconds"] for r in evals]
  rates = [r["steps_per_sec"] for r in train[1:]]
  spent = setup + sum(per_eval)
  return {
      "wall_seconds": round(wall, 1),
      "evaluations": len(evals), "evaluated_at_steps": [r["step"] for r in evals],
      "evaluator_seconds": round(spent, 2), "setup_seconds": round(setup, 2),
      "seconds_per_evaluation": [round(s, 2) for s in per_eval],
      "seconds_per_evaluation_after_the_first": round(sum(per_eval[1:]) / max(len(per_eval) - 1, 1), 2),
      "fraction_of_wall_time": round(spent / wall, 4),
      "training_steps_per_sec_mean": round(sum(rates) / len(rates), 3) if rates else None,
      "steps_per_wall_second": round(total_steps / wall, 3),
      "curve": [{k.removeprefix("during/"): round(v, 4) for k, v in r.items() if "seconds" not in k} for r in evals],
  }


def run(config: str, data_dir: str, workdir: str) -> dict:
  cmd = [sys.executable, "-m", "histojax.train", "--config", config, f"--config.dataset.data_dir={data_dir}",
         "--config.dataset.prepare_if_missing=False", "--workdir", workdir]
  load_start = os.getloadavg()[0]
  start = time.perf_counter()
  done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  wall = time.perf_counter() - start
  if done.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)
  with open(os.path.join(workdir, "eval", "metrics.json")) as f:
    final = json.load(f)
  setting = {"every_steps": saved["eval"]["every_steps"], **saved["eval"]["during"], "ks": saved["eval"]["ks"],
             "eval_batch_size": saved["input"]["eval_batch_size"], "total_steps": saved["total_steps"]}
  return {"config": config, "command": "python -m histojax.train --config " + config +
          " --config.dataset.data_dir=DIR --workdir W", "setting": setting,
          **summarise(_rows(workdir), wall, saved["total_steps"]),
          "final_evaluation": {"query_split": final["query_split"], "num_gallery": final["num_gallery"],
                               "num_query": final["num_query"], **{k: final[k] for k in HEADLINE}},
          "load_average_1min": {"start": round(load_start, 2), "end": round(os.getloadavg()[0], 2)}}


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  if FLAGS.workdir:  # kept, to read again
    result = run(FLAGS.config, FLAGS.data_dir, FLAGS.workdir)
  else:
    with tempfile.TemporaryDirectory() as tmp:
      result = run(FLAGS.config, FLAGS.data_dir, os.path.join(tmp, "work"))
  common.write(FLAGS.name, {**result, "note": FLAGS.note} if FLAGS.note else result, FLAGS.out)


if __name__ == "__main__":
  flags.DEFINE_string("config", "configs/bach_dml.py:cpu", "Training config, with its evaluation during training on.")
  flags.DEFINE_string("data_dir", None, "TFDS data_dir holding the prepared dataset.", required=True)
  flags.DEFINE_string("workdir", None, "An empty training workdir to keep; default a temporary one.")
  flags.DEFINE_string("note", None, "What else ran on the machine, recorded with the figures.")
  flags.DEFINE_string("name", "eval_during_training", "Result name: bench/results/<name>.json.")
  flags.DEFINE_string("out", None, "JSON path; default bench/results/<name>.json.")
  app.run(main)
