"""Growing a saved index without rebuilding it: `python -m histojax.index add|remove`.

    python -m histojax.index add --index DIR --images FOLDER_OR_FILE [--images ...] [--label NAME]
    python -m histojax.index remove --index DIR --source ID [--source ...]

New cases are cut as the gallery was cut (the query path's `cut`: the
manifest's tiling), embedded with the index's own model, and appended: the
row order of the searcher and `rows.npz` stay one and the same. Without
`--label` each image's label is the name of the folder holding it (a
labelled tree FOLDER/<class>/<image>). An image's source id is its file
stem; one already in the index is refused (remove it first).

How each index mode grows (no full rebuild in any):
- exact: rows appended to `gallery.npy`; exact by construction.
- adc (PQ codes): new rows encoded with the model's own codebooks, as export
  encodes the gallery; the codebooks are the model's, so nothing drifts.
- brute_force: ScaNN's own incremental update (`upsert`, `delete`); exact.
- ah / tree_ah: ScaNN's `upsert` puts a new row in its nearest partition and
  encodes it with the trained AH codebooks; both were trained on the old
  rows. Measured on 30k clustered 32-d rows (README, "Service"): rows from
  the same clusters kept recall@10 at 1.0 up to +20%, rows from clusters the
  tree had not seen fell to 0.97 at +5% and 0.70 at +20%; ScaNN's
  `rebalance` (a retrain on the current rows) brought both back to 1.0.
  At 100k x 128 rows, 1,000 rows from unseen clusters (1%) already fell to
  0.905. Policy: an add probes the searcher with up to 256 of its new rows
  (`probe_recall`: a new row scoring above the k-th returned result but not
  returned is a certain miss, checkable without the old rows' floats) and
  retrains (`rebalance`) below `MIN_PROBE_RECALL` (0.98); any add or remove
  also retrains once the rows changed since the last training reach
  `REBALANCE_FRACTION` (5%) of the rows trained on (`--rebalance` forces it).

Removal follows ScaNN's delete: each removed row is filled by the current
last row, deleted from the highest position down (`delete_order`), so rows
are renumbered; the same order is applied to every mode and to `rows.npz`.

Crash safety: the new index is written whole into `.DIR.next` beside DIR
(unchanged files hard-linked, not copied), its manifest last, then swapped
in with one atomic exchange of the two folder names (Linux renameat2;
elsewhere two renames, and `fileio.recover_folder` finishes or undoes a swap cut between
them). A writer holds `.DIR.lock`, so two growths never interleave. An add
killed at any point leaves DIR as it was.

Added patches are kept in the index (`patches/<batch>.pngs`: the model-input
crops, PNG, concatenated) so the service can show them; `rows.npz` says for
every row where its picture is (`dataset_row` in the split the index was
built from, or `patch_file`/`patch_offset`/`patch_bytes`).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import sys
import time
import uuid

import numpy as np
import PIL.Image

from histojax import fileio, index, pq

REBALANCE_FRACTION = 0.05  # rows changed since training, as a fraction of the rows trained on
MIN_PROBE_RECALL = 0.98  # of the new rows' own neighbourhood (`probe_recall`)
# ScaNN's k-means is threaded, so a retrain is not reproducible, and one in a few dozen (seen
# in CI on 20.8k clustered rows: recall@10 0.96 -> 0.86) lands a partition worse than the one
# it replaced. The probe is rerun after each retrain; below the bar it retrains again.
REBALANCE_TRIES = 3
ORIGIN_FIELDS = ("dataset_row", "patch_file", "patch_offset", "patch_bytes")


# --- Rows and where their pictures are ----------------------------------------------

def with_origin(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """`rows` with the picture fields; an index never grown has row i = split row i."""
  n = len(rows["label"])
  defaults = {"dataset_row": np.arange(n, dtype=np.int64), "patch_file": np.full(n, "", dtype="<U1"),
              "patch_offset": np.zeros(n, np.int64), "patch_bytes": np.zeros(n, np.int64)}
  return {**defaults, **rows}


def concat_rows(a: dict, b: dict) -> dict:
  return {key: np.concatenate([a[key], b[key]]) for key in a}


def encode_patches(patches: np.ndarray) -> tuple[bytes, np.ndarray, np.ndarray]:
  """PNG of each uint8 patch, concatenated; (data, offsets, lengths)."""
  blobs = []
  for patch in patches:
    buf = io.BytesIO()
    PIL.Image.fromarray(patch).save(buf, format="PNG")
    blobs.append(buf.getvalue())
  lengths = np.array([len(b) for b in blobs], np.int64)
  offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if len(blobs) else lengths
  return b"".join(blobs), offsets, lengths


def added_patch_png(directory, rows: dict, row: int) -> bytes | None:
  """The PNG an added row was embedded from; None for a row of the dataset."""
  name = str(rows["patch_file"][row]) if "patch_file" in rows else ""
  if not name:
    return None
  with open(os.path.join(os.fspath(directory), name), "rb") as f:
    f.seek(int(rows["patch_offset"][row]))
    return f.read(int(rows["patch_bytes"][row]))


# --- Growing the searcher --------------------------------------------------------------

def append(idx: index.Index, embeddings: np.ndarray) -> index.Index:
  """`idx` with `embeddings` appended as rows size..size+m-1 (a ScaNN searcher in place)."""
  embeddings = np.asarray(embeddings, np.float32)
  if embeddings.ndim != 2 or embeddings.shape[1] != idx.dim:
    raise ValueError(f"new rows have shape {embeddings.shape}; the index holds {idx.dim}-d rows")
  if idx.mode == "adc":
    codes = pq.encode(embeddings, idx.codebooks, idx.params.get("pq_metric", "dot_product"))
    return dataclasses.replace(idx, codes=np.concatenate([idx.codes, codes.astype(idx.codes.dtype)]),
                               size=idx.size + len(codes))
  unit = index.l2_normalize(embeddings)
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


def delete(idx: index.Index, positions) -> tuple[index.Index, np.ndarray]:
  """(`idx` without `positions`, `delete_order`: apply it to the rows)."""
  order = delete_order(idx.size, positions)
  if len(order) == 0:
    raise ValueError("removing these sources would leave the index empty")
  if idx.mode == "adc":
    return dataclasses.replace(idx, codes=idx.codes[order], size=len(order)), order
  if idx.mode == "exact":
    return dataclasses.replace(idx, gallery=idx.gallery[order], size=len(order)), order
  idx.searcher.searcher.delete(sorted(set(int(p) for p in positions), reverse=True))
  return dataclasses.replace(idx, gallery=None, size=len(order)), order


def growth_record(manifest: dict) -> dict:
  """The manifest's `growth`: rows the searcher was trained on, rows changed since."""
  return {"trained_rows": int(manifest["count"]), "changed_since_training": 0, "generation": 0, "log": [],
          **manifest.get("growth", {})}


