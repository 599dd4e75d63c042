"""Nearest-neighbour search over a gallery, in memory: ScaNN, exact numpy search, and ADC
over PQ codes. Everything that depends on the index mode lives here (build, search, append,
delete, retrain); `store` reads and writes the modes' files.

Embeddings are L2-normalised and scored by dot product (cosine similarity).
The ScaNN configuration is picked from the gallery size (`IndexConfig`, every
knob in `config.eval.index`):
- below `brute_force_below` (20k) rows: brute force, exact in float32;
- above: a partitioning tree (about sqrt(n) leaves, a tenth searched) +
  asymmetric hashing (AH: 16 centres per block of `dims_per_block` dims) +
  exact re-ranking of max(250, 25 k, n / 1000) candidates (`default_reorder`).
ScaNN's guide suggests AH without a tree up to ~100k rows; `ah_below` turns
that tier on, but it is off by default because on clustered embeddings (what
a trained model produces: a few large class clusters) AH alone lets too many
near-equal candidates compete for the re-ranking slots: at 100k x 128 with
24 clusters AH + reorder reached recall@10 0.83 at 4.5k queries/s where tree
+ AH reached 0.998 at 41k (512-d: 0.81 vs 0.99; bench/retrieval.py, docs/benchmarks.md). AH's code length
matters as much: with 2 dims per block a 32-d gallery gets 64-bit codes and
recall@10 fell to 0.79 at 100k rows, with 1 dim per block 0.999; hence
`dims_per_block` 0 -> 1 below 128 dims, else 2 (256+ bit codes).

Queries are searched with `search_batched` (`search_batched_parallel` from
512 queries); a k beyond the re-ranking depth widens the candidate pool.
`exact_search` is the ground truth and the fallback (mode 'exact'); ties are
broken by the lower gallery row so results are reproducible.

A gallery exported as PQ codes (SPQ) is searched by asymmetric distance:
mode 'adc' (which 'auto' picks when codes are given) keeps only the codes and
codebooks, scores with `pq.tables` + `pq.adc_scores`, and never needs the
float gallery.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import scann

from histojax import health, pq

MODES = ("auto", "exact", "brute_force", "ah", "tree_ah", "adc")
REORDER_DTYPES = ("float32", "bfloat16", "int8")


@dataclasses.dataclass(frozen=True)
class IndexConfig:
  """Every ScaNN knob; 0 means "chosen from the gallery size". The one place the defaults are
  written: `config.eval.index` is built from these fields."""
  mode: str = "auto"  # auto | exact | brute_force | ah | tree_ah | adc (PQ codes; auto picks it for codes)
  brute_force_below: int = 20_000  # auto: brute force below this many gallery rows
  ah_below: int = 0  # AH without a tree below this many rows; 0: no AH-only tier (module docstring)
  num_leaves: int = 0  # 0 -> about sqrt(n)
  leaves_to_search: int = 0  # 0 -> about num_leaves / 10
  training_sample_size: int = 250_000  # rows used to train the tree and the AH codebooks
  dims_per_block: int = 0  # AH: dims per 16-centre sub-space; 0 -> 1 below 128 dims, else 2
  anisotropic_threshold: float = 0.2  # AH: ScaNN's anisotropic loss threshold (cosine)
  reorder: int = 0  # 0 -> `default_reorder(n, k)` candidates re-ranked exactly
  reorder_dtype: str = "float32"  # bfloat16 / int8 halve / quarter the re-ranking copy
  pq_metric: str = "dot_product"  # ADC similarity for PQ codes

  @classmethod
  def from_config(cls, cfg) -> IndexConfig:
    """From `config.eval.index` (a ConfigDict or dict); missing fields keep defaults."""
    if isinstance(cfg, IndexConfig):
      return cfg
    given = dict(cfg.items()) if hasattr(cfg, "items") else {}
    unknown = set(given) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"unknown eval.index field(s) {sorted(unknown)}")
    out = cls(**given)
    out.validate()
    return out

  def validate(self) -> None:
    if self.mode not in MODES:
      raise ValueError(f"eval.index.mode must be one of {MODES}, got {self.mode!r}")
    if self.reorder_dtype not in REORDER_DTYPES:
      raise ValueError(f"eval.index.reorder_dtype must be one of {REORDER_DTYPES}, got {self.reorder_dtype!r}")
    if self.pq_metric not in pq.METRICS:
      raise ValueError(f"eval.index.pq_metric must be one of {pq.METRICS}, got {self.pq_metric!r}")
    for name in ("brute_force_below", "ah_below", "num_leaves", "leaves_to_search", "reorder"):
      if getattr(self, name) < 0:
        raise ValueError(f"eval.index.{name} must be >= 0, got {getattr(self, name)}")


@dataclasses.dataclass
class Index:
  mode: str
  gallery: np.ndarray | None  # [n, d] float32 unit rows in memory; on disk only for 'exact'
  searcher: object | None = None  # ScaNN searcher; None for 'exact' and 'adc'
  codes: np.ndarray | None = None  # [n, M] PQ codes ('adc')
  codebooks: np.ndarray | None = None  # [M, K, d/M] ('adc')
  params: dict = dataclasses.field(default_factory=dict)  # resolved knobs, for the manifest
  size: int = -1  # rows; from the arrays when not given
  dim: int = -1

  def __post_init__(self):
    if self.size < 0:
      self.size = len(self.codes if self.gallery is None else self.gallery)
    if self.dim < 0:
      self.dim = (self.gallery.shape[1] if self.gallery is not None
                  else self.codebooks.shape[0] * self.codebooks.shape[2])


def l2_normalize(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def resolve_mode(n: int, cfg, has_codes: bool = False) -> str:
  cfg = IndexConfig.from_config(cfg)
  if cfg.mode == "adc" and not has_codes:
    raise ValueError("eval.index.mode='adc' searches PQ codes, but the gallery export has none "
                     "(its model has no codebooks)")
  if cfg.mode != "auto":
    return cfg.mode
  if has_codes:
    return "adc"
  if n < cfg.brute_force_below:
    return "brute_force"
  return "ah" if n < cfg.ah_below else "tree_ah"


def build(gallery: np.ndarray | None, cfg, k: int = 10, codes: np.ndarray | None = None,
          codebooks: np.ndarray | None = None) -> Index:
  """Index over `gallery` rows, or over PQ `codes` in mode 'adc' (chosen by 'auto' when
  codes are given); `k` sizes the default re-ranking depth."""
  cfg = IndexConfig.from_config(cfg)
  n = len(codes) if gallery is None else len(gallery)
  if n == 0:
    raise ValueError("cannot index an empty gallery")
  mode = resolve_mode(n, cfg, codes is not None)
  if mode == "adc":
    codebooks = pq.check_codebooks(codebooks)
    pq.check_codes(codes, codebooks)
    return Index(mode, None, codes=codes, codebooks=codebooks, params={"pq_metric": cfg.pq_metric})
  if gallery is None:
    raise ValueError(f"index mode {mode!r} needs float gallery embeddings")
  gallery = l2_normalize(gallery)
  health.warn({"mean_norm": health.mean_norm(gallery), "dim": gallery.shape[1]}, f"index gallery of {n} rows")
  if mode == "exact":
    return Index(mode, gallery)
  return _build_scann(gallery, mode, cfg, k)


def default_reorder(n: int, k: int) -> int:
  """Candidates re-ranked exactly: max(250, 25 k, n / 1000).

  The n / 1000 term is measured: the bigger the gallery, the more crowded its
  class clusters and the more AH-scored candidates tie for the top k. On 1M
  clustered 512-d rows recall@10 was 0.939 with 250 re-ranked, 0.981 with
  500 and 0.997 with 1000, at 849, 723 and 796 queries/s (the tree's leaves
  searched made no difference: 100 or 200 of 1000 gave the same recall).
  """
  return max(250, 25 * k, n // 1000)


def _build_scann(gallery: np.ndarray, mode: str, cfg: IndexConfig, k: int) -> Index:
  n, dim = gallery.shape
  builder = scann.scann_ops_pybind.builder(gallery, min(k, n), "dot_product")
  if mode == "brute_force":
    return Index(mode, gallery, builder.score_brute_force().build())
  dims_per_block = cfg.dims_per_block or (1 if dim < 128 else 2)
  if dim % dims_per_block:
    raise ValueError(f"embedding dim {dim} is not a multiple of eval.index.dims_per_block={dims_per_block}")
  params = {}
  sample = min(n, cfg.training_sample_size)
  if mode == "tree_ah":
    leaves = cfg.num_leaves or max(2, int(math.sqrt(n)))
    to_search = cfg.leaves_to_search or max(1, leaves // 10)
    builder = builder.tree(num_leaves=leaves, num_leaves_to_search=to_search, training_sample_size=sample)
    params.update(num_leaves=leaves, leaves_to_search=to_search)
  builder = builder.score_ah(dims_per_block, anisotropic_quantization_threshold=cfg.anisotropic_threshold,
                             training_sample_size=sample)
  reorder = cfg.reorder or default_reorder(n, k)
  reorder_type = scann.scann_ops_pybind.scann_builder.ReorderType[cfg.reorder_dtype.upper()]
  searcher = builder.reorder(reorder, quantize=reorder_type).build()
  params.update(training_sample_size=sample, dims_per_block=dims_per_block,
                anisotropic_threshold=cfg.anisotropic_threshold, reorder=reorder, reorder_dtype=cfg.reorder_dtype)
  return Index(mode, gallery, searcher, params=params)


# --- Search ---------------------------------------------------------------------

def top_k(scores: np.ndarray, k: int, offset: int = 0):
  """Per row the k best columns: score descending, then column ascending, so ties
  are deterministic. Returns (columns + offset, int64 [q, min(k, n)]; their scores)."""
  scores = np.asarray(scores, np.float32)
  q, n = scores.shape
  k_eff = min(k, n)
  cols = np.broadcast_to(np.arange(n), (q, n))
  if k_eff < n:
    cols = np.argpartition(-scores, k_eff - 1, axis=1)[:, :k_eff]
    kth = np.take_along_axis(scores, cols, 1).min(1)
    # argpartition cuts a tie at the k-th score arbitrarily; redo the (rare) rows
    # that have more columns at or above it than k, keeping the lowest columns.
    for row in np.flatnonzero((scores >= kth[:, None]).sum(1) > k_eff):
      tied = np.flatnonzero(scores[row] >= kth[row])
      cols[row] = tied[np.lexsort((tied, -scores[row, tied]))[:k_eff]]
  picked = np.take_along_axis(scores, cols, 1)
  order = np.lexsort((cols, -picked), axis=1)
  return np.take_along_axis(cols, order, 1).astype(np.int64) + offset, np.take_along_axis(picked, order, 1)


def _merge(best: tuple | None, block: tuple, k: int):
  if best is None:
    return block
  rows, scores = np.concatenate([best[0], block[0]], 1), np.concatenate([best[1], block[1]], 1)
  # Rows are increasing across blocks, so column order equals row order for ties.
  cols, top = top_k(scores, k)
  return np.take_along_axis(rows, cols, 1), top


def _blocked_top_k(score_block, num_queries: int, num_rows: int, k: int, cells: int = 1 << 24):
  """Top-k over a [num_queries, num_rows] score matrix produced block by block by
  `score_block(query_slice, row_slice)`, never holding more than ~`cells` scores."""
  neighbors = np.full((num_queries, k), -1, np.int64)
  scores = np.full((num_queries, k), -np.inf, np.float32)
  if num_rows == 0 or num_queries == 0:
    return neighbors, scores
  row_chunk = min(num_rows, 1 << 16)
  query_chunk = max(1, cells // max(row_chunk, 1))
  for q0 in range(0, num_queries, query_chunk):
    qs, best = slice(q0, q0 + query_chunk), None
    for r0 in range(0, num_rows, row_chunk):
      block = score_block(qs, slice(r0, r0 + row_chunk))
      best = _merge(best, top_k(block, k, r0), k)
    neighbors[qs, :best[0].shape[1]], scores[qs, :best[1].shape[1]] = best
  return neighbors, scores


def exact_search(gallery: np.ndarray, queries: np.ndarray, k: int):
  """Top-k by dot product, exactly; the ground truth for ScaNN. Equal scores keep
  the lower gallery row first; -1 / -inf past the gallery's end."""
  queries = np.asarray(queries, np.float32)
  return _blocked_top_k(lambda qs, rs: queries[qs] @ gallery[rs].T, len(queries), len(gallery), k)


