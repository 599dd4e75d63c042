"""Build a TFDS dataset from its archive (or, for synthetic data, from nothing).

    python -m histojax.prepare --dataset synthetic_tissue [--config tiny] [--data_dir DIR] [--manual_dir DIR]

Prints examples per split and class, bytes on disk and seconds taken.
"""

from __future__ import annotations

from absl import app, flags

from histojax import monitor
from histojax.data import sources


def format_summary(summary: dict) -> str:
  splits = summary["splits"]
  classes = list(next(iter(splits.values()))["per_class"]) if splits else []
  width = max([len(c) for c in classes] + [8])
  head = f"{'class':<{width}}" + "".join(f"{s:>10}" for s in splits)
  lines = [f"{summary['dataset']} {summary['version']} at {summary['data_dir']} "
           f"({summary['seconds']:.1f} s)", head, "-" * len(head)]
  for c in classes:
    lines.append(f"{c:<{width}}" + "".join(f"{splits[s]['per_class'][c]:>10}" for s in splits))
  lines.append(f"{'examples':<{width}}" + "".join(f"{splits[s]['examples']:>10}" for s in splits))
  lines.append(f"{'MiB':<{width}}" + "".join(f"{splits[s]['bytes'] / 2**20:>10.1f}" for s in splits))
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  FLAGS = flags.FLAGS
  monitor.quiet_libraries()
  name = f"{FLAGS.dataset}/{FLAGS.config}" if FLAGS.config else FLAGS.dataset
  print(format_summary(sources.prepare(name, FLAGS.data_dir or "", FLAGS.manual_dir or "")))


if __name__ == "__main__":
  flags.DEFINE_string("dataset", None, "TFDS dataset name, e.g. synthetic_tissue.", required=True)
  flags.DEFINE_string("config", None, "Builder config (variant), e.g. tiny.")
  flags.DEFINE_string("data_dir", None, "TFDS data_dir; default $TFDS_DATA_DIR or ~/tensorflow_datasets.")
  flags.DEFINE_string("manual_dir", None, "Folder holding the archives you downloaded.")
  app.run(main)
