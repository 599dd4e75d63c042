"""slides.find_slides: one entry per slide, however many files a format spreads it over."""

from __future__ import annotations

import pytest

from histojax import slides


def _touch(root, *names):
  for name in names:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")


def test_a_folder_walk_knows_multi_file_formats(tmp_path):
  _touch(tmp_path,
         "Benign/a.svs", "Benign/b.tif", "Benign/notes.txt", "Benign/b_thumbnail.jpg", "Benign/.hidden.tif",
         "Normal/m.mrxs", "Normal/m/Slidedat.ini", *(f"Normal/m/Data{i:04d}.dat" for i in range(5)),
         "Normal/orphan/Slidedat.ini", "Normal/orphan/Data0000.dat",  # a MIRAX data folder whose .mrxs moved
         *(f"Invasive/case7/level{i}.dcm" for i in range(4)), "Invasive/case7/README.txt",
         "Invasive/scan.NDPI", "Invasive/v.vms", "Invasive/v_0001.jpg", "slides.csv")
  walk = slides.find_slides(tmp_path)
  assert [p.relative_to(tmp_path).as_posix() for p in walk.slides] == [
      "Benign/a.svs", "Benign/b.tif", "Invasive/case7", "Invasive/scan.NDPI", "Invasive/v.vms", "Normal/m.mrxs"]
  assert [p.relative_to(tmp_path).as_posix() for p in walk.skipped] == [
      "Benign/b_thumbnail.jpg", "Benign/notes.txt", "Invasive/case7/README.txt", "Invasive/v_0001.jpg", "slides.csv"]
  assert slides.slide_paths(tmp_path) == walk.slides
  assert [slides.slide_id(p) for p in walk.slides] == ["a", "b", "case7", "scan", "v", "m"]


def test_a_file_given_directly_is_a_slide_whatever_its_suffix(tmp_path):
  _touch(tmp_path, "photo_or_slide.jpg")
  assert slides.slide_paths(tmp_path / "photo_or_slide.jpg") == [tmp_path / "photo_or_slide.jpg"]


def test_a_dicom_folder_given_directly_is_one_slide(tmp_path):
  _touch(tmp_path, "s/1.dcm", "s/2.dcm")
  assert slides.slide_paths(tmp_path / "s") == [tmp_path / "s"]


def test_a_missing_folder_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    slides.find_slides(tmp_path / "nowhere")
