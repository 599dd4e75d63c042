"""Changing a saved index's gallery: the one way in for every writer after `evaluate` built it.

The command line (`python -m histojax.index add|remove`) calls it today; the service's
curator routes call it with the model they already hold. New cases are cut as the
gallery was cut (the query engine's `cut`: the manifest's tiling), embedded with the
index's own model, and appended: the row order of the searcher and `rows.npz` stay one
and the same. An image's source id is its file stem; one already in the index is
refused (remove it first). Removal follows ScaNN's delete (`searcher.delete_order`):
rows are renumbered, the same order applied to every mode and to `rows.npz`.

Added patches are kept in the index (`patches/<batch>.pngs`: the model-input crops, PNG,
concatenated) so the service can show them; `rows.npz` says for every row where its
picture is (`store.ORIGIN_FIELDS`).

The service adds one decoded upload at a time (`add_upload`): its label may be a class the
index does not have yet (appended to the manifest's `class_names` in the same generation), and
it takes the lock without waiting (`fileio.FolderBusy`), checks, cuts, embeds and writes under
it, so a second writer learns at once that it must wait rather than after embedding. The
refusals are exceptions of their own (subclasses of what the CLI already catches).

Whole slides come in the same way (`labelled_slides`, `slide_cases`): a slide is a source
(its id the file stem), its patches cut by the caller as the query path cuts slides
(the index's gallery_mpp, tissue, mosaic), each row with its case id and level-0
region; the manifest's `slides` record keeps where each slide's file is, for the
service's viewer. A slide that cannot be read stops the add before anything is written;
one with no tissue is left out and said.
"""

from __future__ import annotations

import dataclasses
import os
import time
import uuid
from typing import Callable

import numpy as np

from histojax import fileio, slides
from histojax.data import images as images_lib
from histojax.indexing import growth, searcher, store, writer


@dataclasses.dataclass
class Cases:
  """Tiles of new source images, ready to append."""
  patches: np.ndarray  # [m, s, s, 3] uint8, as the model saw them
  embeddings: np.ndarray  # [m, d]
  label: np.ndarray  # [m] int64
  source_id: np.ndarray  # [m] str
  coords: np.ndarray  # [m, 2] int32
  case_id: np.ndarray | None = None  # [m] str: slides' cases (patients); None: ""
  region: np.ndarray | None = None  # [m, 4]: slides' patches in level-0 (x, y, width, height); None: not slides
  slide_files: dict[str, str] | None = None  # slide id -> its file, for the service's viewer
  slide_cut: dict | None = None  # how the slides were cut (patch px, mpp, mosaic), for the manifest and log


class SourceExists(ValueError):
  """A source id the index already holds (remove it first)."""


class UnknownSource(KeyError):
  """A source id no row of the index has."""


class UnknownClass(ValueError):
  """A label that is not one of the index's classes (and no new class was asked for)."""


class UnusableImage(ValueError):
  """An image that gives nothing to add: smaller than the model input, or no tile with tissue."""


def _concat_rows(a: dict, b: dict) -> dict:
  return {key: np.concatenate([a[key], b[key]]) for key in a}


def add(directory: str, cases: Cases, rebalance: bool = False, wait: bool = True) -> dict:
  """Appends `cases` to the index in `directory`; returns a summary. `wait=False`: raise
  `fileio.FolderBusy` at once when another writer holds the lock."""
  directory = os.fspath(directory)
  with fileio.folder_lock(directory, wait):
    return _append(directory, *growth.open_current(directory), cases, rebalance)


def _check_new_sources(directory: str, rows: dict, source_ids) -> None:
  clash = sorted(set(source_ids) & set(rows["source_id"].tolist()))
  if clash:
    raise SourceExists(f"source id(s) {clash[:5]} already in the index {directory}; remove them first "
                       "(`python -m histojax.index remove --source ID`) or rename the files")


