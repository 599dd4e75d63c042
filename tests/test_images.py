"""The one image decoder: every mode to uint8 RGB, and a pixel limit checked before decoding."""

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from histojax.data import images
from tests import image_fixtures

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 10**6


def _encode(im: PIL.Image.Image, fmt: str, **kwargs) -> bytes:
  buf = io.BytesIO()
  im.save(buf, fmt, **kwargs)
  return buf.getvalue()


def _halves(h=12, w=16):
  """Left half red, right half blue."""
  a = np.zeros((h, w, 3), np.uint8)
  a[:, : w // 2] = (255, 0, 0)
  a[:, w // 2:] = (0, 0, 255)
  return a


def test_rgb_png_and_path_round_trip(tmp_path):
  a = _halves()
  path = tmp_path / "a.png"
  path.write_bytes(_encode(PIL.Image.fromarray(a), "PNG"))
  for source in (path, str(path), path.read_bytes()):
    out = images.read_image(source, max_pixels=LIMIT)
    assert out.dtype == np.uint8 and out.shape == (12, 16, 3)
    np.testing.assert_array_equal(out, a)


def test_greyscale_8_and_16_bit():
  grey = np.arange(12 * 16, dtype=np.uint8).reshape(12, 16)
  out = images.read_image(_encode(PIL.Image.fromarray(grey), "PNG"), max_pixels=LIMIT)
  assert out.shape == (12, 16, 3)
  np.testing.assert_array_equal(out[..., 0], grey)
  np.testing.assert_array_equal(out[..., 0], out[..., 2])
  # 12-bit camera data in a 16-bit container: scaled by the image maximum, not cut to its low byte.
  wide = (np.arange(12 * 16).reshape(12, 16) * 4095 // (12 * 16 - 1)).astype(np.uint16)
  for fmt in ("PNG", "TIFF"):
    data = _encode(PIL.Image.fromarray(wide), fmt)
    assert PIL.Image.open(io.BytesIO(data)).mode.startswith("I;16")
    out = images.read_image(data, max_pixels=LIMIT)
    assert out.dtype == np.uint8 and out.shape == (12, 16, 3)
    assert out.max() == 255 and out.min() == 0
    np.testing.assert_allclose(out[..., 0], wide / 4095 * 255, atol=1)


def test_16_bit_rgb_png():
  h, w = 4, 5
  samples = np.zeros((h, w, 3), ">u2")
  samples[..., 0] = 0xFFFF  # full red
  samples[..., 2] = 0x8000
  rows = b"".join(b"\x00" + samples[y].tobytes() for y in range(h))
  out = images.read_image(image_fixtures.png(w, h, rows, bit_depth=16), max_pixels=LIMIT)
  assert out.dtype == np.uint8 and out.shape == (h, w, 3)
  np.testing.assert_allclose(out[0, 0], (255, 0, 128), atol=1)


def test_transparency_is_white_glass():
  rgba = np.zeros((8, 8, 4), np.uint8)
  rgba[..., 0] = 200
  rgba[:, 4:, 3] = 255  # right half opaque red, left half fully transparent
  out = images.read_image(_encode(PIL.Image.fromarray(rgba, "RGBA"), "PNG"), max_pixels=LIMIT)
  np.testing.assert_array_equal(out[:, :4], 255)
  np.testing.assert_array_equal(out[:, 4:], np.broadcast_to([200, 0, 0], (8, 4, 3)))


def test_palette_with_transparent_index():
  pal = PIL.Image.fromarray(_halves()).quantize(2)
  index_of_red = int(np.asarray(pal)[0, 0])
  out = images.read_image(_encode(pal, "PNG", transparency=index_of_red), max_pixels=LIMIT)
  np.testing.assert_array_equal(out[:, :8], 255)  # the transparent colour is glass
  np.testing.assert_array_equal(out[:, 8:], np.broadcast_to([0, 0, 255], (12, 8, 3)))
  plain = images.read_image(_encode(pal, "GIF"), max_pixels=LIMIT)
  np.testing.assert_array_equal(plain, _halves())


def test_cmyk_jpeg_and_tiff():
  cmyk = PIL.Image.fromarray(_halves()).convert("CMYK")
  for fmt in ("JPEG", "TIFF"):
    out = images.read_image(_encode(cmyk, fmt), max_pixels=LIMIT)
    assert out.shape == (12, 16, 3)
    np.testing.assert_allclose(out[6, 2], (255, 0, 0), atol=12)
    np.testing.assert_allclose(out[6, 13], (0, 0, 255), atol=12)


def test_exif_orientation_applied():
  stored = PIL.Image.fromarray(_halves(10, 20))  # wide: red left, blue right
  exif = PIL.Image.Exif()
  exif[0x0112] = 6  # "rotate 90 clockwise to display"
  data = _encode(stored, "JPEG", exif=exif, quality=95)
  out = images.read_image(data, max_pixels=LIMIT)
  assert out.shape == (20, 10, 3)  # upright: tall
  np.testing.assert_allclose(out[2, 5], (255, 0, 0), atol=20)  # the left edge is now the top
  np.testing.assert_allclose(out[17, 5], (0, 0, 255), atol=20)
  assert images.probe(data).orientation == 6


@pytest.mark.parametrize("damage", ["empty", "text", "truncated", "bitflip_header", "missing"])
def test_unreadable_files_are_named(tmp_path, damage):
  good = _encode(PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)), "PNG")
  data = {"empty": b"", "text": b"hello, not an image\n" * 4, "truncated": good[: len(good) // 2],
          "bitflip_header": good[:16] + bytes([good[16] ^ 0xFF]) + good[17:], "missing": None}[damage]
  path = tmp_path / f"{damage}.png"
  if data is not None:
    path.write_bytes(data)
  with pytest.raises(images.ImageError, match=f"{damage}.png"):
    images.read_image(path, max_pixels=LIMIT)


def test_limit_is_per_call_and_global_untouched(monkeypatch):
  import tfds_builders.common  # noqa: F401  (used to lift Pillow's guard for everyone on import)
  assert PIL.Image.MAX_IMAGE_PIXELS == int(1024 * 1024 * 1024 // 4 // 3)
  data = _encode(PIL.Image.fromarray(_halves(100, 100)), "PNG")
  with pytest.raises(images.ImageTooLargeError, match="10,000 pixels is over the limit of 9,999.*--max_pixels"):
    images.read_image(data, max_pixels=9_999, name="q.png")
  monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 100)  # far below this image: ours alone decides
  assert images.read_image(data, max_pixels=10_000).shape == (100, 100, 3)


def test_png_bomb_refused_fast_in_little_memory(tmp_path):
  bomb = tmp_path / "bomb.png"
  bomb.write_bytes(image_fixtures.png_bomb())
  assert bomb.stat().st_size < 2_000_000
  script = textwrap.dedent(f"""
      import json, resource, sys, time
      from histojax.data import images
      start = time.perf_counter()
      try:
        images.read_image({str(bomb)!r}, max_pixels=images.DEFAULT_MAX_PIXELS[sys.argv[1]])
        outcome = "decoded"
      except images.ImageTooLargeError as e:
        outcome = str(e)
      seconds = time.perf_counter() - start
      # VmHWM: this process's own peak; ru_maxrss can also count the forking parent's pages.
      hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")]
      print(json.dumps({{"outcome": outcome, "seconds": seconds,
                        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                        "vm_hwm_mb": int(hwm[0].split()[1]) / 1024 if hwm else 0.0}}))
      """)
  for entry in ("search", "serve"):
    out = subprocess.run([sys.executable, "-c", script, entry], capture_output=True, text=True, timeout=120,
                         cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert "20000 x 20000 = 400,000,000 pixels is over the limit" in result["outcome"], result
    assert result["seconds"] < 2.0, result
    # VmHWM only: Linux keeps ru_maxrss across fork+exec, so under a large pytest parent
    # (2.8 GB in CI) it reports the parent's peak, not this process's.
    assert 0 < result["vm_hwm_mb"] < 1024, result
    print(entry, result)
