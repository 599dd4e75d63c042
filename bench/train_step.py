"""Training-step throughput of a config, on whatever devices JAX sees.

    python -m bench.train_step [--config configs/quickstart.py] [--steps 50] [--out FILE]

Times the compiled step on a fixed synthetic batch (the input pipeline is
measured separately), after one warm-up step; writes JSON to bench/results/.
"""

from __future__ import annotations

import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from bench import common
from histojax import config as config_lib
from histojax import mesh as mesh_lib
from histojax import step as step_lib


def measure(config, steps: int) -> dict:
  b, s, m = config.input.batch_size, config.input.image_size, config.input.m_per_class
  # No dataset is read here: heads sized "by the dataset" (-1) get the batch's classes.
  config_lib.resolve_class_counts(config, b // m)
  mesh = mesh_lib.make_mesh(config.mesh)
  trainer, state = step_lib.create(config, mesh)
  rng = jax.random.key(0)
  start = time.perf_counter()
  views = trainer.objective.views
  spec = step_lib.batch_spec(config, views)
  compiled = step_lib.jit_train_step(trainer, state).lower(state, spec, jax.eval_shape(lambda: rng)).compile()
  compile_s = time.perf_counter() - start
  r = np.random.default_rng(0)
  batch = {name: r.integers(0, 256, (b, s, s, 3), dtype=np.uint8) for name in spec if name != "label"}
  batch["label"] = np.repeat(np.arange(b // m), m).astype(np.int32)
  batch = mesh_lib.to_global(batch, mesh)
  state, metrics = compiled(state, batch, rng)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, batch, rng)
  jax.block_until_ready(metrics)
  seconds = time.perf_counter() - start
  return {"objective": config.objective.name, "model": config.model.to_dict(), "global_batch": b, "image_size": s, "devices": mesh.size,
          "compile_seconds": round(compile_s, 2), "steps": steps,
          "steps_per_sec": round(steps / seconds, 3), "images_per_sec": round(steps * b / seconds, 1),
          "memory": step_lib.compile_report(compiled)}


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  common.write("train_step", measure(FLAGS.config, FLAGS.steps), FLAGS.out)


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", "configs/quickstart.py", "Config file[:variant].")
  flags.DEFINE_integer("steps", 50, "Timed steps after warm-up.")
  flags.DEFINE_string("out", None, "JSON path; default bench/results/train_step.json.")
  app.run(main)
