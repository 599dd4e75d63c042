"""Retrieval evaluation of a trained checkpoint: a short run of stages.

    python -m histojax.evaluate --workdir DIR [--step N] [--gallery SPLIT] [--query SPLIT]

Stages, each reading what the previous one wrote:
1. export: the gallery and query splits embedded (`<workdir>/export/<split>`,
   resumable, reused when made from the same weights; `histojax.export`);
2. index: the gallery export indexed, or the index already built from it
   reused (`<workdir>/index`; `histojax.retrieval`);
3. neighbours: every query's top k, its own source image excluded;
4. metrics: scores of the ranked lists (`histojax.metrics`) and of balanced
   pairs (`histojax.pairs`), written to `<workdir>/eval/metrics.json`;
5. report: confusion.png, retrieval_grid.png, index.html (`histojax.report`)
   and the printed table.
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
from absl import app, flags
from etils import epath

from histojax import checkpoint, datasets, distributed, export, fileio, identity, metrics, monitor, pairs, report  # noqa: F401
from histojax import config as config_lib
from histojax import health, retrieval
from histojax.data import images, sources


def export_stage(config, workdir: epath.Path, trainer, state, step: int):
  """(gallery, query) exports; one export when both are the same split."""
  gallery_split, query_split = config.dataset.gallery_split, config.dataset.query_split
  fingerprint = identity.fingerprint(trainer, state)
  split_export = lambda split: export.export_split(trainer, state, config, split, workdir / "export" / split,
                                                   step, fingerprint)
  gallery = split_export(gallery_split)
  return gallery, gallery if query_split == gallery_split else split_export(query_split)


def neighbours_stage(config, idx, gallery: export.Export, query: export.Export, k: int):
  """Every query's top k (neighbours, scores) after the configured exclusions."""
  same_split = config.dataset.query_split == config.dataset.gallery_split
  keys = retrieval.exclusion_keys(gallery, query, same_split, config.eval.exclude_same_source)
  return retrieval.retrieve(idx, query, k, keys)


def metrics_stage(config, gallery: export.Export, query: export.Export, neighbors, class_names,
                  scores) -> tuple[dict, list]:
  """(results, pair-task decisions or None): retrieval metrics when the data is labelled,
  pair metrics, and the pair-query task's answers where the dataset has query pairs."""
  results = {}
  if neighbors is not None:
    results = metrics.retrieval_metrics(neighbors, gallery.label, query.label, config.eval.ks, query.source_id,
                                        class_names)
    results.update(image_vote_variants(gallery, query, neighbors, scores, config.eval.ks))
    results.update(metrics.thunder_metrics(metrics.neighbor_labels(neighbors, gallery.label), query.label, class_names))
    results.update(pairs.pair_metrics(gallery, query, config.seed))
  decisions = None
  task_pairs = dataset_pairs(config)
  if task_pairs is not None:
    # The pair-query task: validation pairs name gallery-split patches, query pairs query-split ones.
    task_results, decisions = pairs.answer(gallery.embeddings, gallery.source_id, query.embeddings,
                                           query.source_id, task_pairs, config.seed)
    results.update(task_results)
  return results, decisions


