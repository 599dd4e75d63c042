"""TFDS datasets: preparing them and opening their splits for random access.

Images are read as encoded bytes (`SkipDecoding`) and decoded with PIL in the
Grain pipeline, so no TensorFlow is needed anywhere.

Datasets are found by name through TFDS's registry. This module does not
import the project's builders (`tfds_builders`, which import the data layer
themselves): the entry points register them by importing `histojax.datasets`.
"""

from __future__ import annotations

import collections
import inspect
import os
import time
from typing import Any, Sequence

import jax
import numpy as np
import tensorflow_datasets as tfds
from jax.experimental import multihost_utils

from histojax.monitor import info


def builder(name: str, data_dir: str = "", **builder_kwargs) -> tfds.core.DatasetBuilder:
  return tfds.builder(name, data_dir=data_dir or None, file_format="array_record", **builder_kwargs)


BEAM_RUNNERS = ("DirectRunner", "DataflowRunner", "FlinkRunner", "SparkRunner")


def prepare(name: str, data_dir: str = "", manual_dir: str = "", skip_corrupt: bool = False,
            workers: int | None = None, max_pixels: int | None = None, beam_runner: str | None = None,
            beam_options: Sequence[str] = (), mpp: float | None = None) -> dict[str, Any]:
  """Builds the dataset if needed and returns a summary of what is on disk.

  TFDS writes into an `incomplete.*` folder and renames it only once every
  split is written, so an interrupted build never reads as prepared.
  `skip_corrupt`, `workers` (processes) and `max_pixels` (per image; default
  `tfds_builders.source_images.MAX_PIXELS`) apply to the archive-reading builders
  (`tfds_builders.common.TiledBuilder`, whose constructor takes them), and so does `beam_runner`: it
  prepares the images as an Apache Beam pipeline on that runner, with
  `beam_options` its pipeline flags (e.g. `--project=...`, `--region=...`); `mpp` gives
  the microns per pixel of the archive's images where the builder does not know them (a
  user's own folder) or where a scan differs from the published resolution.
  """
  kwargs = {}
  if (skip_corrupt or workers is not None or max_pixels is not None or beam_runner or beam_options
      or mpp is not None):
    cls = tfds.builder_cls(name.split("/")[0])
    if "skip_corrupt" not in inspect.signature(cls.__init__).parameters:
      raise ValueError(f"dataset {name!r} does not read an archive; skip_corrupt, workers, max_pixels, mpp "
                       "and the Beam route do not apply")
    kwargs = {"skip_corrupt": skip_corrupt, "workers": workers}
    if max_pixels is not None:
      kwargs["max_pixels"] = max_pixels
    if mpp is not None:
      kwargs["mpp"] = mpp
  b = builder(name, data_dir, **kwargs)
  start = time.perf_counter()
  if not b.is_prepared():
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=manual_dir or None, beam_options=beam_pipeline_options(beam_runner, beam_options, workers)))
  return summary(b, seconds=time.perf_counter() - start)


def beam_pipeline_options(runner: str | None, flags: Sequence[str] = (), workers: int | None = None):
  """PipelineOptions for `runner` (None: no Beam), or None.

  The DirectRunner runs in `workers` processes (default: one per core) unless
  `flags` set its running mode: in-process it would use one core.
  """
  if not runner:
    if flags:
      raise ValueError(f"Beam options {list(flags)} given without a Beam runner")
    return None
  if runner not in BEAM_RUNNERS:
    raise ValueError(f"unknown Beam runner {runner!r}; one of {BEAM_RUNNERS}")
  try:  # apache-beam is an optional extra (requirements-beam.txt): imported only for the Beam route
    from apache_beam.options.pipeline_options import PipelineOptions  # noqa: PLC0415
  except ImportError as e:
    raise ImportError("the Beam route needs apache-beam: pip install -r requirements-beam.txt") from e
  flags = [f"--runner={runner}", *flags]
  if runner == "DirectRunner" and not any(f.startswith("--direct_running_mode") for f in flags):
    n = (os.cpu_count() or 1) if workers is None else max(workers, 1)
    flags += ["--direct_running_mode=multi_processing", f"--direct_num_workers={n}"]
  return PipelineOptions(flags)


def summary(b: tfds.core.DatasetBuilder, seconds: float = 0.0) -> dict[str, Any]:
  """Examples, bytes and per-class counts of every split of a built dataset."""
  names = b.info.features["label"].names
  built = (b.info.metadata or {}).get("splits", {})  # written by archive-reading builders
  splits = {}
  for split_name, split in b.info.splits.items():
    counts = collections.Counter(read_metadata(_data_source(b, split_name))["label"].tolist())
    splits[split_name] = {
        "examples": split.num_examples,
        "bytes": split.num_bytes,
        "per_class": {names[i]: counts.get(i, 0) for i in range(len(names))},
        **{k: built[split_name][k] for k in ("source_images", "images_without_tiles", "tiles_dropped",
                                             "corrupt_skipped")
           if k in built.get(split_name, {})},
    }
  name = f"{b.name}/{b.builder_config.name}" if b.builder_config else b.name
  return {"dataset": name, "version": str(b.info.version), "data_dir": str(b.data_dir),
          "seconds": round(seconds, 2), "splits": splits}


