"""Importing published weights: the torch-free reader, the per-format mappings, their errors."""

import os
import pickle
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from histojax import convert, models, weights
from histojax.weights import store, torch_pickle
from tests import published_keys as published
from tests.test_numerics import conv2d_nchw

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "torch")


def fixture(name):
  return os.path.join(FIXTURES, name)


# --- Reading checkpoints -----------------------------------------------------

@pytest.mark.parametrize("name", ["formats_zip.pt", "formats_legacy.pt"])
def test_torch_reader_matches_what_torch_saved(name):
  ckpt = torch_pickle.load(fixture(name))
  expected = np.load(fixture("formats_expected.npz"))
  tensors = ckpt["model"]
  assert sorted(tensors) == sorted(expected.files)
  for key in expected.files:
    got = tensors[key].astype(np.float32) if key == "bf16" else tensors[key]
    np.testing.assert_array_equal(got, expected[key], err_msg=key)
  assert tensors["bf16"].dtype == jnp.bfloat16 and tensors["fp16"].dtype == np.float16
  assert tensors["int64"].dtype == np.int64 and tensors["bool"].dtype == np.bool_
  assert ckpt["epoch"] == 7 and ckpt["best"] == 0.5
  # argparse.Namespace was not imported, only recorded.
  assert isinstance(ckpt["args"], torch_pickle.Opaque) and ckpt["args"].state == {"lr": 0.1, "arch": "x"}


def test_reader_never_runs_what_a_pickle_names(tmp_path):
  target = tmp_path / "pwned"

  class Exploit:
    def __reduce__(self):
      return (os.system, (f"touch {target}",))

  path = tmp_path / "evil.pt"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("evil/data.pkl", pickle.dumps({"w": Exploit()}, protocol=2))
  with pytest.raises(torch_pickle.HostileCheckpointError, match="posix.system"):
    torch_pickle.load(str(path))
  assert not target.exists()


def test_state_dict_selection_prefix_and_data_parallel(tmp_path):
  assert "plain" in weights.read_state_dict(fixture("formats_zip.pt"))  # found under "model"
  with pytest.raises(KeyError, match=r"no 'net' in the checkpoint .*found \['args', 'best', 'epoch', 'model'"):
    weights.read_state_dict(fixture("formats_zip.pt"), key="net")
  path = str(tmp_path / "dp.npz")
  np.savez(path, **{"module.visual.a": np.ones(2), "module.visual.b": np.zeros(3), "module.text.c": np.ones(1)})
  assert sorted(weights.read_state_dict(path, prefix="visual.")) == ["a", "b"]
  with pytest.raises(FileNotFoundError, match="nothere.pt does not exist"):
    weights.read_state_dict(str(tmp_path / "nothere.pt"))
  (tmp_path / "w.h5").write_bytes(b"")
  with pytest.raises(ValueError, match="unknown checkpoint type"):
    weights.read_state_dict(str(tmp_path / "w.h5"))


def test_safetensors_keeps_bf16_and_import_casts_to_fp32(tmp_path):
  tensors = _random(published.timm_vit(32, 2, 8, 16, mlp_ratio=2, classes=0), seed=3)
  tensors = {k: v.astype(jnp.bfloat16) for k, v in tensors.items()}
  path = str(tmp_path / "vit.safetensors")
  save_file(tensors, path)
  read = weights.read_state_dict(path)
  assert read["pos_embed"].dtype == jnp.bfloat16
  imported = _import("timm_vit", read)
  assert imported.values["backbone.pos_embed"].dtype == np.float32
  np.testing.assert_array_equal(imported.values["backbone.pos_embed"], read["pos_embed"].astype(np.float32))


# --- Published layouts -> histojax -------------------------------------------

def _random(shapes, seed=0):
  rng = np.random.default_rng(seed)
  return {k: (rng.standard_normal(s).astype(np.float32) if not k.endswith("num_batches_tracked")
              else np.asarray(3, np.int64)) for k, s in shapes.items()}


def _zeros(shapes):
  # Broadcast views: published sizes at no memory cost.
  return {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}


def _import(format_name, tensors, model="", **kwargs):
  fmt = weights.FORMATS[format_name]
  cfg, _ = convert.target_config(fmt, tensors, model)
  return weights.import_tensors(models.abstract_model(cfg), tensors, fmt, **kwargs)