def adc_search(queries: np.ndarray, codes: np.ndarray, codebooks: np.ndarray, k: int,
               metric: str = "dot_product"):
  """Top-k gallery rows by asymmetric distance to PQ codes (see `pq`): float queries,
  coded gallery. Same ordering and padding as `exact_search`."""
  pq.check_codes(codes, codebooks)
  tables = pq.tables(np.asarray(queries, np.float32), codebooks, metric)
  return _blocked_top_k(lambda qs, rs: pq.adc_scores(tables[qs], codes[rs]), len(queries), len(codes), k)


def search(index: Index, queries: np.ndarray, k: int):
  """(neighbors int64 [q, k], scores float32 [q, k]); -1 / -inf past the gallery's end."""
  if index.mode == "adc":  # queries as the model gives them: codes were made from the same space
    return adc_search(queries, index.codes, index.codebooks, k, index.params.get("pq_metric", "dot_product"))
  queries = l2_normalize(queries)
  if index.searcher is None:
    return exact_search(index.gallery, queries, k)
  k_eff = min(k, index.size)
  # A k beyond the re-ranking depth would be cut to it: widen the pool as the default depth does.
  reorder = index.params.get("reorder", 0)
  pre = max(reorder, 25 * k_eff) if index.mode in ("ah", "tree_ah") and k_eff > reorder else None
  # The parallel call splits big batches over threads (all cores); small ones gain nothing.
  search_fn = index.searcher.search_batched_parallel if len(queries) >= 512 else index.searcher.search_batched
  found, dist = search_fn(queries, final_num_neighbors=k_eff, pre_reorder_num_neighbors=pre)
  neighbors = np.full((len(queries), k), -1, np.int64)
  scores = np.full((len(queries), k), -np.inf, np.float32)
  neighbors[:, :k_eff], scores[:, :k_eff] = found, dist
  return neighbors, scores


