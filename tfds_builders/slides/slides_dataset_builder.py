"""slides: your whole-slide images and a `slides.csv`, cut into patches at a physical resolution.

    <manual_dir>/slides.csv                              slide_id,case_id,label[,split]
    <manual_dir>/**/<slide_id>.{svs,tif,ndpi,mrxs,...}   (a DICOM WSI: a folder of .dcm files)

Every slide under manual_dir is found by `histojax.slides.find_slides` (a MIRAX
slide's data folder or a DICOM series is one slide, not many); its slide id is the
file stem, and slides.csv (`histojax.slides.read_slide_table`) gives its case
(patient) id, label and, optionally, split. Without a split column, whole cases are dealt
to train/validation/test, stratified by label (`common.stratified_split` over
cases): no patient has slides on both sides. With one, a case whose slides sit in
two splits is refused.

Each slide is cut (`tfds_builders.slide_sources`) into `patch_size` px patches at
`target_mpp` microns per pixel, kept where the tissue mask covers
`min_tissue_fraction`, and, with `mosaic_fraction` < 1, reduced to a Yottixel/SISH
mosaic. `gallery_mpp` is `target_mpp`; the metadata records the cut, the mosaic
and each slide's file (relative to manual_dir), which export and the index
manifest carry on, so the service can show a result slide from its file.

The local route reads one slide at a time, its patches in threads, streaming them
(memory bounded whatever the slide's size); the Beam route takes one slide per
element. A slide that cannot be opened stops the build, named, unless
`--skip_corrupt`; a slide without tissue keeps no patch and is counted. Damage
found while reading a slide's patches always stops the build.
"""

from __future__ import annotations

import collections
import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from histojax import slides
from tfds_builders import common
from tfds_builders.slide_sources import SlideSpec, plan_slide, slide_spec, stop_message
from tfds_builders.source_images import BuildError, SourceImage

CSV_NAME = "slides.csv"


class SlideBuildError(BuildError, ValueError):
  """A slide that stopped the build; the message names it."""


@dataclasses.dataclass
class SlidesConfig(common.SplitConfig):
  patch_size: int = 224  # pixels a side, at target_mpp
  target_mpp: float = 0.5  # microns per pixel of the patches: the gallery's magnification
  mosaic_fraction: float = 1.0  # 1 keeps every patch with tissue; 0.05: Yottixel/SISH's mosaic
  tissue_threshold: float | None = None  # unused: a slide's tissue comes from its tissue mask

  def image_spec(self) -> SlideSpec:
    if self.encoding not in ("png", "jpeg"):
      raise ValueError(f"{self.name}: encoding must be 'png' or 'jpeg', got {self.encoding!r}")
    return slide_spec(self.patch_size, self.target_mpp, self.mosaic_fraction, self.min_tissue_fraction,
                      self.encoding)


