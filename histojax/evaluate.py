"""Retrieval evaluation of a trained checkpoint.

    python -m histojax.evaluate --workdir DIR [--step N] [--gallery SPLIT] [--query SPLIT]

Stages, each reading only what the previous one wrote: export the gallery and
query splits (`<workdir>/export/<split>`, resumable), index the gallery or
reuse the index already there (`<workdir>/index`), search it with every query
(a query's own source image excluded), score the ranked lists and draw the
report (`<workdir>/eval/`: metrics.json, confusion.png, retrieval_grid.png,
index.html). The metrics are also printed as a table.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import ml_collections
import numpy as np
from absl import app, flags
from etils import epath

from histojax import checkpoint, distributed, export, index, metrics, monitor, pairs, report
from histojax import config as config_lib
from histojax import mesh as mesh_lib
from histojax import step as step_lib
from histojax.data import pipeline, sources

GRID_ROWS = 12  # queries in the retrieval grid: every class in turn
MAX_PAIR_ANCHORS = 20_000  # pairs per side for the c-index: plenty for 3 decimals, bounded memory


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


def retrieve(idx: index.Index, query: export.Export, k: int, keys):
  """Top-k (neighbours, scores) of every query after exclusions."""
  if keys is None:
    return index.search(idx, query.embeddings, k)
  extra = metrics.max_shared_source(*keys)
  neighbors, scores = index.search(idx, query.embeddings, k + extra)
  columns = metrics.kept_columns(neighbors, keys[0], keys[1], k)
  safe = np.maximum(columns, 0)
  return (np.where(columns >= 0, np.take_along_axis(neighbors, safe, 1), -1),
          np.where(columns >= 0, np.take_along_axis(scores, safe, 1), -np.inf).astype(np.float32))


def index_manifest(config, workdir: epath.Path, gallery: export.Export, k: int) -> dict:
  """What the index is of: checkpoint, model, data, normalisation, tiling, knobs."""
  man = gallery.manifest
  return {"checkpoint": {"workdir": str(workdir.absolute()), "step": man["step"], "fingerprint": man["fingerprint"]},
          **{key: man.get(key) for key in ("dataset", "split", "step", "model", "image_size", "fingerprint",
                                            "normalization", "class_names", "tiling", "pq")},
          "index_config": dataclasses.asdict(index.IndexConfig.from_config(config.eval.index)), "build_k": k}


def build_or_reuse_index(config, workdir: epath.Path, gallery: export.Export, k: int):
  """(index, manifest): the one in `<workdir>/index` when it was built from this very
  gallery export with these knobs, else a new one (saved by process 0)."""
  wanted = index_manifest(config, workdir, gallery, k)
  identity = {key: wanted[key] for key in ("dataset", "split", "step", "fingerprint", "model", "image_size",
                                          "index_config", "build_k")}
  found = index.load_if_matching(workdir / "index", {**identity, "count": len(gallery.label)})
  if found is not None:
    monitor.info("reusing the index in %s", workdir / "index")
    return found
  # With PQ codes, 'auto' searches them (ADC); a float mode named in config uses the embeddings.
  idx = index.build(gallery.embeddings, config.eval.index, k=k, codes=gallery.codes, codebooks=gallery.codebooks)
  manifest = wanted
  if jax.process_index() == 0:
    manifest = index.save(idx, workdir / "index", wanted, gallery.rows())
  return idx, manifest


def sample_pairs(anchor: export.Export, other: export.Export, rng: np.random.Generator, same_split: bool,
                 max_anchors: int = MAX_PAIR_ANCHORS):
  """For each anchor row (at most `max_anchors`, drawn at random), one same-class and one
  other-class partner drawn from `other`, never from the anchor's own source image (nor
  the row itself): balanced pairs. Returns (similarity, same); an anchor whose class
  offers no partner is left out."""
  chosen = np.arange(len(anchor.label))
  if len(chosen) > max_anchors:
    chosen = np.sort(rng.choice(len(chosen), max_anchors, replace=False))
  sims, same = [], []
  for want_same in (True, False):
    partner = np.full(len(anchor.label), -1)
    for c in np.unique(anchor.label[chosen]):
      anchors = chosen[anchor.label[chosen] == c]
      pool = np.flatnonzero((other.label == c) == want_same)
      for _ in range(16 if len(pool) else 0):  # rejection rounds against own-source draws
        todo = anchors[partner[anchors] < 0]
        if not len(todo):
          break
        draw = pool[rng.integers(0, len(pool), len(todo))]
        ok = other.source_id[draw] != anchor.source_id[todo]
        if same_split:
          ok &= draw != todo
        partner[todo[ok]] = draw[ok]
    rows = np.flatnonzero(partner >= 0)
    sims.append(np.sum(anchor.embeddings[rows] * other.embeddings[partner[rows]], 1))
    same.append(np.full(len(rows), want_same))
  return np.concatenate(sims), np.concatenate(same)


def pair_metrics(gallery: export.Export, query: export.Export, seed: int = 0) -> dict:
  """c-index on balanced same/different pairs: the threshold is chosen on gallery-gallery
  pairs (labelled validation pairs), then applied to query-gallery pairs."""
  rng = np.random.default_rng(seed)
  val_sim, val_same = sample_pairs(gallery, gallery, rng, same_split=True)
  sim, same = sample_pairs(query, gallery, rng, same_split=query is gallery)
  if not len(val_sim) or not len(sim) or same.all() or not same.any():
    return {}
  threshold = metrics.choose_pair_threshold(val_sim, val_same)
  return {"pair_threshold": threshold if np.isfinite(threshold) else None,  # JSON has no infinity
          "pair_c_index": metrics.pair_c_index(sim, same, threshold),
          "pair_concordance": metrics.concordance_index(sim, same.astype(np.int64)), "num_pairs": int(len(sim))}


def evaluate(config: ml_collections.ConfigDict, workdir: epath.PathLike, trainer=None, state=None,
             step: int | None = None) -> dict:
  """Runs every stage and returns the metrics dict written to metrics.json."""
  workdir = epath.Path(workdir)
  if state is None:
    trainer, state, step = restore_for_eval(config, workdir, step)
  ev = config.eval
  gallery_split, query_split = config.dataset.gallery_split, config.dataset.query_split
  fingerprint = export.fingerprint(trainer, state)
  gallery = export.export_split(trainer, state, config, gallery_split, workdir / "export" / gallery_split,
                                step, fingerprint)
  query = (gallery if query_split == gallery_split else
           export.export_split(trainer, state, config, query_split, workdir / "export" / query_split, step,
                               fingerprint))

  k = max(ev.ks)
  idx, _ = build_or_reuse_index(config, workdir, gallery, k)
  class_names = gallery.manifest.get("class_names") or [str(c) for c in range(int(gallery.label.max()) + 1)]
  # A dataset with one class (pair_query's unlabelled patches) has no labels to
  # score retrieval against: only the pair task is reported for it.
  labelled = len(class_names) > 1
  results, neighbors, scores = {}, None, None
  if labelled:
    keys = exclusion_keys(gallery, query, query_split == gallery_split, ev.exclude_same_source)
    neighbors, scores = retrieve(idx, query, k, keys)
    results = metrics.retrieval_metrics(neighbors, gallery.label, query.label, ev.ks, query.source_id,
                                        class_names)
    results.update(image_vote_variants(gallery, query, neighbors, scores, ev.ks))
    results.update(pair_metrics(gallery, query, config.seed))
  decisions = None
  task_pairs = dataset_pairs(config)
  if task_pairs is not None:
    # The pair-query task: validation pairs name gallery-split patches, query pairs query-split ones.
    task_results, decisions = pairs.answer(gallery.embeddings, gallery.source_id, query.embeddings,
                                           query.source_id, task_pairs, config.seed)
    results.update(task_results)
  results.update(step=step, num_gallery=len(gallery.label), num_query=len(query.label),
                 num_query_images=int(len(np.unique(query.source_id))), index_mode=idx.mode,
                 dataset=config.dataset.name, gallery_split=gallery_split, query_split=query_split,
                 exclude_same_source=bool(ev.exclude_same_source))
  if jax.process_index() == 0:
    write_metrics(workdir / "eval" / "metrics.json", results)
    if decisions is not None:
      write_pair_answers(workdir / "eval" / "pair_answers.csv", decisions)
    if labelled:
      draw_report(config, workdir / "eval", results, gallery, query, neighbors, scores, class_names, k)
    print(format_table(results))
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


def draw_report(config, eval_dir: epath.Path, results: dict, gallery: export.Export, query: export.Export,
                neighbors: np.ndarray, scores: np.ndarray, class_names: list[str], k: int) -> dict:
  """Confusion matrices (per patch and per source image, majority vote at k) and the grid."""
  retrieved = metrics.neighbor_labels(neighbors, gallery.label)
  num_classes = len(class_names)
  patch = metrics.confusion_matrix(query.label, metrics.majority_vote(retrieved, k), num_classes)
  _, image_truth = metrics.group_labels(query.label, query.source_id)
  _, image_vote, _ = metrics.pooled_vote(retrieved, query.source_id, k)
  image = metrics.confusion_matrix(image_truth, image_vote, num_classes)
  confusions = [(f"patches: majority vote @{k}", patch), (f"source images: pooled vote @{k}", image)]

  rows = report.pick_grid_queries(query.label, GRID_ROWS, config.seed)
  read = _image_reader(config)
  grid = [report.GridRow(read(config.dataset.query_split, int(q)), int(query.label[q]), str(query.source_id[q]),
                         [None if n < 0 else (read(config.dataset.gallery_split, int(n)), int(gallery.label[n]),
                                              float(s)) for n, s in zip(neighbors[q], scores[q])])
          for q in rows]
  title = (f"{results['query_split']} queries (down) and their top {k} {results['gallery_split']} patches "
           f"(across), own source image excluded; green: same class, red: other class")
  return report.write_report(eval_dir, results, class_names, confusions, grid, title)


def _image_reader(config):
  opened = {}

  def read(split: str, row: int) -> np.ndarray:
    if split not in opened:
      opened[split] = sources.open_split(config.dataset.name, split, config.dataset.data_dir)
    return pipeline.decode_image(opened[split][row]["image"])
  return read


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


def dataset_pairs(config) -> dict | None:
  """The dataset's query pairs if it is a pair-task dataset (pair_query), else None."""
  try:
    return sources.read_pairs(config.dataset.name, config.dataset.data_dir)
  except KeyError:
    return None


