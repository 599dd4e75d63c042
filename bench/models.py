"""Parameter counts of every registered model, and forward throughput.

    python -m bench.models [--throughput resnet,vit_b16] [--batch 16] [--image_size 224] [--steps 5]
                           [--dtype float32] [--out FILE]

Counts come from abstract models (no arrays), next to the published figure
where there is one. Throughput is the jitted eval-mode forward (uint8 images
-> unit embeddings) at the default width, on one device, after one warm-up
batch; the load average is recorded because the machine may be shared.
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np
from absl import app, flags
from flax import nnx

from bench import common
from histojax import models

# Without classifiers: torchvision / timm (num_classes=0), open_clip `visual`,
# and the mixed-attention reference with its 512-d head (measured in torch).
PUBLISHED = {"resnet": 23_508_032, "se_resnet": 26_039_024, "clip_vit_b32": 87_849_216,
             "clip_vit_b16": 86_192_640, "clip_vit_l14": 303_966_208, "vit_b16": 85_798_656,
             "vit_l16": 303_301_632, "mixed_attention": 45_731_440}
PUBLISHED_INCLUDES_HEAD = {"mixed_attention"}


def parameter_counts() -> dict:
  rows = {}
  for name in models.MODELS.names():
    model = models.abstract_model(models.model_config(name))
    row = {"backbone": models.parameter_count(model.backbone), "head": models.parameter_count(model.head),
           "total": models.parameter_count(model)}
    if name in PUBLISHED:
      ours = row["total"] if name in PUBLISHED_INCLUDES_HEAD else row["backbone"]
      row.update(published=PUBLISHED[name], matches_published=ours == PUBLISHED[name])
    rows[name] = row
  return rows


def throughput(name: str, batch: int, image_size: int, steps: int, dtype: str) -> dict:
  cfg = models.model_config(name)
  cfg.dtype = dtype
  model = models.build_model(cfg)
  model.eval()
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
  images = np.random.default_rng(0).integers(0, 256, (batch, image_size, image_size, 3), dtype=np.uint8)
  start = time.perf_counter()
  forward(state, images).block_until_ready()
  first = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(steps):
    out = forward(state, images)
  out.block_until_ready()
  seconds = time.perf_counter() - start
  return {"batch": batch, "image_size": image_size, "dtype": dtype, "steps": steps,
          "compile_and_first_batch_seconds": round(first, 2), "seconds_per_batch": round(seconds / steps, 3),
          "images_per_sec": round(steps * batch / seconds, 2)}


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  load_before = os.getloadavg()
  result = {"parameters": parameter_counts(), "throughput": {}}
  for name in filter(None, FLAGS.throughput.split(",")):
    result["throughput"][name] = throughput(name, FLAGS.batch, FLAGS.image_size, FLAGS.steps, FLAGS.dtype)
  result["load_average_1_5_15min"] = {"before": [round(x, 2) for x in load_before],
                                      "after": [round(x, 2) for x in os.getloadavg()]}
  common.write("models", result, FLAGS.out)


if __name__ == "__main__":
  flags.DEFINE_string("throughput", "resnet,vit_b16", "Comma-separated models to time.")
  flags.DEFINE_integer("batch", 16, "Images per forward batch.")
  flags.DEFINE_integer("image_size", 224, "Square input size in pixels.")
  flags.DEFINE_integer("steps", 5, "Timed batches after warm-up.")
  flags.DEFINE_enum("dtype", "float32", sorted(models.DTYPES), "Compute dtype (parameters stay float32).")
  flags.DEFINE_string("out", None, "JSON path; default bench/results/models.json.")
  app.run(main)
