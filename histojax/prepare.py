"""Build a TFDS dataset from its archive (or, for synthetic data, from nothing).

    python -m histojax.prepare --dataset NAME [--config VARIANT] [--manual_dir DIR] [--data_dir DIR]
                               [--workers N] [--skip_corrupt] [--max_pixels N]

Prints examples per split and class, source images, tiles dropped by the
tissue filter, corrupt images skipped, bytes on disk and seconds taken. A
missing archive or a corrupt image ends the run with a message that says what
to do, and leaves nothing that reads as prepared.
"""

from __future__ import annotations

import sys

from absl import app, flags

from histojax import monitor
from histojax.data import sources
from tfds_builders.common import BuildError


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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  FLAGS = flags.FLAGS
  monitor.quiet_libraries()
  name = f"{FLAGS.dataset}/{FLAGS.config}" if FLAGS.config else FLAGS.dataset
  try:
    summary = sources.prepare(name, FLAGS.data_dir or "", FLAGS.manual_dir or "",
                              skip_corrupt=FLAGS.skip_corrupt, workers=FLAGS.workers,
                              max_pixels=FLAGS.max_pixels)
  except BuildError as e:
    print(f"error: {e}", file=sys.stderr)  # the message is the help; a traceback would bury it
    sys.exit(1)
  print(format_summary(summary))


if __name__ == "__main__":
  flags.DEFINE_string("dataset", None, "TFDS dataset name, e.g. synthetic_tissue.", required=True)
  flags.DEFINE_string("config", None, "Builder config (variant), e.g. tiny.")
  flags.DEFINE_string("data_dir", None, "TFDS data_dir; default $TFDS_DATA_DIR or ~/tensorflow_datasets.")
  flags.DEFINE_string("manual_dir", None, "Folder holding the archives you downloaded.")
  flags.DEFINE_integer("workers", None, "Processes preparing images; default: one per CPU core.")
  flags.DEFINE_bool("skip_corrupt", False, "Leave out (and count) images that cannot be decoded, "
                    "instead of stopping the build.")
  flags.DEFINE_integer("max_pixels", None, "Refuse archive images with more pixels than this, read from the "
                       "header before decoding; default 2,000,000,000 (tfds_builders.common.MAX_PIXELS).")
  app.run(main)
