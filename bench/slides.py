"""Whole slides to search: patches per second by stage, index bytes per slide, and slide-query
latency against a gallery of 10,000 slides.

    python -m tests.slide_fixtures --out /tmp/bach_slides       # 40 slides from the BACH photos (0.42 um/px)
    python -m bench.slides --slides /tmp/bach_slides [--max_slides 8] [--workers 1,2,4] \\
        [--embed quickstart,vit_b16] [--glass GLASS.tif] [--latency_slides 1000,3000,10000] [--latency_dims 128,768] \\
        [--index_dirs every_patch=W/index,mosaic=W.mosaic/index]

Per slide (`histojax.slides`, the path `search --slides`, `index add --slides` and the
`slides` builder take): open; tissue, split into decoding the ~8 um/px overview and
segmenting it; the patch grid; then every patch read, timed as wall seconds for the whole
grid and, per stage, as seconds summed over the reading threads (read: OpenSlide decoding
the level's tiles; resize: level pixels to patch pixels). Two cuts: 224 px at 0.5 um/px
(the usual 20x), and 64 px at 1.68 um/px (bach/x5_64's gallery resolution, which a 0.42
um/px slide's 4x level gives without resizing). The mosaic (Yottixel/SISH, 5%) is timed
and counted too.

Embed: each model of --embed (the quickstart ResNet-18 at quarter width, 128-d; a ViT-B/16,
768-d; random weights, jitted, float32) on batches of patches alone (the encoder's
patches/s); the quickstart also fed by `read_patches` (end to end), which says whether
reading or the encoder sets the pace.

Index bytes per slide: estimated as rows x (dim x 4 float32 bytes + META_BYTES_PER_ROW) +
META_BYTES_PER_SLIDE for every patch and for the mosaic (at 128-d and 768-d), and measured
on real index folders (--index_dirs: e.g. the fixture slides' galleries of bench.slides_search)
and on the synthetic archives below.

Slide-query latency (`bench.slide_gallery`): synthetic galleries of 1,000 to 10,000 slides
with the mosaic rows per slide measured here, each query slide's rows searched as
`search --slides` searches them (own slide excluded, then the slide ranking with regions),
in ScaNN brute force and tree-AH; beside it, the published figures of Yottixel and SISH,
named as theirs (PUBLISHED).
"""

from __future__ import annotations

import os
import pathlib
import statistics
import time

import jax
import numpy as np
from absl import app, flags
from flax import nnx

from bench import common, slide_gallery
from histojax import slides
from histojax.models import build_model, model_config

PRESETS = {"224px_at_0.5um": (224, 0.5), "64px_at_1.68um": (64, 1.68)}
DIMS = {"quickstart_128d": 128, "vit_b_768d": 768}
# What a slide row needs beside its embedding: label, slide and case (int32 indices into per-slide
# tables), x, y (int32), and the region's level-0 width and height (int16 each).
META_BYTES_PER_ROW = 4 + 4 + 4 + 4 + 4 + 2 + 2
META_BYTES_PER_SLIDE = 64  # slide id, case id, label name, mpp: a short record per slide
# Their figures, as they publish them (nothing here re-measures their systems).
PUBLISHED = {
    "yottixel": {
        "cite": "Kalra S, Tizhoosh HR et al. Yottixel - An image search engine for large archives of "
                "histopathology whole slide images. Medical Image Analysis 65:101757 (2020)",
        "mosaic": "k-means on colour histograms of the patches at low magnification (9 clusters), then 5% of "
                  "each cluster by spatial k-means; 1000 x 1000 px patches at 20x",
        "index": "DenseNet features binarised to barcodes ('bunch of barcodes', Hamming distance); about 10 KB "
                 "of index per slide (as issue 26 quotes it)",
        "search": "median of minimum Hamming distances between the query's and each slide's barcodes: every "
                  "slide of the archive is compared (linear in its size)"},
    "sish": {
        "cite": "Chen C, Lu MY, Williamson DFK, Chen TY, Schaumberg AJ, Mahmood F. Fast and scalable search of "
                "whole-slide images via self-supervised deep learning. Nature Biomedical Engineering "
                "6(12):1420-1434 (2022), doi:10.1038/s41551-022-00929-8; code github.com/mahmoodlab/SISH",
        "mosaic": "Yottixel's (9 colour clusters, 5% spatial sampling); 1024 px patches at 20x, 2048 at 40x "
                  "(README, CLAM patching)",
        "index": "VQ-VAE discrete latent codes of the mosaic, integer keys in a van Emde Boas tree, DenseNet "
                 "features for ranking",
        "search": "'constant search speed regardless of the size of the database', shown on over 22,000 patient "
                  "cases of 56 subtypes (their abstract and README)",
        "stack": "NVIDIA 2080 Ti, Python 3.7, openslide-python 1.1.1, PyTorch 1.5.0 (their README)"},
    "independent_validation": {
        "cite": "Lahr I, Alfasly S, ... Tizhoosh HR. Analysis and Validation of Image Search Engines in "
                "Histopathology. arXiv:2401.03271 (2024)",
        "finding": "on 2,476 patients: Yottixel efficient and fast with moderate accuracy; SISH inefficient with "
                   "inconsistent results; RetCCL inadequate in accuracy and efficiency (their abstract)"},
}
EMBEDDERS = {"quickstart": ("quickstart ResNet-18 x0.25, 128-d", ("224px_at_0.5um", "64px_at_1.68um"), 64),
             "vit_b16": ("ViT-B/16 (timm layout), 768-d", ("224px_at_0.5um",), 16)}

