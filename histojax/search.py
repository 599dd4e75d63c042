"""Answer image queries with the nearest gallery patches of a saved index.

    python -m histojax.search --index DIR/index --images a.png [--images slides/ | slides/ ...] \\
        [--k 10] [--json] [--workdir DIR] [--step N] [--resize F]

The query path is `histojax.query.QueryEngine`: the checkpoint the index was
built from (or `--workdir`/`--step`), refused with the fields that differ
unless it matches the manifest; each image cut the way the dataset's builder
cut the gallery (the manifest's tiling record), its tiles searched, and an
answer with the patch neighbours of every tile, a majority vote pooled over
them and the most similar gallery source images (`metrics.rank_sources`).

`--json` prints one JSON object per query image on stdout and nothing else
there (every library's output is sent to stderr); a query that fails (an
unreadable file, an image smaller than the model input) gets an object with
an "error" field and the exit status is 1.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Callable

import numpy as np
from absl import app, flags, logging

from histojax import query
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
    lines.append(f"  most similar source images (mean over tiles of the best score per image):")
    lines.append(f"  {'rank':>6}{'score':>9}  {'label':<16}{'tiles':>6}  source image")
    lines += [f"  {s['rank']:>6}{s['score']:>9.4f}  {s['label']:<16}{s['tiles_matched']:>6}  {s['source_id']}"
              for s in result["sources"]]
  lines.append(f"  {'tile (y, x)':<14}{'rank':>5}{'score':>9}  {'label':<16}{'source image':<22}coords")
  for tile in result["tiles"]:
    for r in tile["results"]:
      lines.append(f"  {str((tile['y'], tile['x'])):<14}{r['rank']:>5}{r['score']:>9.4f}  {r['label']:<16}"
                   f"{r['source_id']:<22}{tuple(r['coords'])}")
  return "\n".join(lines)


# --- The run -------------------------------------------------------------------------

def run(index_dir: str, queries: list[str], k: int = 10, emit: Callable[[dict], None] = print,
        workdir: str | None = None, step: int | None = None, resize: float | None = None,
        max_pixels: int = images.DEFAULT_MAX_PIXELS["search"]) -> int:
  """Searches every query image; `emit(answer)` prints one. Returns the exit status
  (0, or 1 when a query failed)."""
  if k <= 0:
    raise ValueError(f"--k must be positive, got {k}")
  if max_pixels <= 0:
    raise ValueError(f"--max_pixels must be positive, got {max_pixels}")
  paths = images.image_paths(queries, "--images")
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
  flags.DEFINE_integer("max_pixels", images.DEFAULT_MAX_PIXELS["search"], "Refuse query images with more "
                       "pixels than this, read from the header before decoding (default: any histology RoI; "
                       "a decompression bomb is refused).", lower_bound=1)


def main(argv: list[str]) -> int:
  FLAGS = flags.FLAGS
  paths = list(FLAGS.images) + list(argv[1:])  # `--images a.png slides/`: the rest are positional
  if not paths:
    raise app.UsageError("give query images: --images FILE_OR_DIR [more paths]")
  logging.set_verbosity(logging.WARNING)
  with stdout_reserved() as answers:
    emit = ((lambda r: print(json.dumps(r), file=answers)) if FLAGS.json
            else (lambda r: print(format_answer(r), file=answers)))
    try:
      return run(FLAGS.index, paths, FLAGS.k, emit, FLAGS.workdir, FLAGS.step, FLAGS.resize, FLAGS.max_pixels)
    except (FileNotFoundError, ValueError) as e:  # ManifestMismatch is a ValueError
      print(f"error: {e}", file=sys.stderr)
      return 2


if __name__ == "__main__":
  define_flags()
  app.run(main)