def probe_recall(idx: index.Index, added: np.ndarray, k: int = 10, probes: int = 256) -> float:
  """How much of the new rows' own neighbourhood the searcher finds, exactly checkable
  without the old rows' floats: with up to `probes` added rows as queries, a new row
  scoring above the k-th result returned but not returned is a certain miss.
  Returns 1 - misses / k, averaged over the probes."""
  added = index.l2_normalize(added)
  queries = added[np.linspace(0, len(added) - 1, min(probes, len(added))).astype(int)]
  found, scores = index.search(idx, queries, k)
  kth = np.where(np.isfinite(scores[:, -1]), scores[:, -1], -np.inf)
  first_new = idx.size - len(added)
  new_scores = queries @ added.T  # [probes, m]
  misses = []
  for q in range(len(queries)):
    better = np.flatnonzero(new_scores[q] > kth[q] + 1e-6) + first_new
    misses.append(len(set(better.tolist()) - set(found[q].tolist())))
  return 1.0 - float(np.mean(misses)) / k


def maybe_rebalance(idx: index.Index, growth: dict, force: bool = False, added: np.ndarray | None = None,
                    fraction: float = REBALANCE_FRACTION, min_probe_recall: float = MIN_PROBE_RECALL) -> bool:
  """Retrains a tree/AH searcher when its new rows are searched badly (`probe_recall`) or
  enough rows changed since it was trained (module doc), up to `REBALANCE_TRIES` times
  while the probe of the new rows stays below the bar. Records the probes in `growth`."""
  if idx.mode not in ("ah", "tree_ah"):
    return False
  probed = added is not None and len(added) > 0
  probe = probe_recall(idx, added) if probed else None
  growth["last_probe_recall"] = None if probe is None else round(probe, 4)
  drifted = growth["changed_since_training"] >= fraction * growth["trained_rows"]
  if not (force or drifted or (probe is not None and probe < min_probe_recall)):
    return False
  for tries in range(1, REBALANCE_TRIES + 1):
    idx.searcher.rebalance()
    after = probe_recall(idx, added) if probed else None
    if after is None or after >= min_probe_recall:
      break
  growth.update(trained_rows=idx.size, changed_since_training=0, rebalance_tries=tries,
                probe_recall_after_rebalance=None if after is None else round(after, 4))
  return True


# --- On disk: a new folder, swapped in atomically (fileio) ------------------------------

