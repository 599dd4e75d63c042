"""Build a TFDS dataset from its archive (or, for synthetic data, from nothing).

    python -m histojax.prepare --dataset NAME [--config VARIANT] [--manual_dir DIR] [--data_dir DIR]
                               [--workers N] [--skip_corrupt] [--max_pixels N] [--mpp UM_PER_PX]
                               [--beam_runner DirectRunner|DataflowRunner|FlinkRunner|SparkRunner
                                [--beam_options "--flag=value ..."]]

Prints examples per split and class, source images, tiles dropped by the
tissue filter, corrupt images skipped, bytes on disk and seconds taken. A
missing archive or a corrupt image ends the run with a message that says what
to do, and leaves nothing that reads as prepared.

With --beam_runner the images are prepared as an Apache Beam pipeline on that
runner (`pip install -r requirements-beam.txt`); the dataset written is the
same, record for record, as the local route's.
"""

from __future__ import annotations

import shlex
import sys

from absl import app, flags

from histojax import datasets, monitor  # noqa: F401  (datasets: registers the builders)
from histojax.data import sources
from tfds_builders.source_images import BuildError


def format_summary(summary: dict) -> str:
  splits = summary["splits"]
  classes = list(next(iter(splits.values()))["per_class"]) if splits else []
  width = max([len(c) for c in classes] + [8])
  col = max([len(s) + 2 for s in splits] + [10])  # "validation" needs more than 10
  head = f"{'class':<{width}}" + "".join(f"{s:>{col}}" for s in splits)
  lines = [f"{summary['dataset']} {summary['version']} at {summary['data_dir']} "
           f"({summary['seconds']:.1f} s)", head, "-" * len(head)]
  for c in classes:
    lines.append(f"{c:<{width}}" + "".join(f"{splits[s]['per_class'][c]:>{col}}" for s in splits))
  lines.append(f"{'examples':<{width}}" + "".join(f"{splits[s]['examples']:>{col}}" for s in splits))
  for key, title in (("source_images", "images"), ("images_without_tiles", "no tiles"), ("tiles_dropped", "dropped")):
    if any(key in v for v in splits.values()):
      lines.append(f"{title:<{width}}" + "".join(f"{splits[s].get(key, 0):>{col}}" for s in splits))
  lines.append(f"{'MiB':<{width}}" + "".join(f"{splits[s]['bytes'] / 2**20:>{col}.1f}" for s in splits))
  for s in splits:
    for path in splits[s].get("corrupt_skipped", []):
      lines.append(f"skipped corrupt image ({s}): {path}")
  return "\n".join(lines)


def run(dataset: str, config: str | None = None, data_dir: str = "", manual_dir: str = "",
        workers: int | None = None, skip_corrupt: bool = False, max_pixels: int | None = None,
        beam_runner: str | None = None, beam_options: str = "", mpp: float | None = None) -> dict:
  """Prepares `dataset` (variant `config`) and returns its summary; BuildError says what to fix."""
  name = f"{dataset}/{config}" if config else dataset
  return sources.prepare(name, data_dir, manual_dir, skip_corrupt=skip_corrupt, workers=workers,
                         max_pixels=max_pixels, beam_runner=beam_runner,
                         beam_options=shlex.split(beam_options or ""), mpp=mpp)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  FLAGS = flags.FLAGS
  if FLAGS.beam_options and not FLAGS.beam_runner:
    raise app.UsageError("--beam_options needs --beam_runner")
  monitor.quiet_libraries()
  try:
    summary = run(FLAGS.dataset, FLAGS.config, FLAGS.data_dir or "", FLAGS.manual_dir or "", FLAGS.workers,
                  FLAGS.skip_corrupt, FLAGS.max_pixels, FLAGS.beam_runner, FLAGS.beam_options or "", FLAGS.mpp)
  except BuildError as e:
    print(f"error: {e}", file=sys.stderr)  # the message is the help; a traceback would bury it
    sys.exit(1)
  print(format_summary(summary))


def define_flags() -> None:
  flags.DEFINE_string("dataset", None, "TFDS dataset name, e.g. synthetic_tissue.", required=True)
  flags.DEFINE_string("config", None, "Builder config (variant), e.g. tiny.")
  flags.DEFINE_string("data_dir", None, "TFDS data_dir; default $TFDS_DATA_DIR or ~/tensorflow_datasets.")
  flags.DEFINE_string("manual_dir", None, "Folder holding the archives you downloaded.")
  flags.DEFINE_integer("workers", None, "Processes preparing images (local route, and the DirectRunner); "
                       "default: one per CPU core.")
  flags.DEFINE_bool("skip_corrupt", False, "Leave out (and count) images that cannot be decoded, "
                    "instead of stopping the build.")
  flags.DEFINE_integer("max_pixels", None, "Refuse archive images with more pixels than this, read from the "
                       "header before decoding; default 2,000,000,000 (tfds_builders.source_images.MAX_PIXELS).")
  flags.DEFINE_float("mpp", None, "Microns per pixel of the archive's images (your own folder; or a scan that "
                     "differs from the dataset's published resolution). Recorded with the dataset: the "
                     "gallery's magnification that slides are cut to.")
  flags.DEFINE_enum("beam_runner", None, list(sources.BEAM_RUNNERS),
                    "Prepare as an Apache Beam pipeline on this runner (needs requirements-beam.txt).")
  flags.DEFINE_string("beam_options", None, "Beam pipeline flags for the runner, one string, e.g. "
                      "\"--project=P --region=R --temp_location=gs://B/tmp\".")


if __name__ == "__main__":
  define_flags()
  app.run(main)
