"""The `slides` builder on small synthetic slides (3 classes x 4 slides, 2 cases per class):
patches at a physical resolution with their slide, case and level-0 region, split by case,
the mosaic, what the metadata records, refusals naming slides.csv or the slide, the Beam
route (one slide per element) writing the local route's records, and the whole way from the
builder through export and evaluate's index to a slide query and the viewer's file lookup.
"""

from __future__ import annotations

import collections
import dataclasses
import shutil

import numpy as np
import pytest

from histojax import config as config_lib
from histojax import evaluate, export, indexing, query, slide_query, slides
from histojax.service import viewer
from tests import slide_fixtures
from tests.archive_fixtures import build
from tests.test_slide_search import COMPAT
from tfds_builders import common
from tfds_builders.slides.slides_dataset_builder import SlideBuildError, SlidesConfig

COLOURS = {"adipose": ((246, 228, 214), (236, 205, 190)), "lymphocytes": ((96, 62, 160), (42, 22, 104)),
           "stroma": ((236, 128, 176), (206, 84, 146))}
SIZE = (1400, 900)  # at 0.5 um/px: 12 patches of 64 px at 1.68 um/px (215 level-0 px) on each slide's tissue
SMALL = SlidesConfig(name="t64", patch_size=64, target_mpp=1.68, split_fractions=(("train", 0.5), ("test", 0.5)))


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
  root = tmp_path_factory.mktemp("slides_archive")
  made = slide_fixtures.coloured_slides(root, COLOURS, per_class=4, size=SIZE, cases_per_class=2)
  return root, {s.slide_id: s for s in made}


@pytest.fixture(scope="module")
def built(archive, tmp_path_factory):
  root, _ = archive
  data_dir = tmp_path_factory.mktemp("slides_tfds")
  return (*build("slides", SMALL, root, data_dir), str(data_dir))


def _examples(ds):
  return {split: [s[i] for i in range(len(s))] for split, s in ds.items()}


def test_patches_carry_slide_case_and_level0_region_and_cases_stay_in_one_split(archive, built):
  _, made = archive
  ds, builder, _ = built
  examples = _examples(ds)
  assert set(examples) == {"train", "test"} and builder.info.features["label"].names == sorted(COLOURS)
  split_of_case = collections.defaultdict(set)
  for split, items in examples.items():
    for x in items:
      slide = made[x["source_id"].decode()]
      split_of_case[slide.case_id].add(split)
      assert x["case_id"].decode() == slide.case_id and builder.info.features["label"].names[x["label"]] == slide.label
      rx, ry, rw, rh = x["region"]
      assert (rw, rh) == (215, 215) and (x["coords"] == (ry, rx)).all() and x["image"].shape == (64, 64, 3)
      bx, by, bw, bh = slide.boxes[0]  # half of each patch on tissue, to three ~8 um/px mask pixels (48 level-0 px)
      slack = 48
      assert bx - rw / 2 - slack <= rx <= bx + bw - rw / 2 + slack and by - rh / 2 - slack <= ry <= by + bh - rh / 2 + slack
  assert all(len(s) == 1 for s in split_of_case.values()) and len(split_of_case) == 6
  per_split = {split: {x["source_id"].decode() for x in items} for split, items in examples.items()}
  assert len(per_split["train"]) == len(per_split["test"]) == 6  # whole cases, stratified by label
  # A patch is the slide's own pixels at 1.68 um/px, read as the query path reads slides.
  x = examples["train"][0]
  with slides.open_slide(made[x["source_id"].decode()].path) as slide:
    same = slide.read_region(tuple(x["region"][:2]), (64, 64), 1.68).astype(int)
  assert np.abs(same - x["image"].astype(int)).mean() < 3  # PNG is lossless; resampling is the same


def test_the_metadata_records_the_cut_and_where_each_slide_is(archive, built, tmp_path):
  root, made = archive
  _, builder, _ = built
  record = builder.info.metadata["slides"]
  assert record["root"] == str(root) and record["files"]["stroma_3"] == "stroma/stroma_3.tif"
  assert (record["patch_px"], record["mpp"], record["mosaic"]) == (64, 1.68, {"method": "all_patches"})
  assert builder.gallery_mpp("train") == 1.68
  tiling_rec = export.builder_tiling(builder)
  assert (tiling_rec["patch_size"], tiling_rec["resize"], tiling_rec["tissue_threshold"]) == (64, 1.0, 0.05)
  splits = builder.info.metadata["splits"]
  assert splits["train"]["source_images"] == 6 and splits["train"]["images_without_tiles"] == 0
  # The mosaic: fewer rows, the rest counted as dropped, the settings recorded.
  mosaic = dataclasses.replace(SMALL, name="t64m", mosaic_fraction=0.2)
  ds, b = build("slides", mosaic, root, tmp_path)
  full = splits["train"]["tiles_kept"]
  kept = b.info.metadata["splits"]["train"]
  assert kept["tiles_kept"] < full and kept["tiles_kept"] + kept["tiles_dropped"] == full
  assert b.info.metadata["slides"]["mosaic"]["fraction"] == 0.2


def _csv(root, text: str):
  (root / "slides.csv").write_text(text)


