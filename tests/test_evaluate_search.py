"""evaluate + search end to end on one tiny trained workdir (trained once for the module)."""

import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from histojax import evaluate, export, indexing, pairs, query, search, train
from histojax.data import augment
from tests.conftest import tiny_config
from tfds_builders.synthetic_tissue import painter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data_dir):
  config = tiny_config(tiny_data_dir)
  workdir = tmp_path_factory.mktemp("evalsearch")
  results = train.train_and_evaluate(config, workdir)
  return config, workdir, results


def test_evaluate_writes_metrics_and_report(trained):
  _, workdir, results = trained
  written = json.loads((workdir / "eval" / "metrics.json").read_text())
  assert written == results
  for key in ("precision@5", "accuracy@10", "map@10", "majority_vote@5", "macro/precision@5",
              "image_majority_vote@5", "image_weighted_vote@5", "image_centroid_vote@5", "eta_p@1", "eta_w@1",
              "eta_total@1", "pair_c_index", "pair_concordance"):
    assert 0.0 <= written[key] <= 1.0, key
  assert written["eta_total@1"] == pytest.approx(written["eta_p@1"] * written["eta_w@1"])
  for k in (1, 3, 5, 10):  # THUNDER's k-NN figures
    for name in ("accuracy", "balanced_accuracy", "macro_f1"):
      assert 0.0 <= written[f"thunder/{name}@{k}"] <= 1.0
  # The gallery's spread, as its export recorded it, and how the top-k scores read.
  spread = json.loads((workdir / "export" / "train" / "manifest.json").read_text())["spread"]
  assert written["health"]["gallery"] == spread and spread["rows"] == 48 and spread["dim"] == 32
  assert 0.0 <= spread["mean_norm"] <= 1.0 and 1.0 <= spread["effective_dim"] <= 32
  assert written["health"]["scores"]["results"] == 48 * 10 and written["health"]["k"] == 10
  assert written["num_query_images"] == 12 and written["num_pairs"] == 96  # 48 queries x (same + other)
  assert sorted(written["per_class"]) == sorted(painter.CLASS_NAMES)
  with PIL.Image.open(workdir / "eval" / "retrieval_grid.png") as grid:
    assert grid.height > 12 * 80 and grid.width > 10 * 80  # 12 queries down, 10 results across
  with PIL.Image.open(workdir / "eval" / "confusion.png") as confusion:
    assert confusion.width > confusion.height  # two panels side by side
  page = (workdir / "eval" / "index.html").read_text()
  assert "confusion.png" in page and "retrieval_grid.png" in page and "eta_total" in page
  assert "Embedding health" in page and "norm of mean" in page
  manifest = json.loads((workdir / "index" / "manifest.json").read_text())
  assert manifest["checkpoint"] == {"workdir": str(workdir.absolute()), "step": 4,
                                    "fingerprint": manifest["fingerprint"]}
  assert manifest["count"] == 48 and manifest["dim"] == 32 and manifest["split"] == "train"
  assert manifest["normalization"]["embedding"] == "l2" and manifest["class_names"][3] == "tumour"
  assert manifest["spread"] == spread  # carried from the export into the index manifest
  rows = indexing.load_rows(workdir / "index")
  assert len(rows["label"]) == 48 and rows["coords"].shape == (48, 2)
  assert all(str(s).startswith(painter.CLASS_NAMES[c]) for s, c in zip(rows["source_id"], rows["label"]))


