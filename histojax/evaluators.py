"""Evaluation during training: a cheap retrieval score every `eval.every_steps` steps.

As big_vision's evaluators: built once before the loop, then `run(state)`
gives named scalars that the loop logs (TensorBoard and train_metrics.jsonl)
as `during/precision@k`, `during/map@k`, `during/majority_vote@k` for each k
of `eval.ks`, with `during/seconds` (this evaluation's wall time; the first
one of a run includes compiling the embedding) and, on a run's first
evaluation, `during/setup_seconds` (choosing and decoding the rows).

What is scored: `eval.during.gallery_rows` rows of the gallery split and
`eval.during.query_rows` rows of the query split (validation in held-out
recipes), drawn once from `config.seed` and the split sizes, so every
evaluation, every process and a resumed run score the same rows, and a curve
over steps shows the model moving, not the sample. Rows are drawn one by one
rather than as whole source images: for a given budget that covers the most
source images, and between-image variation is what moves held-out figures
(0.05-0.10 between seeds on a few dozen photos). A query never sees its own
source image (`eval.exclude_same_source`), as in the final evaluation.

The rows are decoded and centre-cropped once and kept in memory; each process
holds only its share of every padded global batch (`pipeline.eval_positions`),
and every process runs the same batches and computes the same numbers. Search
is exact (`index.exact_search`), embeddings come from `step.embed` in eval
mode with TTA off. A smaller gallery than the final one retrieves from fewer
candidates, so these figures track training; the full export, index and
report at the end (`histojax.evaluate`) remain the result.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from histojax import mesh as mesh_lib
from histojax import metrics, monitor
from histojax import step as step_lib
from histojax.data import augment, images, pipeline, sources
from histojax.indexing import exact_search

PREFIX = "during/"
GALLERY, QUERY = 0, 1  # stream ids for drawing rows: the two draws differ even from one split


def choose_rows(num_rows: int, count: int, seed: int, role: int) -> np.ndarray:
  """`count` distinct row indices of a split of `num_rows` (all of them if fewer), sorted.

  A pure function of its arguments: the same rows in every evaluation, on every
  process, and after a resume.
  """
  if count >= num_rows:
    return np.arange(num_rows)
  return np.sort(np.random.default_rng([seed, role]).choice(num_rows, count, replace=False))


@dataclasses.dataclass(frozen=True)
class _Picked:
  """The rows `rows` of a random-access source, renumbered from 0."""
  source: object
  rows: np.ndarray

  def __len__(self):
    return len(self.rows)

  def __getitem__(self, i):
    return self.source[int(self.rows[i])]

  def __getitems__(self, indices):
    return self.source.__getitems__([int(self.rows[i]) for i in indices])


@dataclasses.dataclass(frozen=True)
class Subsample:
  """Chosen rows of one split: everyone's labels and source ids, this process's pixels."""
  split: str
  rows: np.ndarray  # [n] row indices into the split
  label: np.ndarray  # [n]
  source_id: np.ndarray  # [n]
  images: np.ndarray  # [local rows, H, W, 3] uint8: this process's share of each global batch, zeros as padding


def load_subsample(source, split: str, rows: np.ndarray, image_size: int, global_batch: int) -> Subsample:
  """Reads `rows` of `source`, decoding and centre-cropping the ones this process feeds."""
  picked = _Picked(source, np.asarray(rows))
  meta = sources.read_metadata(picked)
  positions = pipeline.eval_positions(len(picked), global_batch, jax.process_index(), jax.process_count())
  pixels = np.zeros((len(positions), image_size, image_size, 3), np.uint8)
  for slot, position in enumerate(positions):
    if position >= 0:
      pixels[slot] = augment.center_crop(images.decode_example(picked[position]["image"]), image_size)
  return Subsample(split, picked.rows, meta["label"], meta["source_id"], pixels)


def embed_subsample(subsample: Subsample, embed_fn: Callable, mesh: Mesh, global_batch: int) -> np.ndarray:
  """[n, d] float32 embeddings of the subsample's rows, in order.

  `embed_fn(images)` maps a global uint8 batch to its embeddings. Process p
  holds rows [p * local, (p + 1) * local) of each global batch, so the gathered
  batches are the rows in order, padding last.
  """
  local = global_batch // jax.process_count()
  parts = []
  for start in range(0, len(subsample.images), local):
    batch = mesh_lib.to_global({"image": subsample.images[start:start + local]}, mesh)
    parts.append(np.asarray(mesh_lib.to_host(embed_fn(batch["image"])), np.float32))
  return np.concatenate(parts)[:len(subsample.rows)]


def exclusion_keys(gallery: Subsample, query: Subsample, exclude_same_source: bool):
  """(gallery keys, query keys) whose equality removes a gallery row from a query's
  results, or None: the source image with `exclude_same_source`, else the row
  itself when both come from one split (as `retrieval.exclusion_keys`)."""
  if exclude_same_source:
    return gallery.source_id, query.source_id
  if gallery.split == query.split:
    return gallery.rows, query.rows
  return None


def score(gallery_emb: np.ndarray, gallery_labels: np.ndarray, query_emb: np.ndarray,
          query_labels: np.ndarray, ks, keys=None) -> dict[str, float]:
  """P@k, mAP@k and majority vote@k of each query's top k gallery rows by cosine,
  exactly, after the exclusions `keys` names (see `exclusion_keys`)."""
  k = max(ks)
  extra = 0 if keys is None else metrics.max_shared_source(*keys)
  neighbors, _ = exact_search(_unit(gallery_emb), _unit(query_emb), k + extra)
  if keys is not None:
    neighbors = metrics.drop_same_source(neighbors, keys[0], keys[1], k)
  retrieved = metrics.neighbor_labels(neighbors, gallery_labels)
  out = {}
  for k in ks:
    out[f"precision@{k}"] = metrics.precision_at_k(retrieved, query_labels, k)
    out[f"map@{k}"] = metrics.map_at_k(retrieved, query_labels, k)
    out[f"majority_vote@{k}"] = metrics.majority_vote_at_k(retrieved, query_labels, k)
  return out


def _unit(x: np.ndarray) -> np.ndarray:
  """Rows scaled to length 1 in float32, as the index searches (bf16 models give near-unit rows)."""
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def is_due(step: int, every_steps: int, total_steps: int, skip_last: bool) -> bool:
  """Every `every_steps` steps; never at step 0, nor at the last step with `skip_last`."""
  if every_steps <= 0 or step <= 0 or step % every_steps:
    return False
  return not (skip_last and step == total_steps)


class RetrievalEvaluator:
  """A fixed gallery and query subsample, scored with whatever `embed_fn` a run gives."""

  def __init__(self, gallery: Subsample, query: Subsample, ks, keys, mesh: Mesh, global_batch: int,
               setup_seconds: float = 0.0):
    self.gallery, self.query, self.ks, self.keys = gallery, query, tuple(ks), keys
    self.mesh, self.global_batch = mesh, global_batch
    self._setup_seconds = setup_seconds  # reported once, with the first evaluation

  def run(self, embed_fn: Callable) -> dict[str, float]:
    """`during/...` scalars: the scores and the seconds this evaluation took."""
    start = time.perf_counter()
    gallery = embed_subsample(self.gallery, embed_fn, self.mesh, self.global_batch)
    query = embed_subsample(self.query, embed_fn, self.mesh, self.global_batch)
    scores = score(gallery, self.gallery.label, query, self.query.label, self.ks, self.keys)
    out = {PREFIX + name: value for name, value in scores.items()}
    out[PREFIX + "seconds"] = time.perf_counter() - start
    if self._setup_seconds:
      out[PREFIX + "setup_seconds"], self._setup_seconds = self._setup_seconds, 0.0
    return out


class DuringTraining:
  """The evaluator the training loop calls: `due(step)`, then `run(state)`."""

  def __init__(self, config: ml_collections.ConfigDict, trainer: step_lib.Trainer):
    start = time.perf_counter()
    cfg, data, inp = config.eval, config.dataset, config.input
    mesh_lib.local_batch_size(inp.eval_batch_size, trainer.mesh, "input.eval_batch_size")
    if len(sources.class_names(data.name, data.data_dir)) < 2:
      raise ValueError(f"eval.every_steps={cfg.every_steps}: {data.name!r} has one class (unlabelled), so "
                       "there is no retrieval to score while training; set eval.every_steps=0")
    query_split = cfg.during.query_split or data.query_split
    # The last step is left to the full evaluation when that scores the same queries a moment
    # later on every row; when it scores other ones (test, while these are validation), the
    # curve gets its last point here.
    self._when = (cfg.every_steps, config.total_steps, cfg.at_end and query_split == data.query_split)
    gallery = _subsample(data, data.gallery_split, cfg.during.gallery_rows, config.seed, GALLERY, inp)
    query = _subsample(data, query_split, cfg.during.query_rows, config.seed, QUERY, inp,
                       "eval.during.query_split" if cfg.during.query_split else "dataset.query_split")
    keys = exclusion_keys(gallery, query, cfg.exclude_same_source)
    self.evaluator = RetrievalEvaluator(gallery, query, cfg.ks, keys, trainer.mesh, inp.eval_batch_size,
                                        time.perf_counter() - start)
    # TTA off: the cheap view of the model; compiled once, on the first evaluation.
    self._embed = step_lib.jit_embed(dataclasses.replace(trainer, tta="none"))
    monitor.info("evaluating during training every %d steps: %d gallery rows of %r (%d images), %d queries of %r "
                 "(%d images)", cfg.every_steps, len(gallery.rows), gallery.split, len(set(gallery.source_id)),
                 len(query.rows), query.split, len(set(query.source_id)))

  def due(self, step: int) -> bool:
    return is_due(step, *self._when)

  def run(self, state) -> dict[str, float]:
    return self.evaluator.run(lambda batch: self._embed(state, batch))


def _subsample(data, split: str, count: int, seed: int, role: int, inp, field: str = "dataset.gallery_split"):
  try:
    source = sources.open_split(data.name, split, data.data_dir)
  except KeyError as e:
    raise ValueError(f"{field}={split!r}: {e.args[0]}") from None
  rows = choose_rows(len(source), count, seed, role)
  if not len(rows):
    raise ValueError(f"{field}={split!r} has no examples to evaluate during training")
  return load_subsample(source, split, rows, inp.image_size, inp.eval_batch_size)


def from_config(config: ml_collections.ConfigDict, trainer: step_lib.Trainer) -> DuringTraining | None:
  """The run's evaluator, or None when `eval.every_steps` is 0."""
  return DuringTraining(config, trainer) if config.eval.every_steps > 0 else None