# --- Growing and shrinking in place (histojax.indexing.growth decides when) -----------------

def append(idx: Index, embeddings: np.ndarray) -> Index:
  """`idx` with `embeddings` appended as rows size..size+m-1 (a ScaNN searcher in place)."""
  embeddings = np.asarray(embeddings, np.float32)
  if embeddings.ndim != 2 or embeddings.shape[1] != idx.dim:
    raise ValueError(f"new rows have shape {embeddings.shape}; the index holds {idx.dim}-d rows")
  if idx.mode == "adc":  # encoded with the model's own codebooks, as export encodes the gallery
    codes = pq.encode(embeddings, idx.codebooks, idx.params.get("pq_metric", "dot_product"))
    return dataclasses.replace(idx, codes=np.concatenate([idx.codes, codes.astype(idx.codes.dtype)]),
                               size=idx.size + len(codes))
  unit = l2_normalize(embeddings)
  if idx.mode == "exact":
    return dataclasses.replace(idx, gallery=np.concatenate([idx.gallery, unit]), size=idx.size + len(unit))
  # ScaNN's Python wrapper upserts only with string docids (pickled beside the
  # searcher); positions are all we need, so the pybind searcher is called directly.
  idx.searcher.searcher.upsert([None] * len(unit), unit, 256)
  return dataclasses.replace(idx, gallery=None, size=idx.size + len(unit))


