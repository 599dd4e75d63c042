"""python -m histojax.embed: the parity path, per image and per tile, on reduced-depth presets.

Weights are the parity fixtures' (tests/encoder_fixtures.py: full width, 2 blocks, from a seed),
written as a hub folder and converted by `convert --preset`, so embed's rows can be held to the
features timm / transformers computed for the same input (tests/fixtures/encoders/parity.npz).
"""

import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
from safetensors.numpy import save_file

from histojax import convert, embed, health
from histojax.data import augment, images, tiling
from histojax.models import presets
from tests import archive_fixtures as afx
from tests import encoder_fixtures as efx
from tests import published_keys as published

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARITY = np.load(os.path.join(ROOT, "tests", "fixtures", "encoders", "parity.npz"))
# Random weights on random pixels: rows are alike, and embed says so (the warning is tested below).
pytestmark = pytest.mark.filterwarnings("ignore::histojax.health.CollapsedEmbeddingWarning")


@pytest.fixture(scope="module")
def converted(converted_preset):
  """name -> the converted weights folder (conftest's `converted_preset`)."""
  return lambda name: converted_preset(name)[0]


def cosine(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def save_all(folder, arrays, suffix=".png"):
  os.makedirs(folder, exist_ok=True)
  paths = [os.path.join(folder, f"{i:02d}{suffix}") for i in range(len(arrays))]
  for path, array in zip(paths, arrays):
    PIL.Image.fromarray(array).save(path)
  return paths


# --- Parity: embed is the path the parity tests hold against the references -------------------

@pytest.mark.parametrize("name", ["kaiko_vits16", "hibou_b"])
def test_embed_reproduces_the_reference_features(converted, name, tmp_path):
  """Image files at the preset's input size go through embed's whole path (decode, card transform,
  device batches) and give the features timm / transformers computed for the same pixels."""
  native, _ = efx.images(presets.get(name))
  save_all(tmp_path / "images", native)
  record = embed.run(converted(name), [str(tmp_path / "images")], str(tmp_path / "f.npy"))
  features = np.load(tmp_path / "f.npy")
  assert features.dtype == np.float32 and features.shape == PARITY[f"{name}.native"].shape
  assert cosine(features, PARITY[f"{name}.native"]).min() >= 0.99999
  assert record["preset"] == name and record["feature"] == presets.get(name).feature and record["dtype"] == "float32"


def test_bfloat16_compute_writes_float32_close_to_the_reference(converted, tmp_path):
  native, _ = efx.images(presets.get("kaiko_vits16"))
  save_all(tmp_path / "images", native)
  embed.run(converted("kaiko_vits16"), [str(tmp_path / "images")], str(tmp_path / "f.npy"), dtype="bfloat16")
  features = np.load(tmp_path / "f.npy")
  assert features.dtype == np.float32
  got = cosine(features, PARITY["kaiko_vits16.native"])
  assert got.min() >= 0.999 and got.min() < 1.0 - 1e-9  # close, and computed in bf16 indeed


def test_a_folder_of_another_format_embeds_its_backbone_features(tmp_path):
  """A converted torchvision ResNet (no preset): global-average-pooled features in eval mode,
  images resized bicubic on the short side and centre-cropped to 224 (timm's default)."""
  rng = np.random.default_rng(0)
  tensors = {k: rng.standard_normal(s).astype(np.float32) if s else np.asarray(1, np.int64)
             for k, s in published.torchvision_resnet(18, base=8, classes=10).items()}
  tensors.update({k: np.abs(v) + 0.5 for k, v in tensors.items() if k.endswith("running_var")})
  save_file(tensors, str(tmp_path / "r18.safetensors"))
  convert.convert("torchvision_resnet", str(tmp_path / "r18.safetensors"), str(tmp_path / "r18"))
  paths = save_all(tmp_path / "images", [afx.tissue(224, 224, seed=1), afx.tissue(300, 400, seed=2)])
  record = embed.run(str(tmp_path / "r18"), paths, str(tmp_path / "f.npy"))
  features = np.load(tmp_path / "f.npy")
  assert features.shape == (2, 64) and np.isfinite(features).all() and record["preset"] is None
  assert record["input"] == {"size": 224, "resize": 224, "interpolation": "bicubic", "crop": "center"}
  # Each row is the image's own: embedded alone, in another batch, the same feature.
  second = embed.CardTransform(224, 224, "bicubic")(afx.tissue(300, 400, seed=2))
  alone = embed.Encoder(str(tmp_path / "r18"))(second[None])
  assert cosine(alone[0], features[1]) >= 0.99999


# --- The card's transform -----------------------------------------------------------------------

def test_card_transform_sizes_and_crops_as_torchvision():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (300, 500, 3), dtype=np.uint8)
  # Resize(256, BICUBIC): short side 256, long int(256 * 500 / 300) = 426; CenterCrop(224) at
  # top round(32 / 2) = 16, left round(202 / 2) = 101.
  got = embed.CardTransform(224, 256, "bicubic")(image)
  resized = np.asarray(PIL.Image.fromarray(image).resize((426, 256), PIL.Image.Resampling.BICUBIC))
  np.testing.assert_array_equal(got, resized[16:240, 101:325])
  # An image already at 224 on its short side is not resampled; CenterCrop rounds half to even:
  # 303 - 224 = 79 -> left round(39.5) = 40 (a floor would take 39).
  wide = rng.integers(0, 256, (224, 303, 3), dtype=np.uint8)
  np.testing.assert_array_equal(embed.CardTransform(224, 224)(wide), wide[:, 40:264])
  squash = embed.CardTransform(224, 224, "bilinear", "squash")(image)
  np.testing.assert_array_equal(squash, np.asarray(PIL.Image.fromarray(image).resize((224, 224),
                                                                                      PIL.Image.Resampling.BILINEAR)))
  with pytest.raises(ValueError, match="smaller than the model input 224x224"):
    embed.CardTransform(224, 224)(image[:200])