def _append(directory: str, idx, manifest: dict, rows: dict, cases: Cases, rebalance: bool,
            new_class: str | None = None) -> dict:
  """The next generation with `cases` appended (the caller holds the lock); `new_class` is
  appended to the manifest's class names in the same generation."""
  _check_new_sources(directory, rows, cases.source_id.tolist())
  start = time.perf_counter()
  before = idx.size
  idx = searcher.append(idx, cases.embeddings)
  data, offsets, lengths = writer.encode_patches(cases.patches)
  batch = f"patches/{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}.pngs"
  m = len(cases.label)
  rows = _concat_rows(rows, {"label": cases.label.astype(rows["label"].dtype), "source_id": cases.source_id,
                             "coords": cases.coords.astype(rows["coords"].dtype),
                             "dataset_row": np.full(m, -1, np.int64), "patch_file": np.full(m, batch),
                             "patch_offset": offsets, "patch_bytes": lengths,
                             "case_id": np.full(m, "") if cases.case_id is None else cases.case_id,
                             "region": np.zeros((m, 4), np.int32) if cases.region is None else cases.region})
  if cases.slide_files:
    manifest = {**manifest, "slides": with_slide_files(manifest.get("slides"), cases.slide_files, cases.slide_cut)}
  record = growth.growth_record(manifest)
  record["changed_since_training"] += m
  rebalanced = growth.maybe_rebalance(idx, record, rebalance, cases.embeddings)
  sources = sorted(set(cases.source_id.tolist()))
  entry = {"op": "add", "rows": m, "sources": sources, "rebalanced": rebalanced}
  if cases.slide_cut:
    entry["slide_cut"] = cases.slide_cut
  if new_class is not None:
    manifest = {**manifest, "class_names": list(manifest.get("class_names") or []) + [new_class]}
    entry["new_class"] = new_class
  growth.log_change(record, entry)
  growth.write_generation(directory, idx, {**manifest, "growth": record}, rows, {batch: data})
  return {"index": directory, "rows_before": before, "rows_added": m, "rows_after": idx.size,
          "sources_added": len(sources), "rebalanced": rebalanced, "generation": record["generation"],
          "probe_recall": record.get("last_probe_recall"),
          "probe_recall_after_rebalance": record.get("probe_recall_after_rebalance") if rebalanced else None,
          "seconds_write": round(time.perf_counter() - start, 3)}


def remove(directory: str, source_ids: list[str], rebalance: bool = False, wait: bool = True) -> dict:
  """Takes every row of `source_ids` out of the index in `directory`; returns a summary.
  `wait=False`: raise `fileio.FolderBusy` at once when another writer holds the lock."""
  directory = os.fspath(directory)
  with fileio.folder_lock(directory, wait):
    idx, manifest, rows = growth.open_current(directory)
    known = set(rows["source_id"].tolist())
    missing = [s for s in source_ids if s not in known]
    if missing:
      some = ", ".join(sorted(known)[:5])
      raise UnknownSource(f"no row of the index {directory} has source id(s) {missing}; its sources look like: "
                          f"{some}")
    start = time.perf_counter()
    positions = np.flatnonzero(np.isin(rows["source_id"], list(source_ids)))
    before = idx.size
    idx, order = searcher.delete(idx, positions)
    rows = {key: value[order] for key, value in rows.items()}
    if (manifest.get("slides") or {}).get("files"):  # a removed slide's file is no longer the gallery's
      gone = set(source_ids)
      files = {sid: f for sid, f in manifest["slides"]["files"].items() if sid not in gone}
      manifest = {**manifest, "slides": {**manifest["slides"], "files": files}}
    record = growth.growth_record(manifest)
    record["changed_since_training"] += len(positions)
    rebalanced = growth.maybe_rebalance(idx, record, rebalance)
    growth.log_change(record, {"op": "remove", "rows": int(len(positions)), "sources": sorted(source_ids),
                               "rebalanced": rebalanced})
    growth.write_generation(directory, idx, {**manifest, "growth": record}, rows)
    return {"index": directory, "rows_before": before, "rows_removed": int(len(positions)), "rows_after": idx.size,
            "rebalanced": rebalanced, "generation": record["generation"],
            "seconds_write": round(time.perf_counter() - start, 3)}


