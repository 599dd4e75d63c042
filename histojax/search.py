"""Answer image and whole-slide queries with the nearest gallery patches, photos and slides of a saved index.

    python -m histojax.search --index DIR/index --images a.png [--images photos/ | photos/ ...] \\
        [--k 10] [--json] [--workdir DIR] [--step N] [--resize F | --mpp X]
    python -m histojax.search --index DIR/index --slides FILE_OR_DIR [--slides ...] [--json] \\
        [--mpp X] [--gallery_mpp X] [--mosaic_fraction F] [--exclude_same_case [--slides_csv CSV]]

The query path is `histojax.query.QueryEngine`: the checkpoint the index was
built from (or `--workdir`/`--step`), refused with the fields that differ
unless it matches the manifest; each image cut the way the dataset's builder
cut the gallery (the manifest's tiling record), its tiles searched, and an
answer with the patch neighbours of every tile, a majority vote pooled over
them and the most similar gallery source images (`metrics.rank_sources`).

`--slides` (the flag, not the file's suffix: a .tif can be either) takes whole-slide
images as queries (`histojax.slide_query`): each slide's tissue is cut into patches at
the index's `gallery_mpp` (`--gallery_mpp` for an index that does not record it),
reduced to a mosaic, embedded and searched; its answer ranks the top gallery slides by
a pooled score (`QueryEngine.slide_ranking`: the mean over the query's patches of the
best score any patch of that slide reached in the patch's top k), each with its matched
regions in level-0 pixels. A slide never answers itself; `--exclude_same_case` keeps
its case (patient) out too. Image queries against a gallery holding slides get the top
slides as well, beside `sources` (the photos).

`--json` prints one JSON object per query image on stdout and nothing else
there (every library's output is sent to stderr); a query that fails (an
unreadable file, an image smaller than the model input) gets an object with
an "error" field and the exit status is 1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from typing import Callable

import numpy as np
from absl import app, flags, logging

from histojax import indexing, query, slide_query, slides
from histojax.data import images

QUERIES_PER_CALL = 8  # images answered together: their tiles share padded device calls


# --- Inputs ----------------------------------------------------------------------

def read_image(path: str, max_pixels: int = images.DEFAULT_MAX_PIXELS["search"]) -> np.ndarray:
  """uint8 HxWx3 through the project's one decoder (as the builders read the gallery); a
  file that cannot be decoded, or declares more than `max_pixels` pixels, raises
  `images.ImageError` (a ValueError) naming it, before decoding."""
  return images.read_image(path, max_pixels=max_pixels)


# --- Output ------------------------------------------------------------------------

def format_answer(result: dict) -> str:
  """Human-readable lines for one answer: the vote, the top source images, each tile's neighbours."""
  if "error" in result:
    return f"{result['query']}: error: {result['error']}"
  vote = result["vote"]
  head = (f"{result['query']} ({result['width']}x{result['height']}): {result['tiles_searched']} tile(s) searched, "
          f"{result['tiles_dropped']} dropped as background; "
          + (f"image vote: {vote['label']} ({vote['fraction']:.0%} of {sum(vote['votes'].values())} votes)"
             if vote else "no tissue tile, no vote"))
  lines = [head]
  if result.get("sources"):
    lines.append("  most similar source images (mean over tiles of the best score per image):")
    lines.append(f"  {'rank':>6}{'score':>9}  {'label':<16}{'tiles':>6}  source image")
    lines += [f"  {s['rank']:>6}{s['score']:>9.4f}  {s['label']:<16}{s['tiles_matched']:>6}  {s['source_id']}"
              for s in result["sources"]]
  lines += _slide_lines(result.get("slides"))
  lines.append(f"  {'tile (y, x)':<14}{'rank':>5}{'score':>9}  {'label':<16}{'source image':<22}coords")
  for tile in result["tiles"]:
    for r in tile["results"]:
      lines.append(f"  {str((tile['y'], tile['x'])):<14}{r['rank']:>5}{r['score']:>9.4f}  {r['label']:<16}"
                   f"{r['source_id']:<22}{tuple(r['coords'])}")
  return "\n".join(lines)


def _slide_lines(found: list[dict] | None) -> list[str]:
  if not found:
    return []
  lines = ["  most similar slides (mean over patches of the best score per slide), best regions in level-0 px:",
           f"  {'rank':>6}{'score':>9}  {'label':<16}{'case':<16}{'slide':<24}regions (x, y, w, h)"]
  for s in found:
    boxes = ", ".join(f"({r['x']}, {r['y']}, {r['width']}, {r['height']})" for r in s["regions"][:3])
    lines.append(f"  {s['rank']:>6}{s['score']:>9.4f}  {s['label']:<16}{s['case_id']:<16}{s['slide_id']:<24}{boxes}")
  return lines


