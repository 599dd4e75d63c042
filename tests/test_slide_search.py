"""Whole slides in the query path (histojax.slide_query, search --slides, index add --slides) on
the compat fixture's index (a tiny model on synthetic tissue, no gallery_mpp recorded) grown by
six small synthetic slides of three colours, two per class, two slides per case.

A slide written twice under two names is the test with a right answer: the same pixels give
the same mosaic and the same embeddings, so the twin must be the top slide at score 1 with the
query's very regions, and a slide must never answer itself.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from histojax import index as index_cli
from histojax import indexing, query, search, slide_query, slides
from histojax.indexing import curator
from tests import slide_fixtures

ROOT = pathlib.Path(__file__).resolve().parents[1]
COMPAT = ROOT / "tests" / "fixtures" / "compat"
COLOURS = {"adipose": ((246, 228, 214), (236, 205, 190)), "lymphocytes": ((96, 62, 160), (42, 22, 104)),
           "stroma": ((236, 128, 176), (206, 84, 146))}
GALLERY_MPP = 1.0  # 64 px patches (the index's tiling) of 128 level-0 px at 0.5 um/px


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
  """(index folder, model workdir, slide folder, slides made, the add summary)."""
  root = tmp_path_factory.mktemp("slide_search")
  shutil.copytree(COMPAT / "workdir", root / "workdir")
  made = slide_fixtures.coloured_slides(root / "slides", COLOURS, per_class=2, cases_per_class=1)
  index = str(root / "workdir" / "index")
  summary = index_cli.run_add_slides(index, [str(root / "slides")], slides_csv=str(root / "slides" / "slides.csv"),
                                     gallery_mpp=GALLERY_MPP, workdir=str(root / "workdir"))
  return index, str(root / "workdir"), root / "slides", made, summary


@pytest.fixture(scope="module")
def engine(gallery):
  index, workdir, *_ = gallery
  return query.QueryEngine.open(index, workdir)


def _ask(engine, path, **options):
  cut = slide_query.slide_cut(engine, options.pop("gallery_mpp", None), options.pop("mosaic_fraction", None))
  return slide_query.answer_slide(engine, path, 5, cut, **options)


def test_index_add_slides_writes_slide_rows_and_where_the_files_are(gallery, engine):
  index, _, folder, made, summary = gallery
  rows = indexing.load_rows(index)
  mine = indexing.slide_mask(rows)
  assert summary["slides"] == 6 and summary["rows_added"] == mine.sum() == len(rows["label"]) - 48
  assert not mine[:48].any()  # the photos' rows stay photos
  assert set(rows["source_id"][mine]) == {s.slide_id for s in made}
  by_id = {s.slide_id: s for s in made}
  for row in np.flatnonzero(mine):
    s = by_id[str(rows["source_id"][row])]
    assert rows["case_id"][row] == s.case_id and engine.class_names[rows["label"][row]] == s.label
    x, y, w, h = rows["region"][row]
    assert w == h == 128 and (rows["coords"][row] == (y, x)).all()  # 64 px at 1 um/px of a 0.5 um/px slide
    bx, by, bw, bh = s.boxes[0]
    assert bx - w <= x <= bx + bw and by - h <= y <= by + bh  # on the tissue, not the glass
  record = indexing.read_manifest(index)["slides"]
  assert record["root"] == str(folder) and record["files"]["stroma_1"] == "stroma/stroma_1.tif"
  assert record["mpp"] == GALLERY_MPP and record["mosaic"]["method"] == "colour_kmeans_then_spatial_kmeans"
  assert indexing.read_manifest(index)["growth"]["log"][-1]["slide_cut"]["patch_px"] == 64


def test_a_twin_slide_is_the_top_answer_with_the_querys_own_regions(gallery, engine, tmp_path):
  _, _, folder, *_ = gallery
  twin = tmp_path / "twin_of_lymphocytes_0.tif"
  shutil.copy(folder / "lymphocytes" / "lymphocytes_0.tif", twin)
  answer = _ask(engine, twin)
  top = answer["slides"][0]
  assert answer["kind"] == "slide" and answer["slide_id"] == "twin_of_lymphocytes_0" and answer["case_id"] is None
  assert top["slide_id"] == "lymphocytes_0" and top["score"] > 0.9999 and top["label"] == "lymphocytes"
  assert top["case_id"] == "lymphocytes_case0" and answer["excluded"]["gallery_rows"] == 0
  assert answer["slides"][1]["score"] < top["score"]
  query_boxes = {(t["x"], t["y"], t["width"], t["height"]) for t in answer["tiles"]}
  found = {(r["x"], r["y"], r["width"], r["height"]) for r in top["regions"]}
  assert found == query_boxes and all(r["score"] > 0.9999 for r in top["regions"])
  assert answer["vote"]["label"] == "lymphocytes"
  assert answer["sources"] and not {s["source_id"] for s in answer["sources"]} & {s["slide_id"] for s in answer["slides"]}
  json.dumps(answer)  # JSON-ready as `search --json` prints it
  assert "lymphocytes_0" in search.format_slide_answer(answer)


def test_no_slide_answers_itself_and_optionally_not_its_case(gallery, engine):
  _, _, folder, *_ = gallery
  own = _ask(engine, folder / "lymphocytes" / "lymphocytes_0.tif")
  ids = lambda a: [s["slide_id"] for s in a["slides"]] + [r["source_id"] for t in a["tiles"] for r in t["results"]]
  rows = indexing.load_rows(gallery[0])
  assert own["excluded"] == {"slide": "lymphocytes_0", "case": None,
                             "gallery_rows": int((rows["source_id"] == "lymphocytes_0").sum())}
  assert "lymphocytes_0" not in ids(own) and own["case_id"] == "lymphocytes_case0"  # the gallery's record
  assert own["slides"][0]["slide_id"] == "lymphocytes_1"  # its case's other slide is the nearest
  assert all(len(t["results"]) == 5 for t in own["tiles"])  # k survive the exclusion
  case = _ask(engine, folder / "lymphocytes" / "lymphocytes_0.tif", exclude_case=True)
  assert case["excluded"]["case"] == "lymphocytes_case0"
  assert not {"lymphocytes_0", "lymphocytes_1"} & set(ids(case))
  # The case may also come from the caller (a slide table), for a query slide the gallery does not hold.
  other = _ask(engine, folder / "stroma" / "stroma_0.tif", exclude_case=True, case_id="lymphocytes_case0")
  assert "stroma_0" not in ids(other) and not {"lymphocytes_0", "lymphocytes_1"} & set(ids(other))


def test_a_photo_query_gets_top_slides_beside_its_patches_and_photos(gallery, engine, tmp_path):
  _, _, folder, made, _ = gallery
  with slides.open_slide(folder / "stroma" / "stroma_1.tif") as slide:  # a region of a gallery slide, as a photo
    x, y, w, h = made[-1].boxes[0]
    crop = slide.read_region((x, y), (256, 256), slide.mpp[0] * 2)  # at the gallery's 1 um/px
  PIL.Image.fromarray(crop).save(tmp_path / "region.png")
  found = []
  assert search.run(gallery[0], [str(tmp_path / "region.png")], 5, found.append, workdir=gallery[1]) == 0
  answer = found[0]
  assert answer["slides"][0]["label"] == "stroma" and answer["slides"][0]["regions"]
  assert {s["source_id"] for s in answer["sources"]}.isdisjoint({s.slide_id for s in made})  # photos only
  slide_results = [r for t in answer["tiles"] for r in t["results"] if "region" in r]
  assert slide_results and all(len(r["region"]) == 4 and r["case_id"] for r in slide_results)
  assert "most similar slides" in search.format_answer(answer)


def test_an_index_without_gallery_mpp_refuses_slides_unless_told(gallery, tmp_path):
  bare = tmp_path / "workdir"
  shutil.copytree(COMPAT / "workdir", bare)  # the compat index: built before gallery_mpp existed
  engine = query.QueryEngine.open(bare / "index", str(bare))
  with pytest.raises(slide_query.NoGalleryMppError, match="--gallery_mpp"):
    slide_query.slide_cut(engine)
  with pytest.raises(slide_query.NoGalleryMppError):
    index_cli.run_add_slides(str(bare / "index"), [str(gallery[2] / "adipose")], label="adipose", workdir=str(bare))
  assert indexing.read_manifest(bare / "index")["count"] == 48  # nothing written
  cut = slide_query.slide_cut(engine, gallery_mpp=2.0)
  assert (cut.mpp, cut.patch_px, cut.image_size) == (2.0, 64, 48)
  # The grown gallery answers without the flag: its slides were added at a recorded mpp.
  grown = query.QueryEngine.open(gallery[0], gallery[1])
  assert slide_query.slide_cut(grown).mpp == GALLERY_MPP


def test_mpp_stands_in_for_a_slide_without_resolution_and_a_full_mosaic_searches_every_patch(gallery, engine,
                                                                                             tmp_path):
  _, _, folder, made, _ = gallery
  with slides.open_slide(made[0].path) as slide:
    pixels = slide.read_level(0, (0, 0), slide.dimensions)
  slide_fixtures.write_pyramid(tmp_path / "untagged.tif", pixels, None)  # no resolution anywhere
  with pytest.raises(slides.NoResolutionError, match="untagged.tif"):
    _ask(engine, tmp_path / "untagged.tif")
  told = _ask(engine, tmp_path / "untagged.tif", mpp=0.5)
  assert told["mpp_source"] == "override" and told["slides"][0]["slide_id"] == made[0].slide_id
  every = _ask(engine, folder / "stroma" / "stroma_0.tif", mosaic_fraction=1.0)
  assert every["patches_searched"] == every["patches_in_grid"] and every["cut"]["mosaic"] == {"method": "all_patches"}


def test_bad_slides_are_answered_with_an_error_each_and_status_1(gallery, tmp_path):
  index, workdir, folder, *_ = gallery
  (tmp_path / "q").mkdir()
  (tmp_path / "q" / "notes.tif").write_text("not a slide")  # a .tif that is no slide
  PIL.Image.new("RGB", (300, 200), (240, 240, 237)).save(tmp_path / "q" / "photo.tif")  # a plain photo
  shutil.copy(folder / "adipose" / "adipose_0.tif", tmp_path / "q" / "good.tif")
  found = []
  status = search.run_slides(index, [str(tmp_path / "q")], 3, found.append, workdir=workdir)
  by_name = {pathlib.Path(a["query"]).name: a for a in found}
  assert status == 1 and set(by_name) == {"good.tif", "notes.tif", "photo.tif"}
  assert "slides" in by_name["good.tif"] and by_name["good.tif"]["slides"]
  assert "not a whole-slide image" in by_name["notes.tif"]["error"]
  assert "leave out --slides" in by_name["photo.tif"]["error"]  # a photo: says how to search it as one


def test_index_add_slides_refuses_bad_input_and_writes_nothing(gallery, tmp_path):
  index, workdir, folder, *_ = gallery
  before = indexing.read_manifest(index)["count"]
  with pytest.raises(ValueError, match="already in the index"):
    index_cli.run_add_slides(index, [str(folder / "adipose")], workdir=workdir)
  table = tmp_path / "slides.csv"
  table.write_text("slide_id,case_id,label\nadipose_0,c,adipose\n")
  with pytest.raises(ValueError, match="adipose_1.*not listed"):
    curator.labelled_slides([str(folder / "adipose")], ["adipose"], str(table))
  with pytest.raises(ValueError, match="names class 'nerve'"):
    curator.labelled_slides([str(folder / "adipose")], ["adipose"], label="nerve")
  table.write_text("slide_id,label\nadipose_0,adipose\n")
  with pytest.raises(slides.SlideTableError, match="case_id"):
    curator.labelled_slides([str(folder / "adipose")], ["adipose"], str(table))
  assert indexing.read_manifest(index)["count"] == before


def test_removing_a_slide_forgets_its_file(gallery, tmp_path):
  index, *_ = gallery
  copy = tmp_path / "index"
  shutil.copytree(index, copy)
  curator.remove(str(copy), ["adipose_1"])
  record = indexing.read_manifest(copy)["slides"]
  assert "adipose_1" not in record["files"] and "adipose_0" in record["files"]
  assert "adipose_1" not in set(indexing.load_rows(copy)["source_id"])


def test_a_photo_index_grown_by_photos_writes_no_slide_fields(tmp_path):
  rows = {"label": np.arange(3), "source_id": np.array(["a", "b", "c"]), "coords": np.zeros((3, 2), np.int32)}
  assert set(indexing.store.stored_rows(indexing.with_slide_fields(rows))) == set(rows)
  with_one = indexing.with_slide_fields(rows)
  with_one["region"][1] = (0, 0, 10, 10)
  assert "region" in indexing.store.stored_rows(with_one)
  with pytest.raises(ValueError, match="do not fit"):
    indexing.with_slide_fields({**rows, "region": np.zeros((2, 4))})


def _cli(module: str, *args) -> subprocess.CompletedProcess:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}  # one device: the index travels
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=300)


def test_search_slides_on_the_command_line_prints_one_json_answer_per_slide(gallery, tmp_path):
  index, workdir, folder, *_ = gallery
  (tmp_path / "q").mkdir()
  shutil.copy(folder / "stroma" / "stroma_1.tif", tmp_path / "q" / "again.tif")
  (tmp_path / "q" / "broken.svs").write_bytes(b"II*\x00" + b"\x00" * 64)  # a TIFF header and nothing more
  done = _cli("histojax.search", "--index", index, "--workdir", workdir, "--slides", str(tmp_path / "q"), "--k", "3",
              "--json")
  assert done.returncode == 1, done.stderr[-2000:]  # the broken slide
  answers = {pathlib.Path(a["query"]).name: a for a in map(json.loads, done.stdout.splitlines())}
  assert set(answers) == {"again.tif", "broken.svs"} and "broken.svs" in answers["broken.svs"]["error"]
  top = answers["again.tif"]["slides"][0]
  assert set(top) >= {"rank", "slide_id", "case_id", "label", "score", "regions"} and top["slide_id"] == "stroma_1"
  assert set(top["regions"][0]) >= {"x", "y", "width", "height", "score"} and top["score"] > 0.9999
  bare = tmp_path / "bare"
  shutil.copytree(COMPAT / "workdir", bare)
  refused = _cli("histojax.search", "--index", str(bare / "index"), "--slides", str(tmp_path / "q" / "again.tif"))
  assert refused.returncode == 2 and "no gallery_mpp" in refused.stderr and refused.stdout == ""
  wrong = _cli("histojax.index", "add", "--index", str(bare / "index"), "--slides", str(folder), "--label", "nerve")
  assert wrong.returncode == 2 and "names class 'nerve'" in wrong.stderr


def test_mpp_sets_a_photo_querys_resize_to_the_gallerys_magnification():
  index = str(COMPAT / "workdir" / "index")  # records no gallery_mpp
  with pytest.raises(slide_query.NoGalleryMppError, match="--gallery_mpp"):
    search.images_resize(index, 0.42, None, None)
  assert search.images_resize(index, 0.42, None, 1.68) == pytest.approx(0.25)  # BACH photos to bach/x5_64
  with pytest.raises(ValueError, match="not both"):
    search.images_resize(index, 0.42, 0.5, 1.68)
