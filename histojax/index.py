"""Nearest-neighbour search over a gallery: ScaNN, exact numpy search, and ADC over PQ codes.

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
+ AH reached 0.998 at 41k (512-d: 0.81 vs 0.99; bench/retrieval.py, README). AH's code length
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
import json
import math
import tempfile

import numpy as np
from etils import epath

from histojax import fileio, health, pq, untrusted

MODES = ("auto", "exact", "brute_force", "ah", "tree_ah", "adc")
REORDER_DTYPES = ("float32", "bfloat16", "int8")
FORMAT_VERSION = 2


@dataclasses.dataclass(frozen=True)
class IndexConfig:
  """Every ScaNN knob; 0 means "chosen from the gallery size"."""
  mode: str = "auto"
  brute_force_below: int = 20_000
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
  import scann  # imported late: only ScaNN modes need it

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


# --- On disk: searcher + rows + manifest ---------------------------------------

class ManifestMismatch(ValueError):
  """The index was built for something other than what is asking (model, step, data)."""


def mismatches(manifest: dict, expected: dict) -> list[str]:
  """'field: index has A, query has B' for each field of `expected` that differs."""
  return [f"{key}: index has {manifest.get(key)!r}, query has {value!r}"
          for key, value in expected.items() if manifest.get(key) != value]


def check_manifest(manifest: dict, expected: dict, directory, what: str = "query model") -> None:
  """Raises `ManifestMismatch` naming every field where `expected` differs from the index's manifest."""
  wrong = mismatches(manifest, expected)
  if wrong:
    raise ManifestMismatch(f"index {directory} does not match the {what}:\n  " + "\n  ".join(wrong))


def save(index: Index, directory: epath.PathLike, manifest: dict, rows: dict[str, np.ndarray] | None = None) -> dict:
  """Writes searcher (or codes), gallery rows' metadata and manifest; replaces an older
  index whole, so a reader never sees half of one. Returns the manifest written.

  `rows` holds per-row arrays (label, source_id, coords) that answers name.
  ScaNN serialises to a local folder, so the index is assembled in a local
  temporary folder, copied next to its destination (any epath location: a
  local folder, gs://...), then renamed into place.
  """
  directory = epath.Path(directory)
  manifest = {**manifest, "format_version": FORMAT_VERSION, "mode": index.mode, "params": index.params,
              "count": index.size, "dim": index.dim,
              "metric": index.params.get("pq_metric", "dot_product") if index.mode == "adc" else "dot_product"}
  with tempfile.TemporaryDirectory() as tmp:
    tmp = epath.Path(tmp)
    if index.mode == "exact":  # ScaNN keeps its own copy; the export keeps the float rows
      np.save(tmp / "gallery.npy", index.gallery)
    if index.codes is not None:
      np.save(tmp / "codes.npy", index.codes)
      np.save(tmp / "codebooks.npy", index.codebooks)
    if index.searcher is not None:
      (tmp / "scann").mkdir()
      index.searcher.serialize(str(tmp / "scann"), relative_path=True)  # relocatable
    if rows is not None:
      np.savez(tmp / "rows.npz", **rows)
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    staging = fileio.staging_path(directory)
    if staging.exists():
      staging.rmtree()
    directory.parent.mkdir(parents=True, exist_ok=True)
    fileio.copy_tree(tmp, staging)
    if directory.exists():
      directory.rmtree()
    staging.rename(directory)
  return manifest


def read_manifest(directory: epath.PathLike) -> dict:
  directory = epath.Path(directory)
  path = directory / "manifest.json"
  if not path.exists():
    raise FileNotFoundError(f"{directory} is not an index: it has no manifest.json")
  manifest = untrusted.read_json(path, "index manifest")
  if manifest.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{path}: index format version {manifest.get('format_version')!r}, this code reads "
                     f"{FORMAT_VERSION}; rebuild it with `python -m histojax.evaluate --workdir ...`")
  wrong = [f"{k}={manifest.get(k)!r}" for k, ok in (
      ("mode", lambda v: v in ("exact", "adc", "brute_force", "ah", "tree_ah")),
      ("count", lambda v: isinstance(v, int) and v > 0), ("dim", lambda v: isinstance(v, int) and v > 0),
      ("params", lambda v: v is None or isinstance(v, dict))) if not ok(manifest.get(k))]
  if wrong:
    raise untrusted.CorruptFileError(f"{path}: damaged index manifest ({', '.join(wrong)}); rebuild the index")
  return manifest