def format_slide_answer(result: dict) -> str:
  """Human-readable lines for one slide query: what was cut, the vote, the top slides and photos."""
  if "error" in result:
    return f"{result['query']}: error: {result['error']}"
  vote, cut = result["vote"], result["cut"]
  lines = [f"{result['query']} (slide {result['slide_id']}, {result['width']}x{result['height']} px at "
           f"{result['mpp'][0]:.3g} um/px): {result['patches_searched']} of {result['patches_in_grid']} tissue patches "
           f"({cut['patch_px']} px at {cut['mpp']:.3g} um/px) searched; "
           + (f"vote: {vote['label']} ({vote['fraction']:.0%})" if vote else "no vote")]
  lines += _slide_lines(result["slides"]) or ["  no gallery slide among the neighbours"]
  lines += [f"  photo {s['rank']}: {s['source_id']} ({s['label']}, score {s['score']:.4f})" for s in result["sources"]]
  return "\n".join(lines)


# --- The run -------------------------------------------------------------------------

@dataclasses.dataclass
class SlideOptions:
  """How `--slides` queries are cut and answered (see the module)."""
  mpp: float | None = None  # the slides' level-0 microns per pixel, for slides that declare none
  gallery_mpp: float | None = None  # for an index whose manifest does not record it
  mosaic_fraction: float | None = None  # default slide_query.QUERY_MOSAIC's (5%)
  exclude_same_case: bool = False
  slides_csv: str | None = None  # the query slides' cases (else the gallery's own record of the slide)
  workers: int = 4


def run_slides(index_dir: str, items: list[str], k: int = 10, emit: Callable[[dict], None] = print,
               workdir: str | None = None, step: int | None = None, options: SlideOptions = SlideOptions(),
               engine: query.QueryEngine | None = None) -> int:
  """Searches with every slide under `items`; `emit(answer)` prints one. Returns the exit status
  (0, or 1 when a slide failed: not a slide, no tissue, damaged)."""
  if k <= 0:
    raise ValueError(f"--k must be positive, got {k}")
  walked = [slides.find_slides(item) for item in items]
  paths = [p for w in walked for p in w.slides]
  if not paths:
    raise FileNotFoundError(f"no slide under {items} (skipped: {[str(p) for w in walked for p in w.skipped][:5]})")
  cases = {r.slide_id: r.case_id for r in slides.read_slide_table(options.slides_csv)} if options.slides_csv else {}
  engine = engine or query.QueryEngine.open(index_dir, workdir=workdir, step=step)
  cut = slide_query.slide_cut(engine, options.gallery_mpp, options.mosaic_fraction)  # NoGalleryMppError first
  status = 0
  for path in paths:
    try:
      answer = slide_query.answer_slide(engine, path, k, cut, mpp=options.mpp, case_id=cases.get(slides.slide_id(path)),
                                        exclude_case=options.exclude_same_case, workers=options.workers)
    except slides.SlideError as e:
      answer = {"query": str(path), "kind": "slide", "error": str(e)}
    status = max(status, int("error" in answer))
    emit(answer)
  return status


def run(index_dir: str, queries: list[str], k: int = 10, emit: Callable[[dict], None] = print,
        workdir: str | None = None, step: int | None = None, resize: float | None = None,
        max_pixels: int = images.DEFAULT_MAX_PIXELS["search"], mpp: float | None = None,
        gallery_mpp: float | None = None) -> int:
  """Searches every query image; `emit(answer)` prints one. Returns the exit status
  (0, or 1 when a query failed). `mpp`: the images' microns per pixel, which sets their resize
  to the gallery's (`gallery_mpp` where the index records none)."""
  if k <= 0:
    raise ValueError(f"--k must be positive, got {k}")
  if max_pixels <= 0:
    raise ValueError(f"--max_pixels must be positive, got {max_pixels}")
  paths = images.image_paths(queries, "--images")
  if mpp is not None:
    resize = images_resize(index_dir, mpp, resize, gallery_mpp)
  engine = query.QueryEngine.open(index_dir, workdir=workdir, step=step, resize=resize)
  status = 0
  for start in range(0, len(paths), QUERIES_PER_CALL):
    batch, failed = [], {}
    for path in paths[start:start + QUERIES_PER_CALL]:
      try:
        batch.append((path, read_image(path, max_pixels)))
      except ValueError as e:
        failed[path] = {"query": path, "error": str(e)}
    answers = {a["query"]: a for a in engine.answer_batch(batch, k)}
    for path in paths[start:start + QUERIES_PER_CALL]:
      answer = failed.get(path) or answers[path]
      status = max(status, int("error" in answer))
      emit(answer)
  return status


