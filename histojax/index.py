"""Growing a saved index without rebuilding it, from the shell.

    python -m histojax.index add --index DIR --images FOLDER_OR_FILE [--images ...] [--label NAME]
    python -m histojax.index remove --index DIR --source ID [--source ...]

Without `--label` each image's label is the name of the folder holding it (a labelled
tree FOLDER/<class>/<image>). The work is `histojax.indexing.curator`'s; this entry point
only parses flags and opens the index's query model (`query.QueryEngine`) for `add`.
It is a module of its own, above `query`, rather than `indexing/__main__.py`: the
package sits below the query path, and an entry point inside it that opens the query
model would be an import running back up.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging

from histojax import query
from histojax.indexing import curator, store


def define_flags() -> None:
  flags.DEFINE_string("index", None, "index folder (written by evaluate: <workdir>/index)", required=True)
  flags.DEFINE_multi_string("images", [], "add: image files or folders (repeat the flag); without --label "
                            "each image's folder names its class")
  flags.DEFINE_string("label", None, "add: the class of every image given")
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


def main(argv) -> int:
  logging.set_verbosity(logging.WARNING)
  args = argv[1:]
  if len(args) != 1 or args[0] not in ("add", "remove"):
    raise SystemExit(f"usage: python -m histojax.index add|remove --index DIR ...; got {args}")
  f = flags.FLAGS
  try:
    if args[0] == "add":
      if not f.images:
        raise ValueError("add needs --images FILE_OR_FOLDER")
      summary = run_add(f.index, f.images, f.label, f.workdir, f.step, f.rebalance)
    else:
      if not f.source:
        raise ValueError("remove needs --source ID")
      summary = curator.remove(f.index, f.source, f.rebalance)
  except (FileNotFoundError, KeyError, ValueError) as e:
    print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr, flush=True)
    return 2
  print(json.dumps(summary, indent=2))
  return 0


if __name__ == "__main__":
  define_flags()
  app.run(main)