def with_slide_files(record: dict | None, files: dict[str, str], cut: dict | None = None) -> dict:
  """The manifest's `slides` record with `files` (slide id -> path) added, and the cut (patch px,
  mpp, mosaic) where the gallery recorded none. Paths are kept relative to the record's `root`
  (the first folder slides came from) where they lie under it, so a gallery's slides can move as
  a whole (`serve --slides_root`); others absolutely."""
  record = {**(cut or {}), **(record or {})}
  paths = {sid: os.path.abspath(path) for sid, path in files.items()}
  root = record.get("root") or os.path.commonpath([os.path.dirname(p) for p in paths.values()])
  known = dict(record.get("files") or {})
  for sid, path in sorted(paths.items()):
    inside = os.path.commonpath([root, path]) == root
    known[sid] = os.path.relpath(path, root) if inside else path
  return {**record, "root": root, "files": known}


# --- New cases from image files ---------------------------------------------------------

def labelled_images(items: list[str], label: str | None, class_names: list[str]) -> list[tuple[str, int]]:
  """(path, label id) of every image: `label` for all, else each image's folder name."""
  out = []
  for path in images_lib.image_paths(items, "--images"):
    name = label if label is not None else os.path.basename(os.path.dirname(os.path.abspath(path)))
    if name not in class_names:
      where = "--label" if label is not None else f"the folder of {path}"
      raise ValueError(f"{where} names class {name!r}; the index's classes are {class_names}")
    out.append((path, class_names.index(name)))
  return out


def cut_cases(images: list[tuple[str, int]], cut: Callable, embed: Callable, read: Callable) -> tuple[Cases, list[str]]:
  """Cases of every image file (its source id: the file stem), and the images that gave no
  tile (all background) as messages."""
  named, seen = [], {}
  for path, label in images:
    source = os.path.splitext(os.path.basename(path))[0]
    if source in seen:
      raise ValueError(f"{path} and {seen[source]} would share the source id {source!r}; rename one")
    seen[source] = path
    named.append((source, label, path, path))
  return cases_of(named, cut, embed, read)


def cases_of(sources: list[tuple[str, int, object, str]], cut: Callable, embed: Callable,
             read: Callable) -> tuple[Cases, list[str]]:
  """Cases of (source id, label id, image or path, name for messages) items: each `read`,
  cut as the gallery was and embedded by the index's model. Returns them and the sources
  that gave no tile (all background) as messages; none at all raises `UnusableImage`."""
  parts, empty = [], []
  for source, label, item, name in sources:
    patches = cut(read(item))
    if not len(patches.images):
      empty.append(f"{name}: no tile passed the tissue filter ({patches.dropped} dropped); not added")
      continue
    n = len(patches.images)
    parts.append((patches.images, np.full(n, label, np.int64), np.full(n, source),
                  np.asarray(patches.coords, np.int32).reshape(n, 2)))
  if not parts:
    raise UnusableImage("no tile to add: " + "; ".join(empty) if empty else "no image given")
  patches = np.concatenate([p[0] for p in parts])
  cases = Cases(patches, np.asarray(embed(patches), np.float32), np.concatenate([p[1] for p in parts]),
                np.concatenate([p[2] for p in parts]), np.concatenate([p[3] for p in parts]))
  return cases, empty


def add_images(engine, directory: str, items: list[str], label: str | None = None,
               rebalance: bool = False) -> dict:
  """Reads, cuts and embeds image files with `engine` (an open `query.QueryEngine` on this
  index: its model and tiling), then appends them."""
  labelled = labelled_images(items, label, list(engine.class_names))
  read = lambda path: images_lib.read_image(path, max_pixels=images_lib.DEFAULT_MAX_PIXELS["search"])
  start = time.perf_counter()
  cases, empty = cut_cases(labelled, engine.cut, engine.model.embed, read)
  embedded = time.perf_counter() - start
  summary = add(directory, cases, rebalance)
  return {**summary, "images": len(labelled), "skipped": empty, "seconds_cut_embed": round(embedded, 3)}


