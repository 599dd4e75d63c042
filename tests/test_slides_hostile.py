"""Hostile slides: each refused with a named error, in bounded memory, with nothing written.

The files are made here, in a temporary folder, once per session: the 50,000 x
50,000 glass slide (7.5 GB as RGB) from one repeated JPEG tile under a file-size
limit (`ulimit -f`), the others from a small synthetic pyramid. Memory is proved
by reading every one of them in a subprocess under RLIMIT_AS, where decoding a
single full level of the glass slide fails (the control).
"""

from __future__ import annotations

import json
import pathlib
import resource
import shutil
import subprocess
import sys
import textwrap

import pytest
import tifffile

from histojax import slides
from tests import hostile_slides, slide_fixtures

ROOT = pathlib.Path(__file__).parents[1]
ADDRESS_SPACE = 1 << 30  # 1 GiB for the reader's whole process; the glass slide is 7.5 GB as RGB
EXPECTED = {
    "glass_50k.tif": slides.NoTissueError,
    "truncated.tif": slides.TruncatedSlideError,
    "truncated_early.tif": slides.TruncatedSlideError,
    "declares_1m_x_1m.tif": slides.SlideTooLargeError,
    "no_resolution.tif": slides.NoResolutionError,
    "72dpi.tif": slides.NoResolutionError,
    "damaged_tiles.tif": slides.DamagedSlideError,
    "text.svs": slides.NotASlideError,
    "random.tif": slides.NotASlideError,
    "photo.tif": slides.NotASlideError,
    "empty.tif": slides.NotASlideError,
    "not_dicom": slides.NotASlideError,
    "fake_dicom": slides.NotASlideError,
}