def load(directory: epath.PathLike) -> tuple[Index, dict]:
  directory = epath.Path(directory)
  manifest = read_manifest(directory)
  mode = manifest["mode"]
  gallery = codes = codebooks = searcher = None
  if mode == "adc":
    codes, codebooks = fileio.load_npy(directory / "codes.npy"), fileio.load_npy(directory / "codebooks.npy")
  elif mode == "exact":
    gallery = fileio.load_npy(directory / "gallery.npy")
  else:
    searcher = _load_searcher(directory / "scann")
  _check_shapes(directory, manifest, gallery, codes)
  health.warn(manifest.get("spread"), f"index {directory}")  # recorded at export; none in older manifests
  return Index(mode, gallery, searcher, codes, codebooks, dict(manifest.get("params", {})),
               manifest["count"], manifest["dim"]), manifest


# What `save` writes in scann/; anything else (scann_docids.pkl, which ScaNN would unpickle) is refused.
_SCANN_SUFFIXES = (".pb", ".pbtxt", ".npy")


def _load_searcher(folder: epath.Path):
  import scann
  if not (folder / "scann_assets.pbtxt").exists():  # else ScaNN would rewrite the folder itself
    raise FileNotFoundError(f"{folder} has no scann_assets.pbtxt: not a searcher saved by histojax; rebuild the index")
  strange = sorted(p.name for p in folder.iterdir() if not p.name.endswith(_SCANN_SUFFIXES))
  if strange:
    raise untrusted.CorruptFileError(f"{folder} holds files no histojax index has ({', '.join(strange)}); "
                                     "refused without loading (a .pkl there would be unpickled by ScaNN)")
  with fileio.local_copy(folder) as local:  # ScaNN reads local folders only
    for npy in local.glob("*.npy"):  # the very bytes ScaNN will read, checked first:
      untrusted.check_npy(npy)  # sizes against the file, object arrays refused
    try:
      return scann.scann_ops_pybind.load_searcher(str(local), assets_backcompat_shim=False)
    except (RuntimeError, IndexError, ValueError, UnicodeDecodeError, OSError) as e:
      raise untrusted.CorruptFileError(f"{folder}: ScaNN cannot load this searcher (damaged?): "
                                       f"{type(e).__name__}: {e}; rebuild the index") from None


def _check_shapes(directory, manifest: dict, gallery, codes) -> None:
  n = len(gallery) if gallery is not None else len(codes) if codes is not None else None
  if n is not None and (n != manifest["count"] or (gallery is not None and gallery.shape[1:] != (manifest["dim"],))):
    raise untrusted.CorruptFileError(f"{directory}: the arrays hold {n} rows, the manifest says {manifest['count']} "
                                     f"of dim {manifest['dim']}; rebuild the index")


def load_rows(directory: epath.PathLike) -> dict[str, np.ndarray]:
  """Per-row metadata saved with the index (label, source_id, coords)."""
  path = epath.Path(directory) / "rows.npz"
  if not path.exists():
    raise FileNotFoundError(f"index {directory} has no rows.npz (labels and ids of its gallery rows)")
  return fileio.load_npz(path)


def load_if_matching(directory: epath.PathLike, expected: dict) -> tuple[Index, dict] | None:
  """The index in `directory` if its manifest agrees with `expected` on every field, else None."""
  try:
    manifest = read_manifest(directory)
  except (FileNotFoundError, ValueError):
    return None
  return load(directory) if not mismatches(manifest, expected) else None


# --- CLI: growing a saved index (histojax.growth) ------------------------------

def define_flags() -> None:
  from histojax import growth  # noqa: PLC0415
  growth.define_flags()


def main(argv) -> int:
  """`python -m histojax.index add|remove ...` (see histojax.growth)."""
  from histojax import growth  # noqa: PLC0415
  return growth.main(argv)


if __name__ == "__main__":
  from absl import app
  define_flags()
  app.run(main)
