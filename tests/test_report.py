"""Report figures: frames say correct / incorrect, grid picks every class, HTML shows both."""

import numpy as np
import PIL.Image

from histojax import report


def test_grid_frames_results_by_label(tmp_path):
  grey = np.full((16, 16, 3), 128, np.uint8)
  rows = [report.GridRow(grey, 1, "img_a", [(grey, 1, 0.9), (grey, 0, 0.8), None])]
  report.retrieval_grid_png(rows, ["a", "b"], tmp_path / "grid.png", thumb=40)
  with PIL.Image.open(tmp_path / "grid.png") as im:
    pixels = np.asarray(im.convert("RGB"))
  # Layout: header 46 px, query column 10 + 40 + 8 + 16 px wide, result cells 40 + 8 + 10 px.
  y, left, cell = 46 + 1, 40 + 2 * 4 + 16, 40 + 2 * 4 + 10
  assert tuple(pixels[y, 10 + 1]) == report.QUERY
  assert tuple(pixels[y, left + 1]) == report.CORRECT  # label 1 == query's
  assert tuple(pixels[y, left + cell + 1]) == report.WRONG  # label 0
  assert tuple(pixels[y + 20, left + 2 * cell + 20]) == report.PAPER  # no result: no frame


def test_pick_grid_queries_covers_every_class_first():
  labels = np.array([0] * 10 + [1] * 2 + [2] * 1)
  rows = report.pick_grid_queries(labels, 4, seed=0)
  assert sorted(set(labels[rows])) == [0, 1, 2] and len(rows) == 4
  assert list(labels[rows]) == sorted(labels[rows])
  assert len(report.pick_grid_queries(labels, 100)) == 13  # never more than there are


def test_confusion_png_and_html(tmp_path):
  matrix = np.array([[5, 1, 0], [0, 3, 2]])  # last column: no result
  results = {"precision@1": 0.5, "macro/precision@1": 0.4, "eta_total@1": 0.2, "step": 7,
             "pair_c_index": 0.9, "per_class": {"tumour": {"precision@1": 0.5}, "stroma": {"precision@1": None}}}
  paths = report.write_report(tmp_path, results, ["tumour", "stroma"], [("patches", matrix)],
                              [report.GridRow(np.zeros((8, 8, 3), np.uint8), 0, "s", [None])])
  with PIL.Image.open(paths["confusion"]) as im:
    assert im.width > 100
  page = (tmp_path / "index.html").read_text()
  assert "<img src='confusion.png'" in page and "<img src='retrieval_grid.png'" in page
  assert "0.4000" in page and "pair_c_index: 0.9000" in page and "–" in page  # None shown as a dash
  assert not list(tmp_path.glob(".*partial"))
