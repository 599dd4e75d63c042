"""Growing a saved index without rebuilding it, from the shell.

    python -m histojax.index add --index DIR --images FOLDER_OR_FILE [--images ...] [--label NAME]
    python -m histojax.index add --index DIR --slides FOLDER_OR_FILE [--slides_csv CSV] [--mosaic_fraction F]
                                 [--gallery_mpp X] [--mpp X]
    python -m histojax.index remove --index DIR --source ID [--source ...]

Without `--label` each image's label is the name of the folder holding it (a labelled
tree FOLDER/<class>/<image>); a slide's too, unless `--slides_csv` (slide_id, case_id,
label) gives it. A slide is a source whose id is its file stem: each is cut as the
query path cuts slides (`slide_query`: tissue, patches at the index's gallery_mpp, a
mosaic; `--mosaic_fraction 1` keeps every patch), and its rows carry its case and
level-0 regions. The work is `histojax.indexing.curator`'s; this entry point
only parses flags and opens the index's query model (`query.QueryEngine`) for `add`.
It is a module of its own, above `query`, rather than `indexing/__main__.py`: the
package sits below the query path, and an entry point inside it that opens the query
model would be an import running back up.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time

import numpy as np
from absl import app, flags, logging

from histojax import query, slide_query, slides
from histojax.indexing import curator, store


def define_flags() -> None:
  flags.DEFINE_string("index", None, "index folder (written by evaluate: <workdir>/index)", required=True)
  flags.DEFINE_multi_string("images", [], "add: image files or folders (repeat the flag); without --label "
                            "each image's folder names its class")
  flags.DEFINE_string("label", None, "add: the class of every image (or slide) given")
  flags.DEFINE_multi_string("slides", [], "add: whole-slide images, or folders of them (repeat the flag); "
                            "without --label or --slides_csv each slide's folder names its class")
  flags.DEFINE_string("slides_csv", None, "add --slides: a slides.csv (slide_id, case_id, label) for the slides")
  flags.DEFINE_float("mosaic_fraction", None, "add --slides: the mosaic's fraction (1 keeps every patch); "
                     "default the gallery's recorded mosaic, else 0.05")
  flags.DEFINE_float("gallery_mpp", None, "add --slides: microns per pixel of the gallery's patches, for an "
                     "index whose manifest does not record it")
  flags.DEFINE_float("mpp", None, "add --slides: microns per pixel of the slides' level 0, for slides that do "
                     "not declare it")
  flags.DEFINE_multi_string("source", [], "remove: source id(s) to take out (repeat the flag)")
  flags.DEFINE_string("workdir", None, "query model workdir; default the one named in the index manifest")
  flags.DEFINE_integer("step", None, "query model step; default the manifest's")
  flags.DEFINE_bool("rebalance", False, "retrain a tree/AH searcher now, whatever the rows changed")


def run_add(index_dir: str, images: list[str], label: str | None = None, workdir: str | None = None,
            step: int | None = None, rebalance: bool = False) -> dict:
  """`index add`: the labels are checked against the manifest before the model loads."""
  curator.labelled_images(images, label, list(store.read_manifest(index_dir).get("class_names") or []))
  engine = query.QueryEngine.open(index_dir, workdir, step)
  return curator.add_images(engine, index_dir, images, label, rebalance)


def run_add_slides(index_dir: str, items: list[str], slides_csv: str | None = None, label: str | None = None,
                   mosaic_fraction: float | None = None, gallery_mpp: float | None = None, mpp: float | None = None,
                   workdir: str | None = None, step: int | None = None, rebalance: bool = False) -> dict:
  """`index add --slides`: slides and labels checked, then cut at the gallery's mpp, embedded, appended."""
  labelled = curator.labelled_slides(items, list(store.read_manifest(index_dir).get("class_names") or []),
                                     slides_csv, label)
  engine = query.QueryEngine.open(index_dir, workdir, step)
  cut = slide_query.slide_cut(engine, gallery_mpp, mosaic_fraction, gallery_mosaic(engine.manifest))

  def read(path):
    _, batches = slide_query.slide_batches(path, cut, mpp)
    regions, patches = zip(*batches)
    return np.concatenate(regions), np.concatenate(patches)
  start = time.perf_counter()
  cases, empty = curator.slide_cases(labelled, read, engine.model.embed)
  cases.slide_cut = curator.cut_record(cut.record())
  embedded = time.perf_counter() - start
  summary = curator.add(index_dir, cases, rebalance)
  return {**summary, "slides": len(labelled) - len(empty), "skipped": empty, "cut": cut.record(),
          "seconds_cut_embed": round(embedded, 3)}


def gallery_mosaic(manifest: dict) -> slides.MosaicSettings:
  """The mosaic the gallery's slides were reduced with (its manifest's record), else 5%."""
  record = dict((manifest.get("slides") or {}).get("mosaic") or {})
  if record.get("method") == "all_patches":
    return slides.MosaicSettings(fraction=1.0)
  fields = {f.name for f in dataclasses.fields(slides.MosaicSettings)}
  return slides.MosaicSettings(**{k: v for k, v in record.items() if k in fields})


def main(argv) -> int:
  logging.set_verbosity(logging.WARNING)
  args = argv[1:]
  if len(args) != 1 or args[0] not in ("add", "remove"):
    raise SystemExit(f"usage: python -m histojax.index add|remove --index DIR ...; got {args}")
  f = flags.FLAGS
  try:
    if args[0] == "add":
      if bool(f.images) == bool(f.slides):
        raise ValueError("add needs --images FILE_OR_FOLDER or --slides FILE_OR_FOLDER (one of the two)")
      if f.slides:
        summary = run_add_slides(f.index, f.slides, f.slides_csv, f.label, f.mosaic_fraction, f.gallery_mpp, f.mpp,
                                 f.workdir, f.step, f.rebalance)
      else:
        summary = run_add(f.index, f.images, f.label, f.workdir, f.step, f.rebalance)
    else:
      if not f.source:
        raise ValueError("remove needs --source ID")
      summary = curator.remove(f.index, f.source, f.rebalance)
  except (FileNotFoundError, KeyError, ValueError) as e:  # SlideError and NoGalleryMppError are ValueErrors
    print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr, flush=True)
    return 2
  print(json.dumps(summary, indent=2))
  return 0


if __name__ == "__main__":
  define_flags()
  app.run(main)