flags.DEFINE_string("slides", None, "folder of fixture slides (python -m tests.slide_fixtures --out DIR)")
flags.DEFINE_integer("max_slides", 8, "slides timed (the first N in walk order, every class if N >= 4 x 10)")
flags.DEFINE_string("workers", "1,2,4", "reading threads to time, comma-separated")
flags.DEFINE_list("embed", ["quickstart", "vit_b16"], f"encoders to time, of {sorted(EMBEDDERS)} ('' for none)")
flags.DEFINE_float("mosaic_fraction", 0.05, "the mosaic's fraction")
flags.DEFINE_string("glass", None, "a 50,000^2 glass slide (ulimit -f 131072; python -m tests.hostile_slides glass "
                    "PATH): time to its 'no tissue'")
flags.DEFINE_list("latency_slides", ["1000", "3000", "10000"], "gallery sizes (slides) for the query latency; "
                  "'' for none")
flags.DEFINE_list("latency_dims", ["128", "768"], "embedding widths for the query latency")
flags.DEFINE_integer("latency_queries", 30, "query slides per gallery size")
flags.DEFINE_list("index_dirs", [], "name=FOLDER of real slide indexes to measure bytes per slide of")
flags.DEFINE_string("out", None, "JSON path (default bench/results/slides.json)")


def _timed(fn, *args, **kwargs):
  start = time.perf_counter()
  result = fn(*args, **kwargs)
  return result, time.perf_counter() - start


def read_grid(slide, grid, workers: int) -> dict:
  stats = slides.ReadStats()
  start = time.perf_counter()
  for _ in slides.read_patches(slide, grid, batch_size=64, workers=workers, stats=stats):
    pass
  wall = time.perf_counter() - start
  return {"wall_s": round(wall, 3), "patches_per_s": round(len(grid) / wall, 1),
          "read_thread_s": round(stats.read_s, 3), "resize_thread_s": round(stats.resize_s, 3)}