def add_upload(engine, directory: str, source_id: str, image: np.ndarray, label: str, new_class: bool = False,
               rebalance: bool = False, wait: bool = False) -> dict:
  """One decoded image (the service's POST /api/gallery) added as `source_id` with class
  `label`, cut and embedded by `engine` (an open `query.QueryEngine` on this index).

  Everything happens under the lock, taken without waiting by default (`fileio.FolderBusy`):
  the label and id are checked against the generation on disk, the model against the
  index's manifest, then the image is cut, embedded and appended. `new_class=True` lets a
  label the index does not have become its next class (`UnknownClass` otherwise)."""
  directory = os.fspath(directory)
  with fileio.folder_lock(directory, wait):
    idx, manifest, rows = growth.open_current(directory)
    store.check_manifest(manifest, engine.model.expected_by(manifest), directory, "server's model")
    classes = list(manifest.get("class_names") or [])
    created = label not in classes
    if created and not new_class:
      raise UnknownClass(f"label {label!r} is not one of the index's classes {classes}; pass new_label=true to "
                         "add it as a new class")
    _check_new_sources(directory, rows, [source_id])
    start = time.perf_counter()
    label_id = len(classes) if created else classes.index(label)
    try:
      cases, _ = cases_of([(source_id, label_id, image, f"image for {source_id!r}")], engine.cut,
                          engine.model.embed, read=lambda x: x)
    except ValueError as e:  # smaller than the model input (the cut), or no tissue tile
      raise UnusableImage(str(e)) from None
    embedded = time.perf_counter() - start
    summary = _append(directory, idx, manifest, rows, cases, rebalance, label if created else None)
  return {**summary, "source_id": source_id, "label": label, "label_id": label_id, "new_class": created,
          "seconds_cut_embed": round(embedded, 3)}


# --- New cases from whole slides --------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SlideCase:
  path: str
  slide_id: str  # the file stem
  label: int
  case_id: str  # the slide table's; the slide id when none is given (each slide its own case)


def labelled_slides(items: list[str], class_names: list[str], slides_csv: str | None = None,
                    label: str | None = None) -> list[SlideCase]:
  """Every slide under `items` (`slides.find_slides`), labelled by `label`, else by the slide
  table's row (`slides_csv`, which then must list every slide), else by its folder's name."""
  paths = [p for item in items for p in slides.find_slides(item).slides]
  table = {row.slide_id: row for row in slides.read_slide_table(slides_csv)} if slides_csv else {}
  out, seen = [], {}
  for path in paths:
    sid = slides.slide_id(path)
    if sid in seen:
      raise ValueError(f"{path} and {seen[sid]} would share the slide id {sid!r}; rename one")
    seen[sid] = path
    row = table.get(sid)
    if slides_csv and row is None:
      raise ValueError(f"{path}: slide {sid!r} is not listed in {slides_csv}")
    name = label if label is not None else row.label if row else os.path.basename(os.path.dirname(os.path.abspath(path)))
    if name not in class_names:
      where = "--label" if label is not None else slides_csv if row else f"the folder of {path}"
      raise ValueError(f"{where} names class {name!r}; the index's classes are {class_names}")
    out.append(SlideCase(os.fspath(path), sid, class_names.index(name), row.case_id if row else sid))
  if not out:
    raise ValueError(f"no slide found under {items} (slide files: {sorted(slides.SLIDE_SUFFIXES)}, or DICOM folders)")
  return out


def slide_cases(cases: list[SlideCase], read: Callable, embed: Callable) -> tuple[Cases, list[str]]:
  """Cases of every slide: `read(path)` gives its (level-0 regions [m, 4], model-input patches),
  `embed` the index model's embeddings. A slide without tissue is left out (a message); any
  other `SlideError` stops here, before anything is written."""
  parts, empty = [], []
  for case in cases:
    try:
      regions, patches = read(case.path)
    except slides.NoTissueError as e:
      empty.append(f"{e}; not added")
      continue
    n = len(patches)
    parts.append((patches, np.full(n, case.label, np.int64), np.full(n, case.slide_id), regions[:, [1, 0]],
                  np.full(n, case.case_id), regions, case))
  if not parts:
    raise ValueError("no slide to add: " + "; ".join(empty))
  patches = np.concatenate([p[0] for p in parts])
  column = lambda i: np.concatenate([p[i] for p in parts])
  return Cases(patches, np.asarray(embed(patches), np.float32), column(1), column(2), column(3).astype(np.int32),
               column(4), column(5).astype(np.int32), {p[6].slide_id: p[6].path for p in parts}), empty


def cut_record(cut: dict) -> dict:
  """What the manifest's `slides` record keeps of a slide cut."""
  return {key: cut[key] for key in ("patch_px", "mpp", "min_tissue", "mosaic") if key in cut}