class Builder(common.TiledBuilder):
  """Whole-slide images listed in slides.csv, cut at a physical resolution; split by case (patient)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  CLASS_NAMES = None  # the labels in slides.csv, sorted
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Pass the folder of your slides as manual_dir, with a slides.csv at its top:
    <manual_dir>/slides.csv   header slide_id,case_id,label and optionally split (train/validation/test)
    <manual_dir>/**/<slide_id>.svs|.tif|.ndpi|.mrxs|... (any depth; a DICOM WSI is a folder of .dcm files)
  The slide id is the file's stem (a DICOM folder's name); case_id is the patient's (or case's) id.
  """
  BUILDER_CONFIGS = [
      SlidesConfig(name="default", description="224 px patches at 0.5 um/px (20x), every patch with half its "
                   "area tissue; split 70/10/20 by case unless slides.csv gives splits."),
      SlidesConfig(name="mosaic", description="default, reduced to a mosaic per slide (9 colour clusters, 5% "
                   "spatial sampling, as Yottixel and SISH).", mosaic_fraction=0.05),
      SlidesConfig(name="x5_64", description="64 px patches at 1.68 um/px (bach/x5_64's magnification), every "
                   "patch; split 70/10/20 by case unless slides.csv gives splits.", patch_size=64, target_mpp=1.68),
      SlidesConfig(name="x5_64_mosaic", description="x5_64 reduced to a 5% mosaic per slide.", patch_size=64,
                   target_mpp=1.68, mosaic_fraction=0.05),
  ]

  def _extra_features(self):
    return {"case_id": tfds.features.Text(),
            "region": tfds.features.Tensor(shape=(4,), dtype=np.int32)}  # level-0 x, y, width, height

  def image_spec(self, split: str) -> SlideSpec:
    del split
    return dataclasses.replace(self.builder_config.image_spec(), slide_mpp=self._mpp)

  def gallery_mpp(self, split: str) -> float:
    del split
    return float(self.builder_config.target_mpp)

  # --- The archive --------------------------------------------------------------------

  def _sources(self, manual_dir: epath.Path) -> list[SourceImage]:
    table = self._read_csv(manual_dir / CSV_NAME)
    files = self._slide_files(manual_dir)
    listed = {row.slide_id for row in table}
    missing = sorted(listed - set(files))
    if missing:
      raise self.layout_error(f"{len(missing)} slides listed in {CSV_NAME} have no slide file under {manual_dir}: "
                              f"{missing[:5]}")
    unlisted = sorted(set(files) - listed)
    if unlisted:
      raise self.layout_error(f"slides not listed in {CSV_NAME}, so their label and case are unknown: "
                              f"{[os.fspath(files[s]) for s in unlisted[:5]]}")
    names = sorted({row.label for row in table})
    self.info.features["label"].names = names
    splits = self._splits(table, {name: i for i, name in enumerate(names)})
    self.info.metadata["slides"] = self._record(manual_dir, files)
    return [SourceImage(path=os.fspath(files[row.slide_id]), label=names.index(row.label), source_id=row.slide_id,
                        split=splits[row.slide_id], original_split=row.split, extra=(("case_id", row.case_id),))
            for row in sorted(table, key=lambda r: r.slide_id)]

  def _read_csv(self, path: epath.Path) -> list[slides.SlideRow]:
    if not path.exists():
      raise self.layout_error(f"no {CSV_NAME} in {path.parent}.")
    try:
      return slides.read_slide_table(path)
    except slides.SlideTableError as e:
      raise self.layout_error(str(e)) from e

  def _slide_files(self, manual_dir: epath.Path) -> dict[str, epath.Path]:
    files = {}
    for path in slides.find_slides(os.fspath(manual_dir)).slides:
      found = files.setdefault(slides.slide_id(path), path)
      if found != path:
        raise self.layout_error(f"two slides share the id {slides.slide_id(path)!r}: {found} and {path}; "
                                "slide ids (file stems) must be unique")
    return files

  def _splits(self, table: list[slides.SlideRow], label_ids: dict[str, int]) -> dict[str, str]:
    """slide id -> split: slides.csv's (each case in one split), else whole cases, stratified by label."""
    by_case = collections.defaultdict(list)
    for row in table:
      by_case[row.case_id].append(row)
    if table[0].split:
      for case, rows in by_case.items():
        if len({r.split for r in rows}) > 1:
          raise self.layout_error(f"{CSV_NAME}: case {case!r} has slides in splits "
                                  f"{sorted({r.split for r in rows})}: a patient must stay in one split")
      return {row.slide_id: row.split for row in table}
    # A case's label for stratifying: its most frequent (ties: the first in name order).
    case_label = {case: label_ids[collections.Counter(sorted(r.label for r in rows)).most_common(1)[0][0]]
                  for case, rows in by_case.items()}
    cfg = self.builder_config
    case_split = common.stratified_split(case_label, cfg.split_fractions, cfg.split_seed)
    return {row.slide_id: case_split[row.case_id] for row in table}

  def _record(self, manual_dir: epath.Path, files: dict[str, epath.Path]) -> dict:
    """Where the slides are and how they were cut, for the index manifest (`export.dataset_slides`)."""
    root = os.path.abspath(os.fspath(manual_dir))
    spec = self.image_spec("train")
    return {"root": root, "files": {sid: os.path.relpath(os.path.abspath(os.fspath(p)), root)
                                    for sid, p in sorted(files.items())},
            "patch_px": spec.tiles.patch_size, "mpp": spec.target_mpp,
            "min_tissue": spec.tiles.min_tissue_fraction, "mosaic": spec.mosaic.record(),
            "tissue": slides.TissueSettings().record(), "mpp_override": spec.slide_mpp}

  # --- The routes ---------------------------------------------------------------------

  def _generate_examples(self, split: str, sources: list[SourceImage]):
    """The local route: one slide at a time, its patches read in threads and streamed."""
    spec = self.image_spec(split)
    stats = {"source_images": len(sources), "tiles_kept": 0, "tiles_dropped": 0, "images_without_tiles": 0,
             "corrupt_skipped": []}
    for done, source in enumerate(sources, 1):
      try:
        plan = plan_slide(source, spec)
      except slides.NoTissueError as e:
        logging.warning("no tissue, no patch: %s", e)
        stats["images_without_tiles"] += 1
        continue
      except slides.SlideError as e:
        if not self._skip_corrupt:
          raise SlideBuildError(stop_message(source, e)) from e
        logging.warning("skipping slide: %s", e)
        stats["corrupt_skipped"].append(source.path)
        continue
      stats["tiles_dropped"] += plan.dropped
      try:
        for example in plan.examples():
          stats["tiles_kept"] += 1
          yield example
      except slides.SlideError as e:  # damage met mid-slide: what was written of it cannot be taken back
        raise SlideBuildError(f"{e}\nNothing was marked prepared. Replace or remove slide "
                              f"{source.source_id!r} ({source.path}).") from e
      logging.info("%s/%s: %d/%d slides, %d patches kept", self.name, split, done, len(sources), stats["tiles_kept"])
    self._check_not_empty(split, stats)
    self.info.metadata["splits"][split] = stats

  def _beam_examples(self, split: str, sources: list[SourceImage]):
    """The Beam route: one slide per element, the same `plan_slide` and patches as the local route."""
    from tfds_builders import beam_route  # noqa: PLC0415  (apache-beam is an optional extra)
    return beam_route.prepare_slide_split(sources, self.image_spec(split), split, self._skip_corrupt)