def one_slide(path: pathlib.Path, workers: list[int], mosaic: slides.MosaicSettings) -> dict:
  slide, open_s = _timed(slides.open_slide, path)
  tissue = slides.TissueSettings()
  overview, overview_s = _timed(slide.overview, tissue.mpp, tissue.max_pixels)
  (mask, ink), segment_s = _timed(slides.segment_tissue, overview.rgb, overview.mpp, tissue)
  mask = slides.TissueMask(mask, overview, ink)
  row = {"slide": slide.slide_id, "level0": list(slide.dimensions), "mpp": slide.mpp[0],
         "tissue_mm2": round(mask.area_mm2(), 2), "open_s": round(open_s, 4),
         "tissue_overview_s": round(overview_s, 3), "tissue_segment_s": round(segment_s, 3), "cuts": {}}
  for name, (patch_px, mpp) in PRESETS.items():
    grid, grid_s = _timed(slides.patch_grid, slide, mask, patch_px=patch_px, mpp=mpp)
    level, source = slide.region_plan((patch_px, patch_px), mpp)
    chosen, mosaic_s = _timed(slides.build_mosaic, slide, grid, mosaic, workers=max(workers))
    row["cuts"][name] = {"patches": len(grid), "level": level, "level_px": list(source), "grid_s": round(grid_s, 4),
                         "reading": {str(w): read_grid(slide, grid, w) for w in workers},
                         "mosaic_rows": chosen.rows, "mosaic_s": round(mosaic_s, 3)}
  slide.close()
  return row


def stage_totals(rows: list[dict], workers: list[int]) -> dict:
  """Over all slides timed: patches/s by stage (per thread-second for read and resize) and by wall clock."""
  out = {}
  tissue_s = sum(r["tissue_overview_s"] + r["tissue_segment_s"] for r in rows)
  for name in PRESETS:
    cuts = [r["cuts"][name] for r in rows]
    patches = sum(c["patches"] for c in cuts)
    out[name] = {"patches": patches, "tissue_patches_per_s": round(patches / tissue_s, 1)}
    for w in workers:
      runs = [c["reading"][str(w)] for c in cuts]
      read, resize = sum(r["read_thread_s"] for r in runs), sum(r["resize_thread_s"] for r in runs)
      out[name][f"workers_{w}"] = {
          "wall_patches_per_s": round(patches / sum(r["wall_s"] for r in runs), 1),
          "read_patches_per_thread_s": round(patches / read, 1),
          "resize_patches_per_thread_s": round(patches / resize, 1) if resize else None}
  return out


def index_bytes(rows: list[dict], fraction: float) -> dict:
  out = {"meta_bytes_per_row": META_BYTES_PER_ROW, "meta_bytes_per_slide": META_BYTES_PER_SLIDE}
  for name in PRESETS:
    every = [r["cuts"][name]["patches"] for r in rows]
    mosaic = [r["cuts"][name]["mosaic_rows"] for r in rows]
    entry = {"rows_per_slide_every_patch": statistics.mean(every), "rows_per_slide_mosaic": statistics.mean(mosaic)}
    for label, dim in DIMS.items():
      per_row = dim * 4 + META_BYTES_PER_ROW
      entry[label] = {"bytes_per_slide_every_patch": round(statistics.mean(every) * per_row + META_BYTES_PER_SLIDE),
                      "bytes_per_slide_mosaic": round(statistics.mean(mosaic) * per_row + META_BYTES_PER_SLIDE)}
    per_mm2 = sum(every) / sum(r["tissue_mm2"] for r in rows)
    entry["patches_per_mm2_tissue"] = round(per_mm2, 1)
    entry["per_100mm2_tissue"] = _extrapolated(100 * per_mm2, fraction)
    out[name] = entry
  return out


def _extrapolated(patches: float, fraction: float) -> dict:
  """A resection slide holds ~100 mm^2 of tissue, ~35x a fixture slide: its rows and bytes (the mosaic's
  `fraction` of the patches; each colour cluster's rounding adds at most one row more)."""
  rows = {"every_patch": patches, "mosaic": patches * fraction}
  out = {f"rows_{k}": round(v) for k, v in rows.items()}
  for label, dim in DIMS.items():
    out[label] = {f"bytes_{k}": round(v * (dim * 4 + META_BYTES_PER_ROW) + META_BYTES_PER_SLIDE) for k, v in rows.items()}
  return out


def _encoder(name: str):
  from configs import quickstart  # noqa: PLC0415  (configs are files beside the package, loaded on demand)
  cfg = quickstart.get_config().model if name == "quickstart" else model_config(name)
  model = build_model(cfg)
  model.eval()
  graphdef, state = nnx.split(model)
  return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)), state


