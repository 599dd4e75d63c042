"""Foundation-model presets: the same features as timm / transformers on random published-layout weights.

Each preset's weights (full width, 2 blocks) are regenerated from its seed by
tests/encoder_fixtures.py, written as a hub folder, converted by the real
`convert` path and embedded by histojax; tests/fixtures/encoders/parity.npz holds
what timm 1.0.31 / transformers 5.25 computed from the same tensors
(tests/fixtures/make_encoder_parity.py), including an input whose patch grid
differs from the stored one, so that position resampling is compared too.
`test_preset_matches_live_torch` recomputes those references where torch, timm
and transformers import (skipped otherwise; CI never installs them), e.g. with
the fixture script's environment on the path:
    PYTHONPATH=.:/path/to/torch-timm-transformers-site python -m pytest tests/test_encoders.py -k live
The bf16 figures are recorded by `python -m bench.encoder_parity`.
"""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from histojax import models
from histojax.models import presets, resample
from histojax.weights import store
from tests import encoder_fixtures as fx

PARITY = np.load(os.path.join(os.path.dirname(__file__), "fixtures", "encoders", "parity.npz"))
MIN_COSINE = 0.99999
# Full-depth backbone parameters, counted by timm 1.0.31 / transformers 5.25 (their pooler and
# mask token left out: the features never use them) on the meta device.
PUBLISHED_PARAMETERS = {
    "h_optimus_0": 1_134_774_272, "h_optimus_1": 1_134_774_272, "hibou_b": 85_740_288, "hibou_l": 303_658_240,
    "kaiko_vitb16": 85_798_656, "kaiko_vitb8": 85_807_872, "kaiko_vitl14": 304_370_688, "kaiko_vits16": 21_665_664,
    "kaiko_vits8": 21_670_272, "midnight": 1_134_769_664, "phikon": 85_798_656, "phikon_v2": 303_350_784,
    "prov_gigapath": 1_134_953_984, "uni": 303_350_784, "uni2_h": 681_394_176, "virchow": 631_229_184,
    "virchow2": 631_239_424,
}


def cosine(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def embedder(manifest, weights_dir, **overrides):
  """(jitted features(state, images), state) of the converted model; the backbone is filled from the
  weights, the head (unused by `features`) zeros: no random init to compile."""
  cfg = models.model_config(manifest["model"]["name"])
  cfg.update(manifest["model"])
  cfg.update(overrides)
  graphdef, abstract = nnx.split(models.abstract_model(cfg))
  state = store.apply(jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract), weights_dir)
  features = jax.jit(lambda s, x: nnx.merge(graphdef, s).features(x).astype(jnp.float32))
  return features, state


@pytest.mark.parametrize("name", presets.names())
def test_preset_reproduces_its_reference_implementation(converted_preset, name):
  preset = presets.get(name)
  weights_dir, manifest = converted_preset(name)
  features, state = embedder(manifest, weights_dir)
  native, other = fx.images(preset)
  assert cosine(features(state, native), PARITY[f"{name}.native"]).min() >= MIN_COSINE
  if f"{name}.other" in PARITY.files:  # not Hibou: its remote code cannot run offline (see the fixture script)
    assert cosine(features(state, other), PARITY[f"{name}.other"]).min() >= MIN_COSINE
  # The same network: what the reference holds at 2 blocks, less the tensors the conversion leaves out.
  shapes = fx.published_shapes(preset)
  unused = sum(int(np.prod(shapes[k])) for k in manifest["ignored"])
  assert manifest["backbone_parameters"] + unused == int(PARITY[f"{name}.parameters"])
  assert manifest["preset"] == name and manifest["feature"] == preset.feature
  assert manifest["gallery_mpp"] == preset.gallery_mpp and manifest["input"]["norm"] == preset.input_norm


@pytest.mark.parametrize("name", presets.names())
def test_preset_matches_live_torch(converted_preset, name):
  """The committed features, recomputed by the fixture script where torch, timm and transformers are installed."""
  for module in ("torch", "timm", "transformers"):
    pytest.importorskip(module)
  spec = importlib.util.spec_from_file_location(  # tests/fixtures is not a package; imported only here (optional)
      "make_encoder_parity", os.path.join(os.path.dirname(__file__), "fixtures", "make_encoder_parity.py"))
  live = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(live)
  reference = {}
  live.record(presets.get(name), reference)
  weights_dir, manifest = converted_preset(name)
  features, state = embedder(manifest, weights_dir)
  native, other = fx.images(presets.get(name))
  assert cosine(features(state, native), reference[f"{name}.native"]).min() >= MIN_COSINE
  if f"{name}.other" in reference:
    assert cosine(features(state, other), reference[f"{name}.other"]).min() >= MIN_COSINE


@pytest.mark.parametrize("name,feature", [(p, f) for p in presets.names() for f in presets.get(p).features])
def test_alternative_features_match_the_reference(converted_preset, name, feature):
  weights_dir, manifest = converted_preset(name)
  features, state = embedder(manifest, weights_dir, pool=feature)
  native, _ = fx.images(presets.get(name))
  assert cosine(features(state, native), PARITY[f"{name}.native.{feature}"]).min() >= MIN_COSINE


@pytest.mark.parametrize("name", presets.names())
def test_full_depth_architecture_has_the_published_parameter_count(name):
  # Blocks are identical: 1 and 2 blocks give the per-block count (building 40 abstract blocks takes 10 s).
  cfg = models.model_config(name)
  counts = []
  for layers in (1, 2):
    cfg.layers = layers
    counts.append(models.parameter_count(models.abstract_model(cfg).backbone))
  layers = models.model_config(name).layers
  assert counts[0] + (layers - 1) * (counts[1] - counts[0]) == PUBLISHED_PARAMETERS[name]


def test_a_wrong_gate_order_or_resampling_rule_cannot_pass(converted_preset):
  """The random weights make every part count: swapping SwiGLU's halves, or resampling positions by another
  rule, falls far below the bar."""
  weights_dir, manifest = converted_preset("uni2_h")
  features, state = embedder(manifest, weights_dir)
  native, other = fx.images(presets.get("uni2_h"))
  swapped = jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.roll(x, x.shape[-1] // 2, axis=-1) if "fc1" in jax.tree_util.keystr(path) else x, state)
  assert cosine(features(swapped, native), PARITY["uni2_h.native"]).max() < 0.99
  weights_dir, manifest = converted_preset("kaiko_vits16")
  features, state = embedder(manifest, weights_dir, resample="bicubic")
  native, other = fx.images(presets.get("kaiko_vits16"))
  assert cosine(features(state, native), PARITY["kaiko_vits16.native"]).min() >= MIN_COSINE  # no resampling
  assert cosine(features(state, other), PARITY["kaiko_vits16.other"]).max() < 0.9999


RESAMPLED = sorted({k.rsplit(".", 1)[0] for k in PARITY.files if k.startswith("resample.")})


@pytest.mark.parametrize("case", RESAMPLED)
@pytest.mark.parametrize("rule", resample.RULES)
def test_position_resampling_matches_torch_interpolate(case, rule):
  _, _, h, w = case.split(".")
  got = resample.resample_grid(jnp.asarray(PARITY[f"{case}.grid"]), (int(h), int(w)), rule)
  np.testing.assert_allclose(np.asarray(got), PARITY[f"{case}.{rule}"], atol=2e-5, rtol=0)


def test_unknown_resampling_rule_is_refused():
  with pytest.raises(ValueError, match="model.resample must be one of"):
    resample.resample_grid(jnp.zeros((1, 4, 4, 2)), (3, 3), "bilinear")