@pytest.mark.parametrize("format_name,shapes,model,changed,ignored", [
    ("torchvision_resnet", published.torchvision_resnet(18), "resnet", {"depth": 18}, 22),
    ("torchvision_resnet", published.torchvision_resnet(101), "resnet", {"depth": 101}, 106),
    ("torchvision_resnet", published.torchvision_resnet(50, se=True), "se_resnet", {}, 55),
    ("clip", published.clip_model(), "clip_vit_b16", {}, 150),
    ("clip", published.clip_model(patch=32), "clip_vit_b32", {}, 150),
    ("clip", published.clip_model(1024, 24, 14, 224, 768, 768), "clip_vit_l14", {}, 150),
    ("timm_vit", published.timm_vit(), "vit_b16", {}, 2),
    ("timm_vit", published.timm_vit(1024, 24, layer_scale=True, classes=0), "vit_l16", {"layer_scale": 1e-5}, 0),
])
def test_published_layouts_fill_the_registered_models(format_name, shapes, model, changed, ignored):
  tensors = _zeros(shapes)
  cfg, fields = convert.target_config(weights.FORMATS[format_name], tensors)
  assert fields["name"] == model
  # The registered presets are the published architectures: the shapes change no other field.
  preset = models.model_config(model)
  preset.update(changed)
  assert cfg.to_dict() == preset.to_dict()
  model_ = models.abstract_model(cfg)
  imported = weights.import_tensors(model_, tensors, weights.FORMATS[format_name])
  backbone = {k for k in weights.model_variables(model_) if k.startswith("backbone.")}
  assert set(imported.values) == backbone and not imported.left_at_init
  assert len(imported.ignored) == ignored


def _check_layout(key, published_value, imported_value, rng):
  """The imported tensor computes what the published one computes in torch."""
  w = published_value.astype(np.float64)
  if w.ndim == 4:  # conv: torch NCHW cross-correlation vs lax NHWC with the imported HWIO kernel
    x = rng.standard_normal((1, w.shape[1], w.shape[2] + 2, w.shape[3] + 2))
    want = conv2d_nchw(x, w)
    got = jax.lax.conv_general_dilated(jnp.asarray(x.transpose(0, 2, 3, 1), jnp.float32), imported_value,
                                       (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), want, rtol=1e-4, atol=1e-4, err_msg=key)
  elif key.endswith(("weight", "in_proj_weight")) and w.ndim == 2:  # torch linear: y = x W^T
    x = rng.standard_normal((3, w.shape[1]))
    np.testing.assert_allclose(x @ imported_value, x @ w.T, rtol=1e-4, atol=1e-4, err_msg=key)
  elif key.endswith("proj") and w.ndim == 2:  # CLIP: y = x @ proj
    np.testing.assert_array_equal(imported_value, published_value, err_msg=key)
  else:  # vectors, tokens, position embeddings (leading axes may be added)
    np.testing.assert_array_equal(imported_value.reshape(published_value.shape), published_value, err_msg=key)


@pytest.mark.parametrize("format_name,shapes,targets", [
    ("torchvision_resnet", published.torchvision_resnet(50, base=4, se=True, classes=3),
     {"layer2.0.downsample.0.weight": "backbone.layer2.0.downsample.conv.kernel",
      "layer3.1.se.fc2.weight": "backbone.layer3.1.se.fc2.kernel",
      "layer1.0.bn3.running_var": "backbone.layer1.0.bn3.var", "bn1.weight": "backbone.bn1.scale"}),
    ("clip", published.clip_model(32, 2, 8, 32, 16, 16, 1, 8, 50),
     {"visual.transformer.resblocks.1.attn.in_proj_weight": "backbone.blocks.1.attn.qkv.kernel",
      "visual.transformer.resblocks.0.mlp.c_fc.weight": "backbone.blocks.0.mlp.fc1.kernel",
      "visual.class_embedding": "backbone.cls_token", "visual.proj": "backbone.proj.kernel"}),
    ("timm_vit", published.timm_vit(32, 2, 8, 32, mlp_ratio=2, layer_scale=True, classes=0),
     {"blocks.1.attn.qkv.weight": "backbone.blocks.1.attn.qkv.kernel", "blocks.0.ls2.gamma": "backbone.blocks.0.ls2.gamma",
      "patch_embed.proj.weight": "backbone.patch_embed.kernel", "norm.bias": "backbone.norm.bias"}),
])
def test_round_trip_tensor_by_tensor(format_name, shapes, targets):
  tensors = _random(shapes, seed=1)
  imported = _import(format_name, tensors)
  scoped, _ = weights.FORMATS[format_name].select(tensors)
  rng = np.random.default_rng(0)
  # Every published tensor is either imported or ignored for a stated reason ...
  assert sorted(imported.sources.values()) == sorted(k for k in scoped if k not in imported.ignored)
  # ... and computes, imported, what it computes in torch.
  for target, key in imported.sources.items():
    _check_layout(key, scoped[key], imported.values[target], rng)
  for key, target in targets.items():  # a few names, spelled out independently
    assert imported.sources[target] == key


