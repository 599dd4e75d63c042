"""Growing a saved index without rebuilding it: when to retrain, and the crash-safe swap.

How each index mode takes new rows is the searcher's (`searcher.append` / `delete`):
- exact: rows appended to `gallery.npy`; exact by construction.
- adc (PQ codes): new rows encoded with the model's own codebooks, as export
  encodes the gallery; the codebooks are the model's, so nothing drifts.
- brute_force: ScaNN's own incremental update (`upsert`, `delete`); exact.
- ah / tree_ah: ScaNN's `upsert` puts a new row in its nearest partition and
  encodes it with the trained AH codebooks; both were trained on the old
  rows. Measured on 30k clustered 32-d rows (docs, "Growing the gallery"):
  rows from the same clusters kept recall@10 at 1.0 up to +20%, rows from
  clusters the tree had not seen fell to 0.97 at +5% and 0.70 at +20%;
  ScaNN's `rebalance` (a retrain on the current rows) brought both back to
  1.0. At 100k x 128 rows, 1,000 rows from unseen clusters (1%) already fell
  to 0.905.

This module decides when to retrain: an add probes the searcher with up to 256 of its
new rows (`probe_recall`: a new row scoring above the k-th returned result but not
returned is a certain miss, checkable without the old rows' floats) and retrains
below `MIN_PROBE_RECALL` (0.98); any add or remove also retrains once the rows changed
since the last training reach `REBALANCE_FRACTION` (5%) of the rows trained on.

Crash safety: the new index is written whole into `.DIR.next` beside DIR (unchanged
files hard-linked, not copied; the contents by `writer.write_contents`, manifest last),
then swapped in with one atomic exchange of the two folder names (Linux renameat2;
elsewhere two renames, and `fileio.recover_folder` finishes or undoes a swap cut
between them). A writer holds `.DIR.lock` (`curator`), so two growths never
interleave. A change killed at any point leaves DIR as it was.
"""

from __future__ import annotations

import os
import shutil
import time

import numpy as np

from histojax import fileio
from histojax.indexing import searcher, store, writer
from histojax.indexing.searcher import Index

REBALANCE_FRACTION = 0.05  # rows changed since training, as a fraction of the rows trained on
MIN_PROBE_RECALL = 0.98  # of the new rows' own neighbourhood (`probe_recall`)
# ScaNN's k-means is threaded, so a retrain is not reproducible, and one in a few dozen (seen
# in CI on 20.8k clustered rows: recall@10 0.96 -> 0.86) lands a partition worse than the one
# it replaced. The probe is rerun after each retrain; below the bar it retrains again.
REBALANCE_TRIES = 3
LOG_ENTRIES = 100  # most recent changes kept in the manifest's growth log


def growth_record(manifest: dict) -> dict:
  """The manifest's `growth`: rows the searcher was trained on, rows changed since."""
  return {"trained_rows": int(manifest["count"]), "changed_since_training": 0, "generation": 0, "log": [],
          **manifest.get("growth", {})}


def log_change(growth: dict, entry: dict) -> None:
  """Counts a new generation and records `entry` (with the time) in the growth log."""
  growth["generation"] += 1
  stamped = {**entry, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
  growth["log"] = (growth["log"] + [stamped])[-LOG_ENTRIES:]


# --- When to retrain ----------------------------------------------------------------------

def probe_recall(idx: Index, added: np.ndarray, k: int = 10, probes: int = 256) -> float:
  """How much of the new rows' own neighbourhood the searcher finds, exactly checkable
  without the old rows' floats: with up to `probes` added rows as queries, a new row
  scoring above the k-th result returned but not returned is a certain miss.
  Returns 1 - misses / k, averaged over the probes."""
  added = searcher.l2_normalize(added)
  queries = added[np.linspace(0, len(added) - 1, min(probes, len(added))).astype(int)]
  found, scores = searcher.search(idx, queries, k)
  kth = np.where(np.isfinite(scores[:, -1]), scores[:, -1], -np.inf)
  first_new = idx.size - len(added)
  new_scores = queries @ added.T  # [probes, m]
  misses = []
  for q in range(len(queries)):
    better = np.flatnonzero(new_scores[q] > kth[q] + 1e-6) + first_new
    misses.append(len(set(better.tolist()) - set(found[q].tolist())))
  return 1.0 - float(np.mean(misses)) / k


def maybe_rebalance(idx: Index, growth: dict, force: bool = False, added: np.ndarray | None = None,
                    fraction: float = REBALANCE_FRACTION, min_probe_recall: float = MIN_PROBE_RECALL) -> bool:
  """Retrains a tree/AH searcher when its new rows are searched badly (`probe_recall`) or
  enough rows changed since it was trained (module doc), up to `REBALANCE_TRIES` times
  while the probe of the new rows stays below the bar. Records the probes in `growth`."""
  if not searcher.trained(idx):
    return False
  probed = added is not None and len(added) > 0
  probe = probe_recall(idx, added) if probed else None
  growth["last_probe_recall"] = None if probe is None else round(probe, 4)
  drifted = growth["changed_since_training"] >= fraction * growth["trained_rows"]
  if not (force or drifted or (probe is not None and probe < min_probe_recall)):
    return False
  for tries in range(1, REBALANCE_TRIES + 1):
    searcher.retrain(idx)
    after = probe_recall(idx, added) if probed else None
    if after is None or after >= min_probe_recall:
      break
  growth.update(trained_rows=idx.size, changed_since_training=0, rebalance_tries=tries,
                probe_recall_after_rebalance=None if after is None else round(after, 4))
  return True


# --- The next generation, swapped in ------------------------------------------------------

def open_current(directory: str) -> tuple[Index, dict, dict]:
  """(searcher, manifest, rows) of the local index in `directory`, after finishing or
  undoing a swap an earlier writer was killed in."""
  if not fileio.is_local(directory):
    raise ValueError(f"{directory}: index add/remove grows a local index folder (the swap needs a "
                     "filesystem rename); copy it here, grow it, copy it back")
  fileio.recover_folder(directory)
  idx, manifest = store.load(directory)
  return idx, manifest, store.load_rows(directory)


def write_generation(directory: str, idx: Index, manifest: dict, rows: dict,
                     new_files: dict[str, bytes] | None = None) -> dict:
  """Writes the changed index beside `directory` and swaps it in; returns the manifest written.

  Added-patch files still referenced by a row are hard-linked from the current index (a
  batch whose rows were all removed is dropped); `new_files` (relative path -> bytes) are
  added.
  """
  nxt = fileio.sibling(directory, "next")
  if os.path.exists(nxt):
    shutil.rmtree(nxt)
  os.makedirs(os.path.join(nxt, "patches"))
  old_patches = os.path.join(directory, "patches")
  referenced = set(rows["patch_file"].tolist())
  for name in sorted(os.listdir(old_patches)) if os.path.isdir(old_patches) else []:
    if f"patches/{name}" in referenced:
      fileio.link_or_copy(os.path.join(old_patches, name), os.path.join(nxt, "patches", name))
  for rel, data in (new_files or {}).items():
    with open(os.path.join(nxt, rel), "wb") as f:
      f.write(data)
  manifest = writer.write_contents(nxt, idx, manifest, rows)
  fileio.swap_in(directory, nxt)
  return manifest