def delete_order(n: int, positions) -> np.ndarray:
  """Old row of every row left after deleting `positions` ScaNN's way (highest first,
  each hole filled by the current last row)."""
  order = list(range(n))
  for p in sorted(set(int(p) for p in positions), reverse=True):
    last = order.pop()
    if p < len(order):
      order[p] = last
  return np.array(order, np.int64)


def delete(idx: Index, positions) -> tuple[Index, np.ndarray]:
  """(`idx` without `positions`, `delete_order`: apply it to the rows). Every mode renumbers
  the rows ScaNN's way, so rows.npz follows one rule whatever the mode."""
  order = delete_order(idx.size, positions)
  if len(order) == 0:
    raise ValueError("removing these sources would leave the index empty")
  if idx.mode == "adc":
    return dataclasses.replace(idx, codes=idx.codes[order], size=len(order)), order
  if idx.mode == "exact":
    return dataclasses.replace(idx, gallery=idx.gallery[order], size=len(order)), order
  idx.searcher.searcher.delete(sorted(set(int(p) for p in positions), reverse=True))
  return dataclasses.replace(idx, gallery=None, size=len(order)), order


def trained(idx: Index) -> bool:
  """Whether the mode has a partition or codebooks trained on the rows (tree, AH), which
  rows added later can drift from; exact, brute force and ADC (the model's codebooks) cannot."""
  return idx.mode in ("ah", "tree_ah")


def retrain(idx: Index) -> None:
  """Retrains a tree/AH searcher on its current rows, in place (ScaNN's `rebalance`)."""
  idx.searcher.rebalance()