def write_pair_answers(path: epath.Path, decisions) -> None:
  """One row per query pair: both patch ids and the decision (1 same class, 0 different)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  staging = path.parent / f".{path.name}.partial"
  staging.write_text("patch_a,patch_b,same\n" + "".join(f"{a},{b},{same}\n" for a, b, same in decisions))
  staging.replace(path)


def write_metrics(path: epath.Path, results: dict) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  staging = path.parent / f".{path.name}.partial"
  staging.write_text(json.dumps(results, indent=2, sort_keys=True))
  staging.replace(path)  # atomic overwrite


def format_table(results: dict) -> str:
  """Rows per metric family (micro and macro), columns per k, then the pair metrics."""
  rows = report.metric_rows(results)
  ks = sorted({int(name.split("@")[1]) for name in results if name.startswith("precision@")})
  head = f"{'metric':<22}" + "".join(f"{'@' + str(k):>9}" for k in ks)
  lines = [f"retrieval at step {results['step']}: {results['num_query']} queries ({results['query_split']}) "
           f"against {results['num_gallery']} gallery patches ({results['gallery_split']}), "
           f"index {results['index_mode']}"]
  if rows:
    lines += [head, "-" * len(head)]
    lines += [f"{name:<22}" + "".join(f"{v:>9.4f}" for v in values) for name, _, values in rows]
  if "pair_c_index" in results:
    threshold = results["pair_threshold"]
    lines.append(f"pairs: c-index {results['pair_c_index']:.4f} at threshold "
                 f"{'(all one side)' if threshold is None else f'{threshold:.3f}'}, "
                 f"concordance {results['pair_concordance']:.4f} ({results['num_pairs']} pairs)")
  if "pair_task_held_out_c_index" in results:
    lines.append(f"pair task: c-index {results['pair_task_held_out_c_index']:.4f} held out on "
                 f"{results['pair_task_validation_pairs']} validation pairs; "
                 f"{results['pair_task_query_pairs']} query pairs answered in eval/pair_answers.csv")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  FLAGS = flags.FLAGS
  distributed.initialize_from_flags()  # on a pod, every worker runs this same command
  monitor.quiet_libraries()
  workdir = epath.Path(FLAGS.workdir)
  if not (workdir / "config.json").exists():
    raise app.UsageError(f"{workdir} has no config.json: is it a training workdir?")
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
