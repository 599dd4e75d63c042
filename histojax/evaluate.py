"""Retrieval evaluation of a trained checkpoint.

    python -m histojax.evaluate --workdir DIR [--step N] [--gallery SPLIT] [--query SPLIT]

Stages, each reading only what the previous one wrote: export the gallery and
query splits (`<workdir>/export/<split>`), index the gallery
(`<workdir>/index`), search it with every query, and score the ranked lists
(`<workdir>/eval/metrics.json`, also printed as a table).
"""

from __future__ import annotations

import json

import jax
import ml_collections
import numpy as np
from absl import app, flags
from etils import epath

from histojax import checkpoint, distributed, export, index, metrics, monitor
from histojax import config as config_lib
from histojax import mesh as mesh_lib
from histojax import step as step_lib


def exclusion_keys(gallery: export.Export, query: export.Export, same_split: bool,
                   exclude_same_source: bool):
  """Keys whose equality removes a gallery row from a query's results, or None.

  With `exclude_same_source`, a query never sees its own source image. Without
  it, a query searched against its own split still never sees itself.
  """
  if exclude_same_source:
    return gallery.source_id, query.source_id
  if same_split:
    rows = np.arange(len(query.label))
    return rows, rows
  return None


def retrieve(idx: index.Index, gallery: export.Export, query: export.Export, k: int, keys):
  """Top-k neighbours of every query after exclusions."""
  if keys is None:
    return index.search(idx, query.embeddings, k)[0]
  extra = metrics.max_shared_source(*keys)
  neighbors, _ = index.search(idx, query.embeddings, k + extra)
  return metrics.drop_same_source(neighbors, keys[0], keys[1], k)


def evaluate(config: ml_collections.ConfigDict, workdir: epath.PathLike, trainer=None, state=None,
             step: int | None = None) -> dict:
  """Runs every stage and returns the metrics dict written to metrics.json."""
  workdir = epath.Path(workdir)
  if state is None:
    trainer, state, step = restore_for_eval(config, workdir, step)
  ev = config.eval
  gallery_split, query_split = config.dataset.gallery_split, config.dataset.query_split
  gallery = export.export_split(trainer, state, config, gallery_split, workdir / "export" / gallery_split, step)
  query = (gallery if query_split == gallery_split else
           export.export_split(trainer, state, config, query_split, workdir / "export" / query_split, step))

  k = max(ev.ks)
  idx = index.build(gallery.embeddings, ev.index, k=k)
  keys = exclusion_keys(gallery, query, query_split == gallery_split, ev.exclude_same_source)
  neighbors = retrieve(idx, gallery, query, k, keys)
  results = metrics.retrieval_metrics(neighbors, gallery.label, query.label, ev.ks)
  results.update(step=step, num_gallery=len(gallery.label), num_query=len(query.label),
                 index_mode=idx.mode, gallery_split=gallery_split, query_split=query_split,
                 exclude_same_source=bool(ev.exclude_same_source))
  if jax.process_index() == 0:
    index.save(idx, workdir / "index", {**gallery.manifest, "count": len(gallery.label)})
    write_metrics(workdir / "eval" / "metrics.json", results)
    print(format_table(results))
  return results


def restore_for_eval(config, workdir: epath.Path, step: int | None):
  mesh = mesh_lib.make_mesh(config.mesh)
  trainer, state = step_lib.create(config, mesh)
  mngr = checkpoint.manager(workdir, config.checkpoint)
  step = mngr.latest_step() if step is None else step
  if step is None or step not in mngr.all_steps():
    raise FileNotFoundError(f"no checkpoint {'' if step is None else f'at step {step} '}in "
                            f"{workdir / 'checkpoints'} (have {list(mngr.all_steps())})")
  state, _ = checkpoint.restore(mngr, step, state)
  return trainer, state, step


def write_metrics(path: epath.Path, results: dict) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  staging = path.parent / f".{path.name}.partial"
  staging.write_text(json.dumps(results, indent=2, sort_keys=True))
  staging.replace(path)  # atomic overwrite


def format_table(results: dict) -> str:
  """Rows per metric family, columns per k."""
  ks = sorted({int(name.split("@")[1]) for name in results if "@" in name})
  families = [f for f in ("precision", "accuracy", "map", "majority_vote") if f"{f}@{ks[0]}" in results]
  head = f"{'metric':<15}" + "".join(f"{'@' + str(k):>9}" for k in ks)
  lines = [f"retrieval at step {results['step']}: {results['num_query']} queries ({results['query_split']}) "
           f"against {results['num_gallery']} gallery patches ({results['gallery_split']}), "
           f"index {results['index_mode']}", head, "-" * len(head)]
  for family in families:
    lines.append(f"{family:<15}" + "".join(f"{results[f'{family}@{k}']:>9.4f}" for k in ks))
  return "\n".join(lines)


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  distributed.initialize_from_flags()  # on a pod, every worker runs this same command
  monitor.quiet_libraries()
  workdir = epath.Path(FLAGS.workdir)
  config = config_lib.load(workdir / "config.json")
  if FLAGS.gallery:
    config.dataset.gallery_split = FLAGS.gallery
  if FLAGS.query:
    config.dataset.query_split = FLAGS.query
  evaluate(config, workdir, step=FLAGS.step)


if __name__ == "__main__":
  # Flags live here, not at import time, so train.py can import this module.
  flags.DEFINE_string("workdir", None, "Training workdir (holds config.json and checkpoints/).", required=True)
  flags.DEFINE_integer("step", None, "Checkpoint step to evaluate; default the latest.")
  flags.DEFINE_string("gallery", None, "Gallery split; default config.dataset.gallery_split.")
  flags.DEFINE_string("query", None, "Query split; default config.dataset.query_split.")
  distributed.define_flags()
  app.run(main)