def test_attention_projection_keeps_q_k_v_order():
  d = 8
  tensors = _random(published.clip_model(d, 1, 8, 16, 4, 4, 1, 4, 10), seed=2)
  kernel = _import("clip", tensors).values["backbone.blocks.0.attn.qkv.kernel"]
  w = tensors["visual.transformer.resblocks.0.attn.in_proj_weight"]
  x = np.random.default_rng(0).standard_normal(d)
  for i, part in enumerate("qkv"):  # torch: q = W[0:D] x, k = W[D:2D] x, v = W[2D:3D] x
    np.testing.assert_allclose(x @ kernel[:, i * d:(i + 1) * d], w[i * d:(i + 1) * d] @ x, rtol=1e-5, err_msg=part)


def test_mismatches_are_listed_together():
  tensors = _random(published.torchvision_resnet(18, base=8, classes=3))
  del tensors["layer2.1.bn2.running_var"]
  tensors["layer5.0.conv1.weight"] = np.zeros((8, 8, 3, 3), np.float32)
  tensors["layer4.2.conv1.weight"] = np.zeros((64, 64, 3, 3), np.float32)  # ResNet-18 has 2 blocks there
  tensors["layer3.0.conv1.weight"] = np.zeros((32, 16, 5, 5), np.float32)
  cfg = models.model_config("resnet")
  cfg.depth, cfg.width = 18, 8 / 64
  with pytest.raises(weights.WeightMismatchError) as err:
    weights.import_tensors(models.abstract_model(cfg), tensors, weights.FORMATS["torchvision_resnet"], source="r18.pth")
  e = err.value
  assert e.missing == ["backbone.layer2.1.bn2.var"]
  assert e.unexpected == ["layer4.2.conv1.weight", "layer5.0.conv1.weight"]
  assert len(e.misshaped) == 1 and "layer3.0.conv1.weight (32, 16, 5, 5)" in e.misshaped[0]
  assert "r18.pth (torchvision_resnet format): 1 missing, 2 unexpected, 1 mis-shaped" in str(e)


def test_trunk_weights_into_an_attention_model_need_explicit_permission():
  tensors = _zeros(published.torchvision_resnet(50, base=4, se=True, classes=3))
  with pytest.raises(weights.WeightMismatchError, match="backbone.mask_branch.0.conv1.kernel"):
    _import("torchvision_resnet", tensors, model="mixed_attention")
  imported = _import("torchvision_resnet", tensors, model="mixed_attention", allow_missing=("mask_",))
  assert imported.left_at_init and all(k.startswith("backbone.mask_") for k in imported.left_at_init)
  assert "backbone.layer4.2.se.fc2.kernel" in imported.values


# --- What the real libraries compute (fixtures made with torch, timm, open_clip) ---

@pytest.mark.parametrize("format_name,file,expected,heads", [
    ("clip", "clip_tiny_jit.pt", "clip_tiny_expected.npz", 2),
    ("timm_vit", "timm_vit_tiny.safetensors", "timm_vit_tiny_expected.npz", 2),
    ("torchvision_resnet", "seresnet50_w16.pth", "seresnet50_w16_expected.npz", None),
])
def test_imported_models_reproduce_the_published_implementation(tmp_path, format_name, file, expected, heads):
  manifest = convert.convert(format_name, fixture(file), str(tmp_path / "w"))
  cfg = models.model_config(manifest["model"]["name"])
  cfg.update(manifest["model"])
  if heads:
    cfg.heads = heads  # not recorded in the weights
  model = _model_from_weights(cfg, tmp_path / "w")
  model.eval()
  ref = np.load(fixture(expected))
  want = ref["features"] if "features" in ref.files else ref["feature_map"]
  got = np.asarray(jax.jit(lambda s, x: nnx.merge(*s).features(x))(nnx.split(model), jnp.asarray(ref["images"])))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def _model_from_weights(cfg, directory):
  """The model with its backbone straight from converted weights (head zeros): no random init,
  whose per-shape RNG compilation dominates small CPU tests."""
  graphdef, abstract = nnx.split(models.abstract_model(cfg))
  zeros = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract)
  return nnx.merge(graphdef, store.apply(zeros, directory))


def test_scripted_clip_archive_reads_like_a_state_dict():
  tensors = weights.read_state_dict(fixture("clip_tiny_jit.pt"))
  assert tensors["visual.transformer.resblocks.1.attn.in_proj_weight"].shape == (96, 32)
  assert "visual.attn_mask" not in tensors  # None attributes are not tensors