@pytest.mark.parametrize("table, message", [
    ("slide_id,case_id,label\nadipose_0,c0,adipose\n", "not listed in slides.csv"),
    ("slide_id,case_id,label\n" + "".join(f"{s},c,{s.split('_')[0]}\n" for s in
                                          [f"{c}_{i}" for c in COLOURS for i in range(4)]) + "ghost,c,adipose\n",
     "have no slide file"),
    ("slide_id,label\nadipose_0,adipose\n", "case_id"),
    ("slide_id,case_id,label,split\nadipose_0,c,adipose,train\nadipose_1,c,adipose,\n", "some rows give a split"),
    ("slide_id,case_id,label,split\nadipose_0,c,adipose,holdout\n", "'holdout' is not one of"),
    ("slide_id,case_id,label\nadipose_0,c,adipose\nadipose_0,d,adipose\n", "listed twice"),
    ("slide_id,case_id,label\nadipose_0,,adipose\n", "empty case_id"),
])
def test_a_bad_slides_csv_is_refused_naming_it(archive, tmp_path, table, message):
  root, _ = archive
  copy = tmp_path / "raw"
  shutil.copytree(root, copy)
  _csv(copy, table)
  with pytest.raises(common.ManualDirError, match=message):
    build("slides", SMALL, copy, tmp_path / "tfds")
  assert not list((tmp_path / "tfds").rglob("dataset_info.json"))  # nothing marked prepared


def test_a_case_across_two_given_splits_is_refused(archive, tmp_path):
  root, made = archive
  copy = tmp_path / "raw"
  shutil.copytree(root, copy)
  rows = "".join(f"{s.slide_id},{s.case_id},{s.label},{'test' if s.slide_id == 'adipose_2' else 'train'}\n"
                 for s in made.values())
  _csv(copy, "slide_id,case_id,label,split\n" + rows)
  with pytest.raises(common.ManualDirError, match="case 'adipose_case0' has slides in splits"):
    build("slides", SMALL, copy, tmp_path / "tfds")


def test_a_bad_slide_stops_the_build_named_or_is_skipped_and_glass_is_counted(archive, tmp_path):
  root, made = archive
  copy = tmp_path / "raw"
  shutil.copytree(root, copy)
  (copy / "adipose" / "adipose_1.tif").write_text("not a slide")
  glass = slide_fixtures.tissue_image(*SIZE, seed=5)  # glass only
  slide_fixtures.write_pyramid(copy / "stroma" / "stroma_2.tif", glass, 0.5)
  with pytest.raises(SlideBuildError, match="adipose_1"):
    build("slides", SMALL, copy, tmp_path / "stop")
  ds, b = build("slides", SMALL, copy, tmp_path / "skip", skip_corrupt=True)
  counts = b.info.metadata["splits"]
  assert sum(len(s["corrupt_skipped"]) for s in counts.values()) == 1
  assert sum(s["images_without_tiles"] for s in counts.values()) == 1
  ids = {x["source_id"].decode() for items in _examples(ds).values() for x in items}
  assert ids == set(made) - {"adipose_1", "stroma_2"}


def test_the_beam_route_writes_the_local_routes_slides(archive, built, tmp_path):
  pytest.importorskip("apache_beam", reason="apache-beam is not installed (the Beam route is an optional extra)")
  from tests.test_beam import _direct, _shards  # noqa: PLC0415  (the Beam test's helpers need apache-beam)
  root, _ = archive
  _, local, _ = built
  _, beamed = build("slides", SMALL, root, tmp_path, beam_options=_direct(2))
  assert _shards(beamed) == _shards(local)
  assert beamed.info.metadata["splits"] == local.info.metadata["splits"]
  assert beamed.info.metadata["slides"] == local.info.metadata["slides"]


def test_from_the_builder_through_evaluate_to_a_slide_query(archive, built, tmp_path):
  """The compat model (48 px input) exports the slide dataset; evaluate's index carries the
  rows' regions and cases, gallery_mpp and the slides record, and answers a held-out slide."""
  root, made = archive
  _, _, data_dir = built
  workdir = tmp_path / "workdir"
  shutil.copytree(COMPAT / "workdir", workdir)
  config = config_lib.load(workdir / "config.json")
  config.dataset.name, config.dataset.data_dir = "slides/t64", data_dir
  evaluate.evaluate(config, workdir)
  manifest = indexing.read_manifest(workdir / "index")
  assert manifest["gallery_mpp"] == 1.68 and manifest["slides"]["root"] == str(root)
  rows = indexing.load_rows(workdir / "index")
  assert indexing.slide_mask(rows).all() and set(rows["case_id"]) == {made[s].case_id for s in set(rows["source_id"])}
  engine = query.QueryEngine.open(workdir / "index", str(workdir))
  held_out = next(s for s in made.values() if s.slide_id not in set(rows["source_id"]))
  answer = slide_query.answer_slide(engine, held_out.path, 3, slide_query.slide_cut(engine))
  assert answer["cut"]["patch_px"] == 64 and answer["cut"]["mpp"] == 1.68 and answer["slides"]
  assert all(s["slide_id"] in set(rows["source_id"]) for s in answer["slides"])
  top = answer["slides"][0]["slide_id"]
  assert viewer.SlideFiles(engine).path(top) == str(made[top].path)