@pytest.fixture(scope="session")
def hostile(tmp_path_factory) -> pathlib.Path:
  folder = tmp_path_factory.mktemp("hostile_slides")
  hostile_slides.write_limited("glass", folder / "glass_50k.tif", 128 << 20)
  good = folder.parent / "good.tif"
  image = slide_fixtures.tissue_image(1024, 768, boxes=[(64, 64, 896, 640)])
  slide_fixtures.write_pyramid(good, image, 0.5)
  hostile_slides.truncated_copy(good, folder / "truncated.tif", 0.6)
  hostile_slides.truncated_copy(good, folder / "truncated_early.tif", 0.02)
  shutil.copy(good, folder / "declares_1m_x_1m.tif")
  with tifffile.TiffFile(folder / "declares_1m_x_1m.tif", mode="r+") as tif:
    tif.pages.first.tags["ImageWidth"].overwrite(1_000_000)
    tif.pages.first.tags["ImageLength"].overwrite(1_000_000)
  hostile_slides.no_resolution_slide(folder / "no_resolution.tif")
  tifffile.imwrite(folder / "72dpi.tif", image, tile=(256, 256), compression="jpeg", photometric="rgb",
                   resolution=(72, 72), resolutionunit="INCH", metadata=None)  # an image editor's default
  hostile_slides.damaged_copy(good, folder / "damaged_tiles.tif")
  (folder / "text.svs").write_text("Aperio Image Library, honestly\n")
  (folder / "random.tif").write_bytes(b"II*\x00" + bytes(range(256)) * 20)
  hostile_slides.stripped_photo_tiff(folder / "photo.tif")
  (folder / "empty.tif").write_bytes(b"")
  (folder / "not_dicom").mkdir()
  (folder / "not_dicom" / "readme.txt").write_text("no slide here")
  (folder / "fake_dicom").mkdir()
  (folder / "fake_dicom" / "level0.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"\x00" * 64)
  return folder


def _snapshot(folder: pathlib.Path) -> dict:
  return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def test_the_glass_slide_is_valid_and_made_of_repeated_tiles(hostile):
  path = hostile / "glass_50k.tif"
  assert 50e6 < path.stat().st_size < 100e6  # ~70 MB on disk for 7.5 GB of RGB
  with slides.open_slide(path) as slide:
    assert slide.dimensions == (50_000, 50_000) and slide.mpp == (0.5, 0.5)
    assert slide.level_dimensions[-1] == (782, 782)
    assert slide.read_region((25_000, 25_000), (64, 64), 0.5).min() > 200  # real pixels: glass


def test_the_file_size_limit_stops_a_runaway_fixture(tmp_path):
  with pytest.raises(subprocess.CalledProcessError):
    hostile_slides.write_limited("glass", tmp_path / "too_big.tif", 8 << 20)
  assert (tmp_path / "too_big.tif").stat().st_size <= 8 << 20


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_hostile_slide_is_refused_with_its_named_error(hostile, name):
  before = _snapshot(hostile)
  with pytest.raises(EXPECTED[name], match=name):
    with slides.open_slide(hostile / name) as slide:
      slides.tissue_mask(slide)
  assert _snapshot(hostile) == before  # nothing written, nothing touched


def test_refusals_say_what_to_do(hostile):
  with pytest.raises(slides.NotASlideError, match="plain TIFF image of 640 x 480.*leave out --slides"):
    slides.open_slide(hostile / "photo.tif")
  with pytest.raises(slides.NoResolutionError, match="ResolutionUnit is none.*--mpp"):
    slides.open_slide(hostile / "no_resolution.tif")
  with pytest.raises(slides.NoResolutionError, match="352.8 um/px"):
    slides.open_slide(hostile / "72dpi.tif")
  with pytest.raises(slides.TruncatedSlideError, match="declare data up to byte"):
    slides.open_slide(hostile / "truncated.tif")
  with slides.open_slide(hostile / "no_resolution.tif", mpp=0.5) as slide:  # the override opens it
    assert slide.mpp == (0.5, 0.5) and slide.mpp_source == "override"
    assert slides.tissue_mask(slide).fraction > 0.5


def test_limits_are_checked_before_opening(hostile):
  with pytest.raises(slides.SlideTooLargeError, match="over the limit of 10,000 px"):
    slides.open_slide(hostile / "glass_50k.tif", limits=slides.SlideLimits(max_side=10_000))
  with pytest.raises(slides.SlideTooLargeError, match="pyramid levels"):
    slides.open_slide(hostile / "glass_50k.tif", limits=slides.SlideLimits(max_levels=3))


_READER = textwrap.dedent("""
    import json, resource, sys
    resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
    from histojax import slides
    folder, names, result = sys.argv[1], sys.argv[2:], {{}}
    for name in names:
      try:
        with slides.open_slide(f"{{folder}}/{{name}}") as slide:
          slides.tissue_mask(slide)
        result[name] = "accepted"
      except slides.SlideError as e:
        result[name] = type(e).__name__
    slide = slides.open_slide(f"{{folder}}/glass_50k.tif")
    try:  # the control: a reader that decoded level 0, or even 16k x 16k of it (1 GiB as RGBA), would not fit
      slide.read_level(0, (0, 0), (16_384, 16_384))
      result["control"] = "fitted"
    except MemoryError:
      result["control"] = "MemoryError"
    # The peak of this process's own memory map. Not ru_maxrss: Linux keeps that across exec, so it
    # would report the forking parent's size (a pytest session of several GB).
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
    result["maxrss_mb"] = int(hwm.split()[1]) / 1024
    print(json.dumps(result))
""")


def test_every_hostile_slide_is_refused_under_a_1_gib_address_space(hostile):
  before = _snapshot(hostile)
  script = _READER.format(limit=ADDRESS_SPACE)
  run = subprocess.run([sys.executable, "-c", script, str(hostile), *sorted(EXPECTED)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, check=False)
  assert run.returncode == 0, run.stderr[-2000:]
  result = json.loads(run.stdout.strip().splitlines()[-1])
  assert {name: result[name] for name in EXPECTED} == {name: error.__name__ for name, error in EXPECTED.items()}
  assert result["control"] == "MemoryError"
  assert result["maxrss_mb"] < ADDRESS_SPACE / 2**20
  assert _snapshot(hostile) == before
  assert resource.getrlimit(resource.RLIMIT_AS)[0] != ADDRESS_SPACE  # the limit stayed in the subprocess
