"""Random weights in each foundation-model preset's published layout, from a seed.

The one routine shared by tests/fixtures/make_encoder_parity.py (which loads these
weights into timm / transformers and records their features) and by the parity
tests (which regenerate them, convert them with histojax and compare). Full
width, reduced depth. Everything the published init keeps near 0 or 1 is drawn
at unit scale instead (layer-scale gammas, class and register tokens, position
embeddings, biases, norms), so that a wrong MLP, gate order or token layout
cannot hide behind a residual branch scaled by 1e-5.
"""

from __future__ import annotations

import json
import os
import zlib

import numpy as np
from safetensors.numpy import save_file

from histojax.models import embedder, presets
from tests import published_keys as published

DEPTH = 2


def seed_of(name: str) -> int:
  return zlib.crc32(name.encode())


def published_shapes(preset: presets.Preset, depth: int = DEPTH) -> dict[str, tuple]:
  a = preset.architecture
  glu = a["mlp"] == "glu"
  if preset.format == "timm":
    return published.timm_vit(a["width"], depth, a["patch"], a["image_size"], layer_scale=a["layer_scale"] > 0,
                               classes=0, reg_tokens=a["reg_tokens"], no_embed_class=a["pos_embed"] == "patches",
                               glu=glu, mlp_hidden=a["mlp_dim"])
  model_type = preset.hub_config["model_type"]
  return published.transformers_vit(model_type, a["width"], depth, a["patch"], a["image_size"],
                                    a["mlp_dim"] // 2 if glu else a["mlp_dim"], swiglu=glu,
                                    reg_tokens=a["reg_tokens"], pooler=model_type == "vit")


def _value(rng, key: str, shape: tuple) -> np.ndarray:
  leaf = key.rsplit(".", 1)[-1]
  module = key.rsplit(".", 2)[-2] if key.count(".") else ""
  if leaf in ("gamma", "lambda1") or (leaf == "weight" and "norm" in module):
    return rng.uniform(0.5, 1.5, shape)  # layer scales (published init 1e-5 or 1) and norm scales
  if leaf == "bias":
    return 0.2 * rng.standard_normal(shape)
  if leaf in ("cls_token", "reg_token", "register_tokens", "mask_token"):
    return rng.standard_normal(shape)
  if leaf in ("pos_embed", "position_embeddings"):
    return 0.5 * rng.standard_normal(shape)
  fan_in = int(np.prod(shape[1:]))  # linear [out, in], conv [out, in, kh, kw]
  return rng.standard_normal(shape) / np.sqrt(fan_in)


def random_weights(preset: presets.Preset, depth: int = DEPTH) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed_of(preset.name))
  return {k: _value(rng, k, s).astype(np.float32) for k, s in sorted(published_shapes(preset, depth).items())}


def hub_config(preset: presets.Preset, depth: int = DEPTH) -> dict:
  """The folder's config.json, as published but at `depth` blocks."""
  if preset.format == "transformers":
    return {**preset.hub_config, "num_hidden_layers": depth}
  mean, std = embedder.INPUT_NORMS[preset.input_norm]
  size = preset.architecture["image_size"]
  return {"architecture": preset.timm_architecture, "num_classes": 0,
          "model_args": {**preset.hub_config, "depth": depth},
          # fixed_input_size: timm builds the model at input_size (as kaiko.ai's published configs say).
          "pretrained_cfg": {"input_size": [3, size, size], "fixed_input_size": True, "interpolation": "bicubic",
                             "crop_pct": 1.0,
                             "crop_mode": "center", "mean": list(mean), "std": list(std), "num_classes": 0,
                             "first_conv": "patch_embed.proj", "classifier": "head"}}


def write_hub_folder(preset: presets.Preset, directory: str, depth: int = DEPTH) -> dict[str, np.ndarray]:
  """config.json + model.safetensors as the hub publishes them; returns the tensors."""
  os.makedirs(directory, exist_ok=True)
  tensors = random_weights(preset, depth)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(hub_config(preset, depth), f, indent=2)
  save_file(tensors, os.path.join(directory, "model.safetensors"))
  return tensors


def images(preset: presets.Preset) -> tuple[np.ndarray, np.ndarray]:
  """uint8 NHWC: two at the preset's input size, one non-square one whose patch grid differs from
  both the stored grid and the input's (position embeddings resampled, height and width apart)."""
  rng = np.random.default_rng(seed_of(preset.name) + 1)
  s, p = preset.input_size, preset.architecture["patch"]
  native = rng.integers(0, 256, (2, s, s, 3), dtype=np.uint8)
  other = rng.integers(0, 256, (1, s - 4 * p, s + 2 * p, 3), dtype=np.uint8)
  return native, other