def evaluate(config: ml_collections.ConfigDict, workdir: epath.PathLike, trainer=None, state=None,
             step: int | None = None) -> dict:
  """Runs every stage and returns the metrics dict written to metrics.json."""
  workdir = epath.Path(workdir)
  if state is None:
    trainer, state, step = checkpoint.restore_for_eval(config, workdir, step)
  gallery, query = export_stage(config, workdir, trainer, state, step)
  k = max(config.eval.ks)
  idx, _ = retrieval.build_or_reuse_index(config, workdir, gallery, k)
  class_names = gallery.manifest.get("class_names") or [str(c) for c in range(int(gallery.label.max()) + 1)]
  # A dataset with one class (pair_query's unlabelled patches) has no labels to
  # score retrieval against: only the pair task is reported for it.
  labelled = len(class_names) > 1
  neighbors, scores = neighbours_stage(config, idx, gallery, query, k) if labelled else (None, None)
  results, decisions = metrics_stage(config, gallery, query, neighbors, class_names, scores)
  results["health"] = health.evaluation_record(gallery.embeddings, gallery.manifest.get("spread"), neighbors, scores,
                                               gallery.label, query.label, k)
  health.warn(results["health"]["gallery"], f"gallery export {workdir / 'export' / config.dataset.gallery_split}")
  results.update(step=step, num_gallery=len(gallery.label), num_query=len(query.label),
                 num_query_images=int(len(np.unique(query.source_id))), index_mode=idx.mode,
                 dataset=config.dataset.name, gallery_split=config.dataset.gallery_split,
                 query_split=config.dataset.query_split, exclude_same_source=bool(config.eval.exclude_same_source))
  if jax.process_index() == 0:
    fileio.write_json(workdir / "eval" / "metrics.json", results)
    if decisions is not None:
      fileio.write_atomic(workdir / "eval" / "pair_answers.csv", "patch_a,patch_b,same\n" +
                          "".join(f"{a},{b},{same}\n" for a, b, same in decisions))
    if labelled:
      report.draw_report(workdir / "eval", results, gallery, query, neighbors, scores, class_names, k,
                         image_reader(config), config.seed)
    print(report.format_table(results))
  return results


def image_vote_variants(gallery: export.Export, query: export.Export, neighbors: np.ndarray,
                        scores: np.ndarray, ks) -> dict:
  """Other ways to pool a source image's answer than one vote per retrieved tile:
  votes weighted by similarity (`image_weighted_vote@k`), and whole-source
  retrieval by mean embedding (`image_centroid_vote@k`: the k nearest gallery images)."""
  retrieved = metrics.neighbor_labels(neighbors, gallery.label)
  _, truth = metrics.group_labels(query.label, query.source_id)
  out = {}
  for k in ks:
    _, weighted = metrics.weighted_pooled_vote(retrieved, scores, query.source_id, k)
    _, centroid = metrics.centroid_vote(query.embeddings, query.source_id, gallery.embeddings, gallery.source_id,
                                        gallery.label, k)
    out[f"image_weighted_vote@{k}"] = float(np.mean(weighted == truth))
    out[f"image_centroid_vote@{k}"] = float(np.mean(centroid == truth))
  return out


def image_reader(config):
  """`read(split, row)`: a patch's pixels from the prepared dataset (the report's grid)."""
  opened = {}

  def read(split: str, row: int) -> np.ndarray:
    if split not in opened:
      opened[split] = sources.open_split(config.dataset.name, split, config.dataset.data_dir)
    return images.decode_example(opened[split][row]["image"])
  return read


def dataset_pairs(config) -> dict | None:
  """The dataset's query pairs if it is a pair-task dataset (pair_query), else None."""
  try:
    return sources.read_pairs(config.dataset.name, config.dataset.data_dir)
  except KeyError:
    return None


def run(workdir: str, step: int | None = None, gallery: str | None = None, query: str | None = None) -> dict:
  """Evaluates checkpoint `step` (default the latest) of a training workdir, with its
  saved config and optionally other gallery/query splits."""
  workdir = epath.Path(workdir)
  if not (workdir / "config.json").exists():
    raise FileNotFoundError(f"{workdir} has no config.json: is it a training workdir?")
  config = config_lib.load(workdir / "config.json")
  if gallery:
    config.dataset.gallery_split = gallery
  if query:
    config.dataset.query_split = query
  return evaluate(config, workdir, step=step)


def define_flags() -> None:
  flags.DEFINE_string("workdir", None, "Training workdir (holds config.json and checkpoints/).", required=True)
  flags.DEFINE_integer("step", None, "Checkpoint step to evaluate; default the latest.")
  flags.DEFINE_string("gallery", None, "Gallery split; default config.dataset.gallery_split.")
  flags.DEFINE_string("query", None, "Query split; default config.dataset.query_split.")
  distributed.define_flags()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  FLAGS = flags.FLAGS
  distributed.initialize_from_flags()  # on a pod, every worker runs this same command
  monitor.quiet_libraries()
  try:
    run(FLAGS.workdir, FLAGS.step, FLAGS.gallery, FLAGS.query)
  except FileNotFoundError as e:
    raise app.UsageError(str(e)) from e


if __name__ == "__main__":
  define_flags()
  app.run(main)
