"""`convert --format timm|transformers --preset`: hub weight folders, tiny ones, honest and hostile."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from histojax import convert, untrusted, weights
from histojax.models import presets
from tests import hostile_checkpoints as hostile
from tests import published_keys as published

# A Virchow2-shaped timm folder at width 32: 4 registers, position embeddings over 1 + 4 + 4 rows, SwiGLU.
TINY_TIMM = {"architecture": "vit_huge_patch14_224", "num_classes": 0, "global_pool": "",
             "model_args": {"img_size": 28, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0,
                            "reg_tokens": 4, "init_values": 1e-5, "num_classes": 0, "dynamic_img_size": True}}
# A Hibou-shaped transformers folder: DINOv2 with registers and SwiGLU (hidden 64 -> 48 per half).
TINY_DINO = {"model_type": "dinov2", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "mlp_ratio": 2, "use_swiglu_ffn": True, "num_register_tokens": 4, "image_size": 28, "patch_size": 14,
             "layer_norm_eps": 1e-6, "layerscale_value": 1.0, "hidden_act": "gelu"}


def _random(shapes, seed=0):
  rng = np.random.default_rng(seed)
  return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def timm_tensors():
  return _random(published.timm_vit(32, 2, 14, 28, layer_scale=True, classes=0, reg_tokens=4, glu=True,
                                    mlp_hidden=64))


def dino_tensors():
  return _random(published.transformers_vit("dinov2", 32, 2, 14, 28, 48, swiglu=True, reg_tokens=4))


def folder(path, config, tensors, weights_name="model.safetensors"):
  path.mkdir(parents=True, exist_ok=True)
  (path / "config.json").write_text(json.dumps(config))
  if tensors is not None:
    save_file(tensors, str(path / weights_name))
  return str(path)


def test_timm_folder_converts_with_the_card_kwargs_and_records_the_preset(tmp_path):
  tensors = timm_tensors()
  manifest = convert.convert("timm", folder(tmp_path / "hub", TINY_TIMM, tensors), str(tmp_path / "w"),
                             preset="virchow2")
  model = manifest["model"]
  # From config.json: widths, depth, registers; from the card (code): SwiGLUPacked + SiLU; from the preset: the rest.
  assert (model["width"], model["layers"], model["heads"], model["reg_tokens"]) == (32, 2, 2, 4)
  assert (model["mlp"], model["act"], model["mlp_dim"], model["pos_embed"]) == ("glu", "silu", 64, "prefix")
  assert manifest["feature"] == model["pool"] == "token_patch_mean" and manifest["gallery_mpp"] == 0.5
  assert manifest["input"] == {"size": 224, "resize": 224, "norm": "imagenet", "interpolation": "bicubic",
                               "crop": "center"}  # Virchow2's card: timm's bicubic transform
  assert manifest["sources"]["backbone.reg_token"] == "reg_token" and not manifest["left_at_init"]
  assert manifest["source_sha256"] == manifest["source_files"]["model.safetensors"]
  cls_only = convert.convert("timm", str(tmp_path / "hub"), str(tmp_path / "w_cls"), preset="virchow2",
                             feature="token")
  assert cls_only["feature"] == cls_only["model"]["pool"] == "token"


def test_transformers_folder_fuses_query_key_value_in_order(tmp_path):
  tensors = dino_tensors()
  manifest = convert.convert("transformers", folder(tmp_path / "hub", TINY_DINO, tensors), str(tmp_path / "w"),
                             preset="hibou_b")
  values, _ = weights.store.load(tmp_path / "w")
  kernel = values["backbone.blocks.1.attn.qkv.kernel"]
  x = np.random.default_rng(0).standard_normal(32)
  for i, part in enumerate(("query", "key", "value")):  # torch: part = W x + b
    w = tensors[f"encoder.layer.1.attention.attention.{part}.weight"]
    np.testing.assert_allclose(x @ kernel[:, 32 * i:32 * (i + 1)], w @ x, rtol=1e-5, atol=1e-5)
  assert manifest["model"]["mlp_dim"] == 96 and manifest["model"]["pos_embed"] == "class"
  assert manifest["sources"]["backbone.blocks.0.ls2.gamma"] == "encoder.layer.0.layer_scale2.lambda1"
  assert manifest["sources"]["backbone.blocks.0.mlp.fc1.kernel"] == "encoder.layer.0.mlp.weights_in.weight"
  assert manifest["ignored"] == {"embeddings.mask_token": "masked-image-modelling token (pre-training only)"}


def test_weights_that_do_not_fit_the_preset_are_all_listed_and_nothing_is_written(tmp_path):
  tensors = timm_tensors()
  del tensors["blocks.1.ls2.gamma"]
  tensors["blocks.2.norm1.weight"] = np.ones(32, np.float32)
  tensors["blocks.0.mlp.fc2.weight"] = np.zeros((32, 64), np.float32)  # a plain MLP's fc2, not SwiGLU's
  out = tmp_path / "w"
  with pytest.raises(weights.WeightMismatchError) as err:
    convert.convert("timm", folder(tmp_path / "hub", TINY_TIMM, tensors), str(out), preset="virchow2")
  e = err.value
  assert e.missing == ["backbone.blocks.1.ls2.gamma"] and e.unexpected == ["blocks.2.norm1.weight"]
  assert len(e.misshaped) == 1 and "blocks.0.mlp.fc2.weight (32, 64)" in e.misshaped[0]
  assert not out.exists()
  # UNI2-h's card on a Virchow2 folder: 8 registers, no position rows for the prefix, 1536 wide.
  with pytest.raises(weights.WeightMismatchError, match=r"reg_token \(1, 4, 32\) -> backbone.reg_token needs "
                                                        r"\(1, 8, 1536\)"):
    convert.convert("timm", folder(tmp_path / "hub2", TINY_TIMM, timm_tensors()), str(out), preset="uni2_h")
  assert not out.exists()


def test_preset_names_and_formats_are_checked_first(tmp_path):
  hub = folder(tmp_path / "hub", TINY_TIMM, timm_tensors())
  with pytest.raises(KeyError, match=r"unknown preset 'uni3'; known: .*h_optimus_0.*midnight.*uni2_h"):
    convert.convert("timm", hub, str(tmp_path / "w"), preset="uni3")
  with pytest.raises(ValueError, match=r"needs --preset, one of: .*uni2_h.*virchow2"):
    convert.convert("timm", hub, str(tmp_path / "w"))
  with pytest.raises(ValueError, match="published as a transformers folder: use --format transformers"):
    convert.convert("timm", hub, str(tmp_path / "w"), preset="phikon")
  with pytest.raises(ValueError, match=r"preset 'virchow2' offers features \['token_patch_mean', 'token'\]"):
    convert.convert("timm", hub, str(tmp_path / "w"), preset="virchow2", feature="avg")
  with pytest.raises(FileNotFoundError, match="must be a weight folder"):
    convert.convert("timm", os.path.join(hub, "model.safetensors"), str(tmp_path / "w"), preset="virchow2")
  assert not (tmp_path / "w").exists()
  with pytest.raises(KeyError, match="unknown preset"):
    presets.get("UNI")


@pytest.mark.parametrize("config,error,match", [
    (b"{not json", untrusted.CorruptFileError, "not a valid model config.json"),
    (b"[1, 2]", untrusted.CorruptFileError, "must be a JSON dict"),
    (b" " * (2 << 20), untrusted.CorruptFileError, "too large for a model config.json"),
    ({**TINY_TIMM, "architecture": "vit_so400m_patch14_siglip_224"}, ValueError, "architecture .* is not one"),
    ({**TINY_TIMM, "model_args": {**TINY_TIMM["model_args"], "num_heads": "two"}}, ValueError,
     "num_heads must be a positive integer"),
    ({**TINY_TIMM, "model_args": {**TINY_TIMM["model_args"], "qk_norm": True}}, ValueError, "does not implement"),
    ({**TINY_TIMM, "model_args": {**TINY_TIMM["model_args"], "depth": 10 ** 9}}, ValueError, "positive integer"),
])
def test_hostile_config_json_is_refused_by_name(tmp_path, config, error, match):
  hub = tmp_path / "hub"
  folder(hub, {}, timm_tensors())
  (hub / "config.json").write_bytes(config if isinstance(config, bytes) else json.dumps(config).encode())
  with pytest.raises(error, match=match):
    convert.convert("timm", str(hub), str(tmp_path / "w"), preset="virchow2")
  assert not (tmp_path / "w").exists()


def test_sharded_and_pytorch_folders_read_like_one_safetensors_file(tmp_path):
  tensors = timm_tensors()
  whole = convert.convert("timm", folder(tmp_path / "one", TINY_TIMM, tensors), str(tmp_path / "w1"),
                          preset="virchow2")
  names = sorted(tensors)
  shards = tmp_path / "shards"
  folder(shards, TINY_TIMM, None)
  save_file({k: tensors[k] for k in names[:10]}, str(shards / "model-00001-of-00002.safetensors"))
  save_file({k: tensors[k] for k in names[10:]}, str(shards / "model-00002-of-00002.safetensors"))
  index = {"weight_map": {k: f"model-0000{1 + (i >= 10)}-of-00002.safetensors" for i, k in enumerate(names)}}
  (shards / "model.safetensors.index.json").write_text(json.dumps(index))
  sharded = convert.convert("timm", str(shards), str(tmp_path / "w2"), preset="virchow2")
  assert sharded["variables"] == whole["variables"] and len(sharded["source_files"]) == 2
  bin_folder = tmp_path / "bin"
  folder(bin_folder, TINY_TIMM, None)
  hostile.write_zip(bin_folder / "pytorch_model.bin",
                    {k: hostile.Tensor(v, str(i)) for i, (k, v) in enumerate(sorted(tensors.items()))})
  from_bin = convert.convert("timm", str(bin_folder), str(tmp_path / "w3"), preset="virchow2")
  a, _ = weights.store.load(tmp_path / "w1")
  b, _ = weights.store.load(tmp_path / "w3")
  assert from_bin["variables"] == whole["variables"] and all(np.array_equal(a[k], b[k]) for k in a)


def test_shard_names_cannot_leave_the_folder_and_sizes_are_bounded(tmp_path):
  hub = tmp_path / "hub"
  folder(hub, TINY_TIMM, None)
  (hub / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../secret.safetensors"}}))
  with pytest.raises(untrusted.CorruptFileError, match="is not a file name inside the folder"):
    convert.convert("timm", str(hub), str(tmp_path / "w"), preset="virchow2")
  hub = tmp_path / "hub2"
  folder(hub, TINY_TIMM, None)  # torch storages declare their sizes: refused before they are read
  hostile.write_zip(hub / "pytorch_model.bin", {k: hostile.Tensor(v, k) for k, v in timm_tensors().items()})
  with pytest.raises(weights.CheckpointReadError, match="over the bound"):
    convert.convert("timm", str(hub), str(tmp_path / "w"), preset="virchow2", max_checkpoint_gb=1e-6)
  assert not (tmp_path / "w").exists()


def test_cli_converts_a_folder_and_names_an_unknown_preset(tmp_path):
  hub = folder(tmp_path / "hub", TINY_TIMM, timm_tensors())
  cmd = [sys.executable, "-m", "histojax.convert", "--format", "timm", "--input", hub]
  ok = subprocess.run(cmd + ["--preset", "virchow2", "--output", str(tmp_path / "w")], capture_output=True,
                      text=True, timeout=300)
  assert ok.returncode == 0, ok.stderr
  assert "preset virchow2: feature token_patch_mean" in ok.stdout and "0.5 um/px" in ok.stdout
  bad = subprocess.run(cmd + ["--preset", "uni3", "--output", str(tmp_path / "w2")], capture_output=True,
                       text=True, timeout=300)
  assert bad.returncode == 1 and "error: unknown preset 'uni3'; known: " in bad.stderr
  assert "Traceback" not in bad.stderr and not (tmp_path / "w2").exists()
