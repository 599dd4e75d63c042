"""Product quantisation codes and asymmetric-distance (ADC) search, pure numpy.

A PQ model (SPQ) splits a d-dim embedding into M sub-vectors of d/M dims and
stores, per sub-vector, the index of one of K codewords: a gallery row costs
M * log2(K) bits instead of 32 * d. Codebooks are float [M, K, d/M].

Search is asymmetric: the query stays a float vector and is compared with
each gallery row's *reconstruction* (its M codewords concatenated), without
building it. Per query, a lookup table T[m, c] = sim(q_m, codebook[m, c])
is computed once (M * K sub-vector products), and a gallery row's score is
sum_m T[m, code[m]]: M table reads instead of d multiply-adds. Scores equal
exact scores against the reconstructions, for both metrics (the top-k search
over these scores is `histojax.indexing.adc_search`):
- "dot_product": sim = <q_m, c>; higher is better (SPQ's cosine geometry).
- "squared_l2": sim = -||q_m - c||^2 (negated so that higher is better too).
"""

from __future__ import annotations

import numpy as np

METRICS = ("dot_product", "squared_l2")


def check_codebooks(codebooks: np.ndarray, dim: int | None = None) -> np.ndarray:
  codebooks = np.asarray(codebooks, np.float32)
  if codebooks.ndim != 3:
    raise ValueError(f"codebooks must be [M, K, d/M], got shape {codebooks.shape}")
  if dim is not None and codebooks.shape[0] * codebooks.shape[2] != dim:
    raise ValueError(f"codebooks {codebooks.shape} cover {codebooks.shape[0] * codebooks.shape[2]} dims, "
                     f"embeddings have {dim}")
  return codebooks


def _check_metric(metric: str) -> None:
  if metric not in METRICS:
    raise ValueError(f"PQ metric must be one of {METRICS}, got {metric!r}")


def code_dtype(num_codewords: int):
  """Smallest unsigned integer type holding a codeword index."""
  return np.uint8 if num_codewords <= 256 else np.uint16 if num_codewords <= 65536 else np.uint32


def bits_per_row(codebooks: np.ndarray) -> float:
  """M * log2(K): what a gallery row costs as a code."""
  m, k, _ = np.shape(codebooks)
  return float(m * np.log2(k))


def split(x: np.ndarray, num_books: int) -> np.ndarray:
  """[n, d] -> [n, M, d/M] sub-vectors (contiguous slices, as SPQ splits)."""
  n, d = x.shape
  return np.asarray(x, np.float32).reshape(n, num_books, d // num_books)


def tables(queries: np.ndarray, codebooks: np.ndarray, metric: str = "dot_product") -> np.ndarray:
  """ADC lookup tables [q, M, K]: similarity of each query sub-vector to each codeword."""
  _check_metric(metric)
  codebooks = check_codebooks(codebooks, queries.shape[1])
  sub = split(queries, codebooks.shape[0])
  dots = np.einsum("qmd,mkd->qmk", sub, codebooks)
  if metric == "dot_product":
    return dots
  return 2 * dots - np.sum(sub * sub, -1)[:, :, None] - np.sum(codebooks * codebooks, -1)[None]


def encode(x: np.ndarray, codebooks: np.ndarray, metric: str = "dot_product", chunk: int = 8192) -> np.ndarray:
  """Hard codes [n, M]: per sub-vector the codeword with the highest similarity."""
  codebooks = check_codebooks(codebooks, x.shape[1])
  codes = np.empty((len(x), codebooks.shape[0]), code_dtype(codebooks.shape[1]))
  for start in range(0, len(x), chunk):
    codes[start:start + chunk] = np.argmax(tables(x[start:start + chunk], codebooks, metric), -1)
  return codes


def reconstruct(codes: np.ndarray, codebooks: np.ndarray) -> np.ndarray:
  """[n, M] codes -> [n, d] vectors: the chosen codewords, concatenated."""
  codebooks = check_codebooks(codebooks)
  books = np.arange(codebooks.shape[0])[None, :]
  return codebooks[books, codes.astype(np.int64)].reshape(len(codes), -1)


def adc_scores(query_tables: np.ndarray, codes: np.ndarray) -> np.ndarray:
  """[q, n] scores: sum over books of the table entry each gallery code selects."""
  scores = np.zeros((query_tables.shape[0], codes.shape[0]), np.float32)
  for m in range(codes.shape[1]):
    scores += query_tables[:, m, codes[:, m].astype(np.int64)]
  return scores


def check_codes(codes: np.ndarray, codebooks: np.ndarray) -> None:
  m, k, _ = np.shape(codebooks)
  if codes.ndim != 2 or codes.shape[1] != m:
    raise ValueError(f"codes must be [n, {m}] for {m} codebooks, got shape {codes.shape}")
  if codes.size and int(codes.max()) >= k:
    raise ValueError(f"a code refers to codeword {int(codes.max())} but codebooks hold {k}")