def write(directory: str, idx: index.Index, manifest: dict, rows: dict,
          new_files: dict[str, bytes] | None = None) -> dict:
  """Writes the grown index beside `directory` and swaps it in; returns the manifest written.

  Files not rewritten (codebooks, earlier added patches) are hard-linked from
  the current index; `new_files` (relative path -> bytes) are added.
  """
  nxt = fileio.sibling(directory, "next")
  if os.path.exists(nxt):
    shutil.rmtree(nxt)
  os.makedirs(os.path.join(nxt, "patches"))
  old_patches = os.path.join(directory, "patches")
  referenced = set(rows["patch_file"].tolist())  # a batch whose rows were all removed is dropped
  for name in sorted(os.listdir(old_patches)) if os.path.isdir(old_patches) else []:
    if f"patches/{name}" in referenced:
      fileio.link_or_copy(os.path.join(old_patches, name), os.path.join(nxt, "patches", name))
  for rel, data in (new_files or {}).items():
    with open(os.path.join(nxt, rel), "wb") as f:
      f.write(data)
  if idx.mode == "exact":
    np.save(os.path.join(nxt, "gallery.npy"), idx.gallery)
  elif idx.mode == "adc":
    np.save(os.path.join(nxt, "codes.npy"), idx.codes)
    fileio.link_or_copy(os.path.join(directory, "codebooks.npy"), os.path.join(nxt, "codebooks.npy"))
  else:
    os.makedirs(os.path.join(nxt, "scann"))
    idx.searcher.serialize(os.path.join(nxt, "scann"), relative_path=True)
  np.savez(os.path.join(nxt, "rows.npz"), **rows)
  manifest = {**manifest, "count": idx.size, "params": idx.params}
  with open(os.path.join(nxt, "manifest.json"), "w") as f:  # last: a folder with it is whole
    json.dump(manifest, f, indent=2, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  fileio.swap_in(directory, nxt)
  return manifest


# --- The two operations ---------------------------------------------------------------

@dataclasses.dataclass
class Cases:
  """Tiles of new source images, ready to append."""
  patches: np.ndarray  # [m, s, s, 3] uint8, as the model saw them
  embeddings: np.ndarray  # [m, d]
  label: np.ndarray  # [m] int64
  source_id: np.ndarray  # [m] str
  coords: np.ndarray  # [m, 2] int32


def _open_for_growth(directory: str):
  if not fileio.is_local(directory):
    raise ValueError(f"{directory}: index add/remove grows a local index folder (the swap needs a "
                     "filesystem rename); copy it here, grow it, copy it back")
  fileio.recover_folder(directory)
  idx, manifest = index.load(directory)
  rows = with_origin(index.load_rows(directory))
  return idx, manifest, rows


def _log(growth: dict, entry: dict) -> None:
  growth["generation"] += 1
  growth["log"] = (growth["log"] + [{**entry, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}])[-100:]


def add(directory: str, cases: Cases, rebalance: bool = False) -> dict:
  """Appends `cases` to the index in `directory`; returns a summary."""
  directory = os.fspath(directory)
  with fileio.folder_lock(directory):
    idx, manifest, rows = _open_for_growth(directory)
    clash = sorted(set(cases.source_id.tolist()) & set(rows["source_id"].tolist()))
    if clash:
      raise ValueError(f"source id(s) {clash[:5]} already in the index {directory}; remove them first "
                       "(`python -m histojax.index remove --source ID`) or rename the files")
    start = time.perf_counter()
    before = idx.size
    idx = append(idx, cases.embeddings)
    data, offsets, lengths = encode_patches(cases.patches)
    batch = f"patches/{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}.pngs"
    m = len(cases.label)
    rows = concat_rows(rows, {"label": cases.label.astype(rows["label"].dtype), "source_id": cases.source_id,
                              "coords": cases.coords.astype(rows["coords"].dtype),
                              "dataset_row": np.full(m, -1, np.int64), "patch_file": np.full(m, batch),
                              "patch_offset": offsets, "patch_bytes": lengths})
    growth = growth_record(manifest)
    growth["changed_since_training"] += m
    rebalanced = maybe_rebalance(idx, growth, rebalance, cases.embeddings)
    _log(growth, {"op": "add", "rows": m, "sources": sorted(set(cases.source_id.tolist())), "rebalanced": rebalanced})
    write(directory, idx, {**manifest, "growth": growth}, rows, {batch: data})
    return {"index": directory, "rows_before": before, "rows_added": m, "rows_after": idx.size,
            "sources_added": len(set(cases.source_id.tolist())), "rebalanced": rebalanced,
            "probe_recall": growth.get("last_probe_recall"),
            "probe_recall_after_rebalance": growth.get("probe_recall_after_rebalance") if rebalanced else None,
            "seconds_write": round(time.perf_counter() - start, 3)}


def remove(directory: str, source_ids: list[str], rebalance: bool = False) -> dict:
  """Takes every row of `source_ids` out of the index in `directory`; returns a summary."""
  directory = os.fspath(directory)
  with fileio.folder_lock(directory):
    idx, manifest, rows = _open_for_growth(directory)
    known = set(rows["source_id"].tolist())
    missing = [s for s in source_ids if s not in known]
    if missing:
      some = ", ".join(sorted(known)[:5])
      raise KeyError(f"no row of the index {directory} has source id(s) {missing}; its sources look like: {some}")
    start = time.perf_counter()
    positions = np.flatnonzero(np.isin(rows["source_id"], list(source_ids)))
    before = idx.size
    idx, order = delete(idx, positions)
    rows = {key: value[order] for key, value in rows.items()}
    growth = growth_record(manifest)
    growth["changed_since_training"] += len(positions)
    rebalanced = maybe_rebalance(idx, growth, rebalance)
    _log(growth, {"op": "remove", "rows": int(len(positions)), "sources": sorted(source_ids), "rebalanced": rebalanced})
    write(directory, idx, {**manifest, "growth": growth}, rows)
    return {"index": directory, "rows_before": before, "rows_removed": int(len(positions)), "rows_after": idx.size,
            "rebalanced": rebalanced, "seconds_write": round(time.perf_counter() - start, 3)}


# --- New cases from image files ---------------------------------------------------------

def labelled_images(items: list[str], label: str | None, class_names: list[str]) -> list[tuple[str, int]]:
  """(path, label id) of every image: `label` for all, else each image's folder name."""
  from histojax import search  # noqa: PLC0415  (its file walk; search imports nothing heavy)

  out = []
  for path in search.query_paths(items):
    name = label if label is not None else os.path.basename(os.path.dirname(os.path.abspath(path)))
    if name not in class_names:
      where = "--label" if label is not None else f"the folder of {path}"
      raise ValueError(f"{where} names class {name!r}; the index's classes are {class_names}")
    out.append((path, class_names.index(name)))
  return out


def cut_cases(images: list[tuple[str, int]], cut, embed, read) -> tuple[Cases, list[str]]:
  """Cases of every image (cut as the gallery was, embedded by the index's model), and the
  images that gave no tile (all background) as messages."""
  parts, empty, seen = [], [], {}
  for path, label in images:
    source = os.path.splitext(os.path.basename(path))[0]
    if source in seen:
      raise ValueError(f"{path} and {seen[source]} would share the source id {source!r}; rename one")
    seen[source] = path
    patches = cut(read(path))
    if not len(patches.images):
      empty.append(f"{path}: no tile passed the tissue filter ({patches.dropped} dropped); not added")
      continue
    n = len(patches.images)
    parts.append((patches.images, np.full(n, label, np.int64), np.full(n, source),
                  np.asarray(patches.coords, np.int32).reshape(n, 2)))
  if not parts:
    raise ValueError("no tile to add: " + "; ".join(empty) if empty else "no image given")
  patches = np.concatenate([p[0] for p in parts])
  cases = Cases(patches, np.asarray(embed(patches), np.float32), np.concatenate([p[1] for p in parts]),
                np.concatenate([p[2] for p in parts]), np.concatenate([p[3] for p in parts]))
  return cases, empty


def define_flags() -> None:
  from absl import flags  # noqa: PLC0415
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
  """`index add`: reads, cuts and embeds with the index's query engine, then appends."""
  from histojax import query  # noqa: PLC0415  (JAX and the model load here)
  from histojax.data import images as images_lib  # noqa: PLC0415

  manifest = index.read_manifest(index_dir)
  labelled = labelled_images(images, label, list(manifest.get("class_names") or []))
  engine = query.QueryEngine.open(index_dir, workdir, step)
  read = lambda path: images_lib.read_image(path, max_pixels=images_lib.DEFAULT_MAX_PIXELS["search"])
  start = time.perf_counter()
  cases, empty = cut_cases(labelled, engine.cut, engine.model.embed, read)
  embedded = time.perf_counter() - start
  summary = add(index_dir, cases, rebalance)
  return {**summary, "images": len(labelled), "skipped": empty, "seconds_cut_embed": round(embedded, 3)}


def main(argv) -> int:
  from absl import flags, logging  # noqa: PLC0415
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
      summary = remove(f.index, f.source, f.rebalance)
  except (FileNotFoundError, KeyError, ValueError) as e:
    print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr, flush=True)
    return 2
  print(json.dumps(summary, indent=2))
  return 0