def test_each_preset_records_the_transform_its_card_uses():
  assert (presets.get("prov_gigapath").resize, presets.get("prov_gigapath").interpolation) == (256, "bicubic")
  assert presets.get("virchow2").interpolation == "bicubic" and presets.get("uni2_h").interpolation == "bilinear"
  assert presets.get("phikon").crop == presets.get("hibou_l").crop == "squash"
  manifest = {"preset": "uni", "input": {"size": 224, "resize": 224, "norm": "imagenet"}, "model": {}}
  assert embed.card_transform(manifest) == embed.CardTransform(224, 224, "bilinear", "center")  # older manifest


# --- One row per tile, cut as the gallery was ----------------------------------------------------

def test_one_row_per_tile_as_the_dataset_cut_its_gallery(converted, tmp_path):
  """--tiling bach/x5_64: photos resized by 0.25 and cut in 64 px tiles with tissue on half of them.
  A 512x768 photo with 256 px of glass keeps 4 of its 6 tiles; without glass, all 6."""
  photos = [afx.tissue(512, 768, seed=1, glass=256), afx.tissue(512, 768, seed=2)]
  paths = save_all(tmp_path / "photos", photos)
  out = str(tmp_path / "tiles.npy")
  record = embed.run(converted("kaiko_vits16"), paths, out, tiling="bach/x5_64", image_size=64, with_rows=True)
  cut = tiling.TilingConfig(patch_size=64, stride=64, resize=0.25, tissue_threshold=0.1, min_tissue_fraction=0.5)
  expected = [tiling.tile_image(photo, cut)[0] for photo in photos]
  assert [len(tiles) for tiles in expected] == [4, 6]
  sidecar = json.loads(open(tmp_path / "tiles.json").read())
  rows = sidecar["rows"]
  assert record["count"] == len(rows) == 10 and np.load(out).shape == (10, 384)
  assert [(r["source"], r["y"], r["x"]) for r in rows] == [
      (path, t.y, t.x) for path, tiles in zip(paths, expected) for t in tiles]
  assert [im["tiles_dropped"] for im in sidecar["images"]] == [2, 0]
  assert sidecar["tiling"]["patch_size"] == 64 and sidecar["tiling_from"] == {"dataset": "bach/x5_64", "split": "train"}
  # A row is the feature of its tile's pixels: the first tile of the second photo, embedded alone.
  encoder = embed.Encoder(converted("kaiko_vits16"))
  alone = encoder(augment.center_crop(expected[1][0].image, 64)[None])
  assert cosine(alone[0], np.load(out)[4]) >= 0.99999


def test_tiles_smaller_than_the_input_ask_for_an_image_size(converted, tmp_path):
  paths = save_all(tmp_path / "photos", [afx.tissue(512, 768, seed=1)])
  with pytest.raises(ValueError, match=r"bach/x5_64.*smaller than the model input 224.*--image_size"):
    embed.run(converted("kaiko_vits16"), paths, str(tmp_path / "f.npy"), tiling="bach/x5_64")
  with pytest.raises(ValueError, match=r"--image_size 60 is not a multiple of the model's patch \(16 px\)"):
    embed.run(converted("kaiko_vits16"), paths, str(tmp_path / "f.npy"), tiling="bach/x5_64", image_size=60)
  with pytest.raises(ValueError, match="neither an index folder nor a known dataset"):
    embed.run(converted("kaiko_vits16"), paths, str(tmp_path / "f.npy"), tiling="no_such_dataset/x")
  assert not (tmp_path / "f.npy").exists()


# --- Which files, and bad ones ---------------------------------------------------------------------