def test_evaluate_cli_again_reuses_export_and_index(trained):
  config, workdir, results = trained
  stamps = {p: (workdir / p).stat().st_mtime_ns for p in ("index/manifest.json", "export/train/manifest.json")}
  done = subprocess.run([sys.executable, "-m", "histojax.evaluate", "--workdir", str(workdir)], cwd=ROOT,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "reusing the index" in done.stdout and "eta_total" in done.stdout
  assert json.loads((workdir / "eval" / "metrics.json").read_text()) == results
  assert stamps == {p: (workdir / p).stat().st_mtime_ns for p in stamps}
  # A changed index knob builds a new index (exact search: the same neighbours here).
  config = tiny_config(config.dataset.data_dir)
  config.eval.index.mode = "exact"
  exact = evaluate.evaluate(config, workdir)
  assert exact["index_mode"] == "exact" and exact["precision@10"] == pytest.approx(results["precision@10"])
  assert indexing.read_manifest(workdir / "index")["mode"] == "exact"


def _painted_gallery_image(tmp_path, label=3, seed=0):
  """A whole source image of the tiny train split, painted exactly as the builder paints it."""
  path = tmp_path / f"{painter.CLASS_NAMES[label]}_{seed:03d}.png"
  PIL.Image.fromarray(painter.paint_tissue(label, seed, 128)).save(path)
  return path


def test_cut_tiles_like_the_builder(tmp_path):
  image = painter.paint_tissue(3, 0, 128)
  cfg = query.tiling_record({"tiling": {"patch_size": 64, "stride": 64, "min_tissue_fraction": 0.0}}, 48)
  patches = query.cut(image, cfg, 48)
  assert patches.coords == [(0, 0), (0, 64), (64, 0), (64, 64)] and patches.dropped == 0
  np.testing.assert_array_equal(patches.images[1], augment.center_crop(image[0:64, 64:128], 48))
  single = query.cut(image[:60, :70], cfg, 48)  # smaller than one tile: one patch, centre-cropped
  assert single.coords == [(0, 0)] and single.images.shape == (1, 48, 48, 3)
  with pytest.raises(ValueError, match="smaller than the model input 48x48"):
    query.cut(image[:40, :100], cfg, 48)
  # No tiling in the manifest: tiles of the model input size.
  assert query.tiling_record({}, 48)["patch_size"] == 48


def test_search_cli_prints_one_json_object_per_query(trained, tmp_path):
  _, workdir, _ = trained
  folder = tmp_path / "queries"
  folder.mkdir()
  big = _painted_gallery_image(folder)
  (folder / "notes.txt").write_text("not an image, not picked up from a folder")
  broken = tmp_path / "broken.png"
  broken.write_bytes(b"not a png")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}  # one device: the index travels
  done = subprocess.run([sys.executable, "-m", "histojax.search", "--index", str(workdir / "index"),
                         "--images", str(folder), str(broken), "--k", "5", "--json"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 1, done.stderr[-2000:]  # the broken file
  answers = [json.loads(line) for line in done.stdout.splitlines()]
  assert [a["query"] for a in answers] == [str(big), str(broken)]
  assert answers[1]["error"].startswith(f"{broken}: not a readable image")  # the decoder names the file
  whole = answers[0]
  assert whole["tiles_searched"] == 4 and whole["tiles_dropped"] == 0
  assert whole["vote"]["label"] == "tumour" and sum(whole["vote"]["votes"].values()) == 20
  for tile in whole["tiles"]:
    top = tile["results"][0]
    # Each tile is a gallery patch: found first, as itself, at its builder coordinates.
    assert (top["source_id"], top["coords"]) == ("tumour_000", [tile["y"], tile["x"]])
    assert top["score"] == pytest.approx(1.0, abs=1e-4) and top["label"] == "tumour"
    assert len(tile["results"]) == 5 and [r["rank"] for r in tile["results"]] == [1, 2, 3, 4, 5]
  # Whole-image answer: the photo itself first, every tile matching it at similarity 1.
  first = whole["sources"][0]
  assert (first["source_id"], first["label"], first["tiles_matched"]) == ("tumour_000", "tumour", 4)
  assert first["score"] == pytest.approx(1.0, abs=1e-4) and [s["rank"] for s in whole["sources"]] == \
      list(range(1, len(whole["sources"]) + 1)) and 1 < len(whole["sources"]) <= 5
  assert all(a["score"] >= b["score"] for a, b in zip(whole["sources"], whole["sources"][1:]))


def test_engine_answers_a_batch_as_each_alone_and_search_prints_sources(trained, tmp_path, capsys):
  _, workdir, _ = trained
  engine = query.QueryEngine.open(workdir / "index")
  assert engine.num_rows == 48 and engine.class_names[3] == "tumour" and engine.tiling["patch_size"] == 64
  images = [("a", painter.paint_tissue(3, 0, 128)), ("small", np.zeros((20, 20, 3), np.uint8)),
            ("b", painter.paint_tissue(1, 7, 192)), ("patch", painter.paint_tissue(2, 1, 64))]
  together = engine.answer_batch(images, 3)
  assert "smaller than the model input" in together[1]["error"] and together[1]["query"] == "small"
  assert [a["tiles_searched"] for a in together if "error" not in a] == [4, 9, 1]
  for (name, image), batched in zip(images, together):
    alone = engine.answer(name, image, 3)
    if "error" in alone:
      assert alone == batched
      continue
    assert [[r["gallery_row"] for r in t["results"]] for t in alone["tiles"]] == \
        [[r["gallery_row"] for r in t["results"]] for t in batched["tiles"]]
    np.testing.assert_allclose([r["score"] for t in alone["tiles"] for r in t["results"]],
                               [r["score"] for t in batched["tiles"] for r in t["results"]], atol=1e-5)
    assert [s["source_id"] for s in alone["sources"]] == [s["source_id"] for s in batched["sources"]]
  assert engine.reload_if_changed() is False
  path = tmp_path / "q.png"
  PIL.Image.fromarray(images[0][1]).save(path)
  assert search.run(str(workdir / "index"), [str(path)], k=3, emit=lambda r: print(search.format_answer(r))) == 0
  printed = capsys.readouterr().out
  assert "most similar source images" in printed and "tumour_000" in printed.split("tile (y, x)")[0]


def test_search_refuses_a_model_that_does_not_match_the_index(trained, tmp_path):
  _, workdir, _ = trained
  with pytest.raises(indexing.ManifestMismatch, match="step: index has 4, query has 2") as e:
    search.run(str(workdir / "index"), [str(_painted_gallery_image(tmp_path))], step=2)
  assert "fingerprint" in str(e.value)


def test_pairs_are_balanced_and_never_from_the_own_source_image():
  # One-hot embeddings per source image: similarity 1 exactly when a pair shares its source.
  sources = np.repeat(np.arange(8), 5)  # 8 images x 5 patches, classes 0..3 two images each
  labels = sources // 2
  gallery = export.Export(np.eye(8, dtype=np.float32)[sources], labels, sources.astype(str),
                          np.zeros((40, 2), np.int32), {})
  sim, same = pairs.sample_pairs(gallery, gallery, np.random.default_rng(0), same_split=True)
  assert len(sim) == 80 and same.sum() == 40  # every patch: one same-class, one other-class partner
  assert not np.any(sim == 1.0)  # never its own image (the only same-class image is the other one)
  out = pairs.pair_metrics(gallery, gallery)
  assert out["num_pairs"] == 80 and 0 <= out["pair_c_index"] <= 1