def open_split(name: str, split: str, data_dir: str = ""):
  """Random-access source over one prepared split; images stay encoded."""
  b = builder(name, data_dir)
  if not b.is_prepared():
    raise FileNotFoundError(
        f"dataset {name!r} is not prepared under {b.data_dir_root}; run "
        f"`python -m histojax.prepare --dataset {name}` first")
  for part in split.split("+"):  # TFDS split arithmetic: "fold1+fold2", "train[:10%]"
    if part.split("[")[0].strip() not in b.info.splits:
      raise KeyError(f"dataset {name!r} has no split {part!r}; it has {sorted(b.info.splits)}")
  return _data_source(b, split)


def _data_source(b: tfds.core.DatasetBuilder, split: str):
  return b.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})


def read_pairs(name: str, data_dir: str = "") -> dict[str, list]:
  """Query pairs of a pair-task dataset (pair_query), keyed by source id.

  {"query": [[a, b], ...], "validation": [[a, b, same], ...]} (validation only
  where the archive gives answers).
  """
  b = builder(name, data_dir)
  pairs = (b.info.metadata or {}).get("pairs") if b.is_prepared() else None
  if pairs is None:
    raise KeyError(f"dataset {name!r} under {b.data_dir_root} holds no query pairs (is it prepared?)")
  _check_pairs(pairs, f"{b.data_dir}/dataset_info.json metadata")
  return pairs


def _check_pairs(pairs, where: str) -> None:
  """The recorded pairs are what the builder wrote: [[a, b], ...] and [[a, b, 0|1], ...]."""
  def ok(rows, with_answer):
    return isinstance(rows, list) and all(
        isinstance(r, list) and len(r) == 2 + with_answer and all(isinstance(x, str) for x in r[:2])
        and (not with_answer or r[2] in (0, 1)) for r in rows)
  if not isinstance(pairs, dict) or not ok(pairs.get("query"), False) or not ok(pairs.get("validation", []), True):
    raise ValueError(f"{where}: the recorded query pairs are damaged; prepare the dataset again")


def class_names(name: str, data_dir: str = "") -> list[str]:
  return list(builder(name, data_dir).info.features["label"].names)


def read_metadata(source, chunk: int = 512) -> dict[str, np.ndarray]:
  """Labels, source image ids and tile coordinates of every example, in order; for a
  whole-slide dataset also each patch's case id and level-0 region (x, y, width, height).

  Samplers and exports need these for the whole split; images are not decoded.
  """
  labels, ids, coords, cases, regions = [], [], [], [], []
  for start in range(0, len(source), chunk):
    for record in source.__getitems__(list(range(start, min(start + chunk, len(source))))):
      labels.append(int(record["label"]))
      ids.append(_text(record.get("source_id", b"")))
      coords.append(np.asarray(record.get("coords", (0, 0)), np.int32))
      if "region" in record:  # a whole-slide dataset's patches: their case and level-0 box
        cases.append(_text(record.get("case_id", b"")))
        regions.append(np.asarray(record["region"], np.int32))
  meta = {
      "label": np.asarray(labels, np.int64),
      "source_id": np.asarray(ids, dtype=str),
      "coords": np.stack(coords) if coords else np.zeros((0, 2), np.int32),
  }
  if regions and len(regions) == len(labels):
    meta.update(case_id=np.asarray(cases, dtype=str), region=np.stack(regions))
  return meta


def _text(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def ensure_prepared(dataset_config) -> None:
  """Builds the configured dataset once if it is missing (process 0 builds,
  the others wait), or fails with the command that would build it."""
  cfg = dataset_config
  if builder(cfg.name, cfg.data_dir).is_prepared():
    return
  if not cfg.prepare_if_missing:
    raise FileNotFoundError(
        f"dataset {cfg.name!r} is not prepared and dataset.prepare_if_missing is off; run "
        f"`python -m histojax.prepare --dataset {cfg.name}`")
  if jax.process_index() == 0:
    info("preparing dataset %s (first use)", cfg.name)
    built = prepare(cfg.name, cfg.data_dir, cfg.manual_dir)
    info("prepared %s in %.1f s: %s", built["dataset"], built["seconds"],
         {k: v["examples"] for k, v in built["splits"].items()})
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("histojax:dataset_prepared")