def test_a_folder_gives_every_image_the_suffix_list_names(converted, tmp_path):
  """Every suffix of data/images.SUFFIXES that Pillow writes, any case; not hidden files or others."""
  folder = tmp_path / "mixed"
  folder.mkdir()
  rng = np.random.default_rng(3)
  written = []
  for i, suffix in enumerate(images.SUFFIXES):
    name = folder / f"im{i:02d}{suffix.upper() if i % 2 else suffix}"
    try:
      PIL.Image.fromarray(rng.integers(0, 256, (224, 240, 3), dtype=np.uint8)).save(
          name, format=PIL.Image.registered_extensions()[suffix])
    except (OSError, KeyError, ValueError):  # a format Pillow reads but does not write
      name.unlink(missing_ok=True)
      continue
    written.append(str(name))
  (folder / "notes.txt").write_text("not an image")
  PIL.Image.fromarray(np.zeros((224, 224, 3), np.uint8)).save(folder / ".hidden.png")
  assert len(written) >= 10
  embed.run(converted("kaiko_vits16"), [str(folder)], str(tmp_path / "f.npy"), with_rows=True)
  rows = json.loads((tmp_path / "f.json").read_text())["rows"]
  assert [r["source"] for r in rows] == sorted(written) and np.load(tmp_path / "f.npy").shape == (len(written), 384)
  assert all((r["width"], r["height"]) == (240, 224) for r in rows)


def test_alike_rows_are_recorded_and_warned_about(converted, tmp_path):
  same = afx.tissue(224, 224, seed=7)
  paths = save_all(tmp_path / "images", [same, same, same])
  with pytest.warns(health.CollapsedEmbeddingWarning, match="norm of the mean unit row is 1.0000"):
    record = embed.run(converted("kaiko_vits16"), paths, str(tmp_path / "f.npy"))
  assert record["spread"]["collapsed"] and record["spread"]["rows"] == 3
  assert "COLLAPSED" in embed.summary(record)


def test_bad_input_is_named_and_nothing_is_written(converted, tmp_path):
  weights = converted("kaiko_vits16")
  good = save_all(tmp_path / "good", [afx.tissue(224, 224, seed=s) for s in range(2)])
  out = tmp_path / "f.npy"
  np.save(out, np.arange(3.0))  # a previous result, which a failed run must leave as it was
  with pytest.raises(FileNotFoundError, match=r"--weights .*nowhere: no such folder"):
    embed.run(str(tmp_path / "nowhere"), good, str(out))
  with pytest.raises(FileNotFoundError, match=r"--weights .*good holds no manifest.json"):
    embed.run(str(tmp_path / "good"), good, str(out))
  garbage = tmp_path / "bad" / "garbage.png"
  garbage.parent.mkdir()
  garbage.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
  with pytest.raises(images.ImageError, match=r"garbage.png: not a readable image"):
    embed.run(weights, [*good, str(garbage)], str(out))
  small = save_all(tmp_path / "small", [afx.tissue(100, 300, seed=5)])[0]
  with pytest.raises(ValueError, match=rf"{small}: image of 300x100 px is smaller than the model input 224x224"):
    embed.run(weights, [*good, small], str(out))
  # A header that reads but pixels that do not: found while embedding, after other images were.
  data = open(good[0], "rb").read()
  truncated = tmp_path / "bad" / "truncated.png"
  truncated.write_bytes(data[:len(data) // 2])
  with pytest.raises(images.ImageError, match=r"truncated.png: not a readable image"):
    embed.run(weights, [*good, str(truncated)], str(out), batch=8)
  with pytest.raises(ValueError, match="--out must name a .npy file"):
    embed.run(weights, good, str(tmp_path / "f.txt"))
  np.testing.assert_array_equal(np.load(out), np.arange(3.0))
  assert sorted(os.listdir(tmp_path)) == ["bad", "f.npy", "good", "small"]  # no sidecar, no staging file


def test_the_command_line_writes_rows_and_a_json_summary(converted, tmp_path):
  paths = save_all(tmp_path / "images", [afx.tissue(256, 300, seed=s) for s in range(3)])
  env = {**os.environ, "PYTHONPATH": ROOT, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  command = [sys.executable, "-m", "histojax.embed", "--weights", converted("kaiko_vits16"), "--out",
             str(tmp_path / "out" / "f.npy"), "--json", "--images", paths[0], *paths[1:]]
  done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert done.returncode == 0, done.stderr[-2000:]
  summary = json.loads(done.stdout)  # stdout holds the summary alone
  assert summary["count"] == 3 and summary["dim"] == 384 and summary["spread"]["rows"] == 3
  assert summary["input"] == {"size": 224, "resize": 224, "interpolation": "bilinear", "crop": "center"}
  assert np.load(tmp_path / "out" / "f.npy").shape == (3, 384)
  assert len(json.loads((tmp_path / "out" / "f.json").read_text())["rows"]) == 3
  done = subprocess.run(command[:4] + [str(tmp_path / "missing")] + command[5:], env=env, capture_output=True,
                        text=True, timeout=300, cwd=ROOT)
  assert done.returncode == 1 and "error: --weights" in done.stderr and "missing: no such folder" in done.stderr
