"""Machinery every archive-reading builder shares: one place for it, not six.

A builder only says where its archive keeps the images and which label, split
and source id each one has (`_sources`). Everything else is here: checking the
manual_dir, keeping every source image in one split, preparing images in worker
processes (the per-image work, decoding, naming corrupt files and tiling, is
`source_images`'s, shared with the Beam route), and recording what was dropped or
skipped in the dataset's metadata so the summary can report it later.

Why processes and not threads: decoding, resizing and PNG encoding hold the GIL
for most of their time. Workers are spawned, not forked, because the caller may
have JAX's threads running (a forked child can deadlock on their locks).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import itertools
import multiprocessing
import os
import re
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from histojax.data import images, stain, tiling
from tfds_builders.source_images import (MAX_PIXELS, BuildError, CorruptImageError, ImageSpec, SourceImage,
                                          corrupt_image_error, prepare_source)

class ManualDirError(BuildError, FileNotFoundError):
  """The manual_dir is missing, empty, or not laid out as the archive is."""


class EmptySplitError(BuildError, ValueError):
  """Every tile of a split was dropped: the tiling config does not fit the images."""


@dataclasses.dataclass
class TiledConfig(tfds.core.BuilderConfig):
  """How source images become examples: tiles, or whole (patch_size=0)."""
  patch_size: int = 224  # 0 keeps every image whole (patch datasets)
  stride: int = 0  # 0 -> patch_size (non-overlapping)
  resize: float = 1.0  # scale before tiling, e.g. 0.5 for 40x -> 20x
  image_size: tuple[int, int] | None = None  # whole images only: resize to (height, width)
  tissue_threshold: float | None = None  # saturation; None -> Otsu per image
  min_tissue_fraction: float = 0.5
  encoding: str = "png"  # "png" (lossless) or "jpeg" (quality 95, ~5x smaller)
  stain: str | None = None  # "macenko" or "reinhard": every image re-stained to one reference before tiling (histojax.data.stain)
  # Microns per pixel of the archive's images as scanned; None: not known (`prepare --mpp` gives it).
  # With the resize it makes the gallery's magnification (`gallery_mpp`), which slides are cut to.
  mpp: float | None = None

  def image_spec(self) -> ImageSpec:
    tiles = None
    if self.patch_size:
      tiles = tiling.TilingConfig(self.patch_size, self.stride or self.patch_size, self.resize,
                                  self.tissue_threshold, self.min_tissue_fraction)
    elif self.image_size is not None and self.resize != 1.0:
      raise ValueError(f"{self.name}: give either image_size or resize for whole images, not both")
    if self.encoding not in ("png", "jpeg"):
      raise ValueError(f"{self.name}: encoding must be 'png' or 'jpeg', got {self.encoding!r}")
    stain.spec(self.stain)  # an unknown method fails here, before any image is read
    return ImageSpec(tiles, self.resize, tuple(self.image_size) if self.image_size else None,
                     self.encoding, self.stain)


@dataclasses.dataclass
class SplitConfig(TiledConfig):
  """For archives without an official split: a deterministic one per source image."""
  split_fractions: tuple[tuple[str, float], ...] = (("train", 0.7), ("validation", 0.1), ("test", 0.2))
  split_seed: int = 0


def ordered_map(fn: Callable, items: Sequence, workers: int) -> Iterator:
  """fn over items in worker processes, results in input order.

  At most 2 items per worker are in flight, so results never pile up in memory
  while the TFDS writer consumes them; a failure or interruption cancels the rest.
  """
  if workers <= 1 or len(items) <= 1:
    yield from map(fn, items)
    return
  pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
  try:
    todo = iter(items)
    pending = collections.deque(pool.submit(fn, item) for item in itertools.islice(todo, 2 * workers))
    while pending:
      result = pending.popleft().result()
      for item in itertools.islice(todo, 1):
        pending.append(pool.submit(fn, item))
      yield result
  finally:
    pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------- archives


def list_images(folder: epath.PathLike) -> list[epath.Path]:
  """Image files directly in `folder`, sorted; hidden files (macOS `._*` forks) skipped."""
  folder = epath.Path(folder)
  return sorted(p for p in folder.iterdir() if p.is_file() and images.is_image_file(p.name))


def subfolders(folder: epath.PathLike) -> list[epath.Path]:
  return sorted(p for p in epath.Path(folder).iterdir() if p.is_dir() and not p.name.startswith("."))


def find_folder(root: epath.Path, candidates: Iterable[str]) -> epath.Path | None:
  """The first of root/<candidate> that exists (candidates may hold '/')."""
  for name in candidates:
    if (root / name).is_dir():
      return root / name
  return None


def stratified_split(labels: dict[str, int], fractions: Sequence[tuple[str, float]],
                     seed: int) -> dict[str, str]:
  """source id -> split, stratified by class, the same on every machine and run.

  Within each class the ids are sorted, permuted by a generator seeded with
  (seed, label), and cut by largest-remainder rounding of the fractions.
  """
  names, weights = _check_fractions(fractions)
  by_class = collections.defaultdict(list)
  for source_id in sorted(labels):
    by_class[labels[source_id]].append(source_id)
  assignment = {}
  for label, ids in sorted(by_class.items()):
    counts = _largest_remainder(len(ids), weights)
    order = np.random.default_rng([seed, label]).permutation(len(ids))
    bounds = np.cumsum(counts)[:-1]
    for name, part in zip(names, np.split(order, bounds)):
      assignment.update({ids[i]: name for i in part})
  return assignment


def block_split(photos: dict[str, tuple[int, int]], fractions: Sequence[tuple[str, float]],
                block_size: int) -> dict[str, str]:
  """source id -> split, whole blocks of neighbouring photo numbers per class.

  `photos` maps a source id to (label, number). Within each class the photos are
  sorted by number and cut into blocks of at most `block_size` consecutive
  photos (`photo_blocks`); blocks, not photos, are dealt to the splits by
  largest-remainder rounding of the fractions, as contiguous runs in the order
  the fractions are given. Neighbouring numbers mostly come from one patient, so
  a patient can only reach two splits where a run ends, and with the fractions
  ordered train, validation, test the validation run stands between train and
  test: a patient must span the whole validation run to leak into test. Needs no
  seed: the same ids give the same split on every machine, for any count.
  """
  names, weights = _check_fractions(fractions)
  if block_size < 1:
    raise ValueError(f"block_size must be >= 1 photo, got {block_size}")
  by_class = collections.defaultdict(list)
  for source_id, (label, number) in photos.items():
    by_class[label].append((number, source_id))
  assignment = {}
  for label, items in sorted(by_class.items()):
    items.sort()
    numbers = [n for n, _ in items]
    if len(set(numbers)) != len(numbers):
      raise ValueError(f"class {label}: two photos share a number: {sorted(n for n in numbers if numbers.count(n) > 1)[:5]}")
    blocks = photo_blocks(items, block_size)
    counts = _largest_remainder(len(blocks), weights)
    run = iter(blocks)
    for name, count in zip(names, counts):
      for block in itertools.islice(run, int(count)):
        assignment.update({source_id: name for _, source_id in block})
  return assignment


def photo_blocks(ordered: Sequence, block_size: int) -> list[list]:
  """`ordered` cut into ceil(n / block_size) runs of near-equal size (sizes differ by at most one),
  so no split is left a short remainder block: 37 photos in blocks of 5 -> 5,5,5,5,5,4,4,4."""
  count = -(-len(ordered) // block_size)
  bounds = np.cumsum([len(part) for part in np.array_split(np.arange(len(ordered)), count)]) if count else []
  starts = [0, *bounds[:-1]]
  return [list(ordered[a:b]) for a, b in zip(starts, bounds)]


def photo_number(source_id: str) -> int:
  """The trailing number of an id such as 'is012' -> 12 (archives number photos in acquisition order)."""
  match = re.search(r"(\d+)$", source_id)
  if match is None:
    raise ValueError(f"source id {source_id!r} does not end in a photo number, so it cannot be split into "
                     "blocks of neighbouring photos; use the per-photo split instead")
  return int(match.group(1))


def _check_fractions(fractions: Sequence[tuple[str, float]]) -> tuple[list[str], np.ndarray]:
  names = [n for n, _ in fractions]
  weights = np.array([f for _, f in fractions], np.float64)
  if len(set(names)) != len(names) or (weights < 0).any() or abs(weights.sum() - 1.0) > 1e-6:
    raise ValueError(f"split_fractions must name distinct splits with fractions summing to 1, got {fractions}")
  return names, weights


def _largest_remainder(n: int, weights: np.ndarray) -> np.ndarray:
  quota = n * weights
  counts = np.floor(quota).astype(int)
  for i in np.argsort(-(quota - counts), kind="stable")[: n - counts.sum()]:
    counts[i] += 1
  return counts


def check_one_split_per_source(sources: Sequence[SourceImage]) -> None:
  """Source ids are unique, so no image can put patches into two splits."""
  seen: dict[str, SourceImage] = {}
  for s in sources:
    first = seen.setdefault(s.source_id, s)
    if first is not s:
      raise ValueError(f"two images share the source id {s.source_id!r} ({first.path} in split "
                       f"{first.split!r}, {s.path} in split {s.split!r}); patches of one image must "
                       "stay in one split and ids must be unique")


# ----------------------------------------------------------------------------- builder


class TiledBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of every builder that reads a user-downloaded archive.

  Subclasses set CLASS_NAMES (None: found in the archive), HOMEPAGE,
  MANUAL_DOWNLOAD_INSTRUCTIONS and implement `_sources`.
  """

  CLASS_NAMES: Sequence[str] | None = None
  HOMEPAGE = ""

  def __init__(self, *, skip_corrupt: bool = False, workers: int | None = None, max_pixels: int | None = None,
               mpp: float | None = None, **kwargs):
    if mpp is not None and not 0 < mpp < 100:
      raise ValueError(f"mpp must be microns per pixel in (0, 100), got {mpp}")
    self._mpp = mpp
    self._skip_corrupt = skip_corrupt
    self._max_pixels = max_pixels or MAX_PIXELS
    self._workers = (os.cpu_count() or 1) if workers is None else workers
    self._beam = False  # set per build from TFDS's download_config (_generate_splits)
    super().__init__(**kwargs)

  def _sources(self, manual_dir: epath.Path) -> list[SourceImage]:
    raise NotImplementedError

  def _extra_features(self) -> dict[str, tfds.features.FeatureConnector]:
    return {}

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    size = cfg.patch_size or None
    if not cfg.patch_size and cfg.image_size:
      shape = (*cfg.image_size, 3)
    else:
      shape = (size, size, 3)
    labels = tfds.features.ClassLabel(names=self.CLASS_NAMES) if self.CLASS_NAMES else tfds.features.ClassLabel()
    return self.dataset_info_from_configs(
        description=self.__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=shape, encoding_format=None if not size else cfg.encoding),
            "label": labels,
            "source_id": tfds.features.Text(),
            "coords": tfds.features.Tensor(shape=(2,), dtype=np.int32),  # (y, x) in resized pixels
            "original_split": tfds.features.Text(),
            **self._extra_features(),
        }),
        supervised_keys=("image", "label"),
        homepage=self.HOMEPAGE,
        metadata=tfds.core.MetadataDict(),
    )

  def _manual_dir(self, dl_manager) -> epath.Path:
    path = epath.Path(dl_manager._manual_dir or "")  # noqa: SLF001  (we word the error ourselves)
    if not str(path) or not path.is_dir() or not any(path.iterdir()):
      raise self.layout_error(f"manual_dir {str(path) or '(not given)'} is missing or empty.")
    return path

  def layout_error(self, problem: str) -> ManualDirError:
    return ManualDirError(
        f"{self.name}: {problem}\n{tfds.core.utils.dedent(self.MANUAL_DOWNLOAD_INSTRUCTIONS)}\n"
        f"Then run: python -m histojax.prepare --dataset {self.name} --manual_dir DIR")

  def _generate_splits(self, dl_manager, download_config):
    # TFDS shows the Beam runner and options only here; they decide the route.
    self._beam = download_config.beam_runner is not None or download_config.beam_options is not None
    try:
      return super()._generate_splits(dl_manager, download_config)
    except Exception as e:  # noqa: BLE001  (a runner hands back a worker's error as text)
      corrupt = self._beam and _corrupt_image_in(str(e))
      if corrupt:
        raise CorruptImageError(corrupt) from e
      raise

  def _split_generators(self, dl_manager):
    manual_dir = self._manual_dir(dl_manager)
    self.builder_config.image_spec()  # a bad config fails before any image is read
    sources = self._sources(manual_dir)
    if not sources:
      raise self.layout_error(f"no images found under {manual_dir}.")
    check_one_split_per_source(sources)
    by_split = collections.defaultdict(list)
    for s in sources:
      by_split[s.split].append(s)
    self.info.metadata.update({"manual_dir": os.fspath(manual_dir), "splits": {},
                               "config": {**_config_record(self.builder_config), "mpp": self.source_mpp()}})
    self._split_sources = dict(by_split)
    generate = self._beam_examples if self._beam else self._generate_examples
    return {split: generate(split, items) for split, items in by_split.items()}

  def image_spec(self, split: str) -> ImageSpec:
    """How the images of `split` are prepared; a builder may differ per split."""
    del split
    return self.builder_config.image_spec()

  def source_mpp(self) -> float | None:
    """Microns per pixel of the archive's images: `prepare --mpp`, else what the build
    recorded, else the config's (the archive's published resolution)."""
    if self._mpp is not None:
      return self._mpp
    recorded = (self.info.metadata or {}).get("config", {}) if self.is_prepared() else {}
    return recorded.get("mpp", self.builder_config.mpp)

  def gallery_mpp(self, split: str) -> float | None:
    """Microns per pixel of `split`'s examples as the model sees them (`tiling.gallery_mpp`)."""
    spec = self.image_spec(split)
    return tiling.gallery_mpp(self.source_mpp(), spec.tiles.resize if spec.tiles else spec.resize, spec.image_size)

  def _generate_examples(self, split: str, sources: list[SourceImage]):
    work = functools.partial(prepare_source, spec=self.image_spec(split), max_pixels=self._max_pixels)
    stats = {"source_images": len(sources), "tiles_kept": 0, "tiles_dropped": 0,
             "images_without_tiles": 0, "corrupt_skipped": []}
    for done, result in enumerate(ordered_map(work, sources, self._workers), 1):
      if result.error:
        if not self._skip_corrupt:
          raise corrupt_image_error(result.error)
        logging.warning("skipping corrupt image: %s", result.error)
        stats["corrupt_skipped"].append(result.source.path)
      stats["tiles_kept"] += len(result.examples)
      stats["tiles_dropped"] += result.dropped
      # An image whose every tile is background vanishes from the split; count it.
      stats["images_without_tiles"] += not result.examples and not result.error
      if done % 50 == 0 or done == len(sources):
        logging.info("%s/%s: %d/%d images, %d tiles kept, %d dropped", self.name, split, done,
                     len(sources), stats["tiles_kept"], stats["tiles_dropped"])
      yield from result.examples
    self._check_not_empty(split, stats)
    self.info.metadata["splits"][split] = stats

  def _beam_examples(self, split: str, sources: list[SourceImage]):
    """The Beam route: the same prepare_source on each image, on the runner TFDS was given."""
    from tfds_builders import beam_route  # noqa: PLC0415  (apache-beam is an optional extra)
    return beam_route.prepare_split(sources, self.image_spec(split), split, self._skip_corrupt, self._max_pixels)

  def _process_pipeline_result(self, pipeline_result) -> None:
    # Runs after the pipeline and before TFDS finalises the splits and writes metadata.json.
    from tfds_builders import beam_route  # noqa: PLC0415  (apache-beam is an optional extra)
    for split, sources in self._split_sources.items():
      stats = beam_route.split_stats(pipeline_result, split, sources)
      self._check_not_empty(split, stats)
      self.info.metadata["splits"][split] = stats

  def _check_not_empty(self, split: str, stats: dict[str, Any]) -> None:
    if not stats["tiles_kept"]:
      raise EmptySplitError(f"{self.name}: split {split!r} has no examples: {stats['source_images']} images "
                            f"gave {stats['tiles_dropped']} tiles, all dropped by the tissue filter")


def _corrupt_image_in(runner_error: str) -> str:
  """corrupt_image_error's message, when a Beam worker raised it (the runner keeps only its text)."""
  found = re.search(r"CorruptImageError: (.+?--skip_corrupt to leave it out and count it\.)", runner_error,
                    re.DOTALL)
  return found.group(1) if found else ""


def _config_record(cfg: TiledConfig) -> dict[str, Any]:
  fields = {f.name for f in dataclasses.fields(TiledConfig)} - {f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}
  fields |= {"split_fractions", "split_seed", "split_scheme", "block_size"} & {f.name for f in dataclasses.fields(cfg)}
  return {name: getattr(cfg, name) for name in sorted(fields)}