def embed_rates(path: pathlib.Path, workers: int, names: list[str]) -> dict:
  """Each encoder's patches/s alone; the quickstart's also fed by read_patches from one slide."""
  slide = slides.open_slide(path)
  mask = slides.tissue_mask(slide)
  out = {}
  for name in names:
    what, presets, batch_size = EMBEDDERS[name]
    forward, state = _encoder(name)
    out[name] = {"model": f"{what} (random weights), jitted, float32, batch {batch_size}"}
    for preset in presets:
      patch_px, mpp = PRESETS[preset]
      batch = np.zeros((batch_size, patch_px, patch_px, 3), np.uint8)
      forward(state, batch).block_until_ready()  # compile
      _, seconds = _timed(lambda: [forward(state, batch) for _ in range(3)][-1].block_until_ready())
      entry = {"embed_patches_per_s": round(3 * batch_size / seconds, 1)}
      if name == "quickstart":
        cut = slides.patch_grid(slide, mask, patch_px=patch_px, mpp=mpp)
        start = time.perf_counter()
        for b in slides.read_patches(slide, cut, batch_size=batch_size, workers=workers):
          images = b.images if len(b.images) == batch_size else np.concatenate([b.images, batch[len(b.images):]])
          forward(state, images).block_until_ready()
        entry.update(end_to_end_patches_per_s=round(len(cut) / (time.perf_counter() - start), 1), patches=len(cut),
                     workers=workers)
      out[name][preset] = entry
  slide.close()
  return out


def no_tissue_seconds(path: str) -> dict:
  start = time.perf_counter()
  try:
    with slides.open_slide(path) as slide:
      slides.tissue_mask(slide)
      answer = "tissue found"
  except slides.NoTissueError:
    answer = "NoTissueError"
  return {"slide": "50,000 x 50,000 px of glass at 0.5 um/px, levels 1/4/16/64 (7.5 GB as RGB)",
          "answer": answer, "seconds": round(time.perf_counter() - start, 2)}


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  if not FLAGS.slides:
    raise app.UsageError("--slides DIR is required (make it with: python -m tests.slide_fixtures --out DIR)")
  unknown = set(FLAGS.embed) - set(EMBEDDERS)
  if unknown:
    raise app.UsageError(f"--embed: unknown {sorted(unknown)}; known {sorted(EMBEDDERS)}")
  workers = [int(w) for w in FLAGS.workers.split(",")]
  paths = slides.slide_paths(FLAGS.slides)
  chosen = paths[:: max(1, len(paths) // FLAGS.max_slides)][: FLAGS.max_slides]  # spread over the classes
  mosaic = slides.MosaicSettings(fraction=FLAGS.mosaic_fraction)
  load = os.getloadavg()
  rows = [one_slide(p, workers, mosaic) for p in chosen]
  result = {
      "slides": f"{len(chosen)} of {len(paths)} BACH fixture slides (tests/slide_fixtures.py: 5 photos of one class "
                "on glass, generic-tiff, JPEG q90 tiles, levels 1/4/16, 0.42 um/px)",
      "load_average_before": [round(x, 2) for x in load], "mosaic": mosaic.record(),
      "stages": stage_totals(rows, workers), "index": index_bytes(rows, mosaic.fraction), "published": PUBLISHED, "per_slide": rows}
  if FLAGS.glass:
    result["glass_no_tissue"] = no_tissue_seconds(FLAGS.glass)
  if FLAGS.embed:
    result["embed"] = embed_rates(chosen[0], max(workers), FLAGS.embed)
  if FLAGS.index_dirs:
    result["index"]["measured"] = slide_gallery.index_dir_bytes(dict(d.split("=", 1) for d in FLAGS.index_dirs))
  if FLAGS.latency_slides:
    per_slide = statistics.mean(r["cuts"]["64px_at_1.68um"]["mosaic_rows"] for r in rows)  # as measured here
    result["latency"] = slide_gallery.latency([int(n) for n in FLAGS.latency_slides], [int(d) for d in FLAGS.latency_dims],
                                              per_slide, queries=FLAGS.latency_queries)
  result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
  common.write("slides", result, FLAGS.out)


if __name__ == "__main__":
  app.run(main)