def images_resize(index_dir: str, mpp: float, resize: float | None, gallery_mpp: float | None) -> float:
  """The resize factor that takes query images at `mpp` um/px to the gallery's magnification."""
  if resize is not None:
    raise ValueError("give --mpp or --resize for image queries, not both")
  target = gallery_mpp if gallery_mpp is not None else indexing.read_manifest(index_dir).get("gallery_mpp")
  if target is None:
    raise slide_query.NoGalleryMppError(f"index {index_dir}: its manifest records no gallery_mpp, so --mpp cannot "
                                        "say how to resize the images; pass --gallery_mpp, or --resize")
  if not (0 < mpp <= 50 and 0 < target <= 50):
    raise ValueError(f"--mpp {mpp} and the gallery's {target} must be microns per pixel in (0, 50]")
  return float(mpp) / float(target)


@contextlib.contextmanager
def stdout_reserved():
  """Sends everything written to fd 1 (Python or C++ libraries) to stderr, and yields
  a file on the real stdout for the answers alone."""
  sys.stdout.flush()
  saved = os.dup(1)
  os.dup2(2, 1)
  answers = os.fdopen(saved, "w", buffering=1)
  real_stdout, sys.stdout = sys.stdout, sys.stderr
  try:
    yield answers
  finally:
    sys.stdout = real_stdout
    answers.flush()
    os.dup2(saved, 1)
    answers.close()


def define_flags() -> None:
  flags.DEFINE_string("index", None, "Index folder written by evaluate (<workdir>/index).", required=True)
  flags.DEFINE_multi_string("images", [], "Query image or folder (repeatable; further paths may follow "
                            "the flags).")
  flags.DEFINE_integer("k", 10, "Gallery patches per query tile (and source images per answer).", lower_bound=1)
  flags.DEFINE_bool("json", False, "One JSON object per query on stdout, nothing else.")
  flags.DEFINE_string("workdir", None, "Query model workdir; default the one named in the index manifest.")
  flags.DEFINE_integer("step", None, "Query model checkpoint step; default the manifest's.")
  flags.DEFINE_float("resize", None, "Replace the gallery's resize factor, for query images scanned at "
                     "another magnification (e.g. 0.5 for 40x queries against a 20x gallery).")
  flags.DEFINE_multi_string("slides", [], "Query whole-slide image, or folder of them (repeatable): each is "
                            "searched as a slide, through its mosaic at the index's gallery_mpp.")
  flags.DEFINE_float("mpp", None, "Microns per pixel of the queries: for --slides, their level 0 where they do "
                     "not declare it; for --images, their resize to the gallery's magnification.")
  flags.DEFINE_float("gallery_mpp", None, "Microns per pixel of the gallery's patches, for an index whose "
                     "manifest does not record it (bach/x5_64: 1.68).")
  flags.DEFINE_float("mosaic_fraction", None, "--slides: the query mosaic's fraction (default 0.05; 1 searches "
                     "every tissue patch).")
  flags.DEFINE_bool("exclude_same_case", False, "--slides: no answer from the query slide's case (patient) "
                    "either (its own slide is always left out).")
  flags.DEFINE_string("slides_csv", None, "--slides: a slides.csv giving the query slides' case ids (default: "
                      "the gallery's record of the same slide id).")
  flags.DEFINE_integer("max_pixels", images.DEFAULT_MAX_PIXELS["search"], "Refuse query images with more "
                       "pixels than this, read from the header before decoding (default: any histology RoI; "
                       "a decompression bomb is refused).", lower_bound=1)


def main(argv: list[str]) -> int:
  FLAGS = flags.FLAGS
  paths = list(FLAGS.images) + list(argv[1:])  # `--images a.png photos/`: the rest are positional
  if not paths and not FLAGS.slides:
    raise app.UsageError("give query images (--images FILE_OR_DIR [more paths]) or slides (--slides FILE_OR_DIR)")
  logging.set_verbosity(logging.WARNING)
  options = SlideOptions(FLAGS.mpp, FLAGS.gallery_mpp, FLAGS.mosaic_fraction, FLAGS.exclude_same_case, FLAGS.slides_csv)
  with stdout_reserved() as answers:
    def emit(result):
      slide = result.get("kind") == "slide"
      print(json.dumps(result) if FLAGS.json else (format_slide_answer if slide else format_answer)(result), file=answers)
    try:
      status = 0
      if paths:
        status = run(FLAGS.index, paths, FLAGS.k, emit, FLAGS.workdir, FLAGS.step, FLAGS.resize, FLAGS.max_pixels,
                     None if FLAGS.slides else FLAGS.mpp, FLAGS.gallery_mpp)
      if FLAGS.slides:
        status = max(status, run_slides(FLAGS.index, FLAGS.slides, FLAGS.k, emit, FLAGS.workdir, FLAGS.step, options))
      return status
    except (FileNotFoundError, ValueError) as e:  # ManifestMismatch, NoGalleryMppError, SlideTableError: ValueErrors
      print(f"error: {e}", file=sys.stderr)
      return 2


if __name__ == "__main__":
  define_flags()
  app.run(main)
