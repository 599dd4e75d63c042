"""Images/s the Grain training pipeline delivers, by worker count, against what each step consumes.

    python -m bench.input_pipeline [--configs configs/bach_dml.py:cpu,...] [--workers 0,1,2]
                                   [--batches 20] [--dataset bach/x10_256 --data_dir DIR]
                                   [--consumption_steps 3] [--out FILE]

The pipeline is `histojax.data.pipeline.train_dataset` as training builds
it: read an encoded tile, decode it, crop (random or random-resized) and
flip/rot90 every view on the host, batch. Its source is the prepared TFDS
split when `--dataset` is given, else tiles made here in memory: smooth
stain-coloured fields with nuclei, PNG-encoded as the builders encode them
(compress level 1) at the `:cpu` datasets' tile size (256 px), so decode
costs what it costs on real tiles. The consumption of each config is its
compiled step's images/s (bench.train_step's `measure`, same process), on
the same machine; the verdict asks the pipeline for at least 1.5x that. On a
CPU host both compete for the same cores during training: the pipeline's
rate alone is an upper bound, which is why the margin is asked for.
"""

from __future__ import annotations

import importlib
import io
import os
import time

import numpy as np
import PIL.Image
from absl import app, flags

from bench import common
from histojax.data import pipeline

MARGIN = 1.5


def synthetic_tiles(count: int, size: int = 256, classes: int = 4, seed: int = 0) -> list[dict]:
  """PNG-encoded tissue-like tiles: eosin background, darker stroma bands, haematoxylin nuclei."""
  r = np.random.default_rng(seed)
  yy, xx = np.mgrid[:size, :size] / size
  tiles = []
  for i in range(count):
    f = r.uniform(2, 6, 2)
    stroma = 0.5 + 0.5 * np.sin(2 * np.pi * (f[0] * yy + f[1] * xx + r.uniform()))
    rgb = np.stack([230 - 40 * stroma, 160 - 60 * stroma, 200 - 30 * stroma], -1)
    for cy, cx, rad in zip(r.integers(0, size, 60), r.integers(0, size, 60), r.uniform(3, 7, 60)):
      nucleus = (yy * size - cy) ** 2 + (xx * size - cx) ** 2 < rad ** 2
      rgb[nucleus] = (90, 60, 150)
    rgb = np.clip(rgb + r.normal(0, 6, rgb.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    PIL.Image.fromarray(rgb).save(buf, format="PNG", compress_level=1)
    tiles.append({"image": buf.getvalue(), "label": np.int64(i % classes)})
  return tiles


def delivery(source, labels, input_config, views: int, workers: int, batches: int) -> dict:
  """Examples/s out of the pipeline after a warm-up batch (workers started, buffers full)."""
  cfg = input_config.copy_and_resolve_references()
  cfg.num_workers = workers
  it = iter(pipeline.train_dataset(source, labels, cfg, seed=0, views=views))
  next(it)
  start = time.perf_counter()
  for _ in range(batches):
    batch = next(it)
  seconds = time.perf_counter() - start
  key = "image" if views == 1 else "view1"
  assert batch[key].shape == (cfg.batch_size, cfg.image_size, cfg.image_size, 3), batch[key].shape
  return {"workers": workers, "batches": batches, "examples_per_sec": round(batches * cfg.batch_size / seconds, 1)}


def load_config(spec: str):
  path, _, variants = spec.partition(":")
  module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
  return module.get_config(variants or None)


def consumption(config, steps: int) -> float | None:
  if steps <= 0:
    return None
  from bench import train_step  # noqa: PLC0415  (imports the model stack only when asked)
  return train_step.measure(config.copy_and_resolve_references(), steps)["images_per_sec"]


def run(configs, workers, batches: int, dataset: str, data_dir: str, consumption_steps: int) -> dict:
  if dataset:
    from histojax.data import sources  # noqa: PLC0415
    source = sources.open_split(dataset, "train", data_dir)
    labels = sources.read_metadata(source)["label"]
    source_name = dataset
  else:
    source = synthetic_tiles(256)
    labels = np.array([int(t["label"]) for t in source])
    source_name = "synthetic PNG tiles, 256 px, 4 classes (in memory)"
  rows = []
  for spec in configs:
    config = load_config(spec)
    views = 2 if config.objective.name in ("byol", "spq") else 1
    by_workers = [delivery(source, labels, config.input, views, w, batches) for w in workers]
    consumed = consumption(config, consumption_steps)
    best = max(r["examples_per_sec"] for r in by_workers)
    rows.append({"config": spec, "batch": config.input.batch_size, "image_size": config.input.image_size,
                 "crop": config.input.crop, "views": views, "delivered": by_workers,
                 "step_consumes_examples_per_sec": consumed,
                 "best_over_consumption": None if not consumed else round(best / consumed, 2),
                 "meets_margin": None if not consumed else best >= MARGIN * consumed})
    print({k: v for k, v in rows[-1].items()}, flush=True)
  return {"source": source_name, "margin_required": MARGIN, "rows": rows,
          "load_average_1min": round(os.getloadavg()[0], 2)}


def main(argv):
  del argv
  F = flags.FLAGS
  result = run(F.configs.split(","), [int(w) for w in F.workers.split(",")], F.batches, F.dataset, F.data_dir,
               F.consumption_steps)
  common.write("input_pipeline", result, F.out, quiet=True)


if __name__ == "__main__":
  flags.DEFINE_string("configs", "configs/bach_dml.py:cpu,configs/bach_cgd.py:cpu,configs/bach_spq.py:cpu,"
                      "configs/bach_byol.py:cpu", "Comma-separated config[:variants] whose input to time.")
  flags.DEFINE_string("workers", "0,1,2", "Grain worker counts to try (0: the main process).")
  flags.DEFINE_integer("batches", 20, "Timed batches per worker count, after one warm-up batch.")
  flags.DEFINE_string("dataset", "", "TFDS name of a prepared dataset to read (default: tiles made in memory).")
  flags.DEFINE_string("data_dir", "", "TFDS data_dir of --dataset.")
  flags.DEFINE_integer("consumption_steps", 3, "Timed steps to measure each config's consumption (0: skip).")
  flags.DEFINE_string("out", None, "JSON path; default bench/results/input_pipeline.json.")
  app.run(main)
