"""transformers weight folders: ViTModel (`model_type` vit) and Dinov2Model / Dinov2WithRegisters (dinov2...).

Published (hub) names, which `save_pretrained` still writes in transformers 5
(it renames to q_proj/gate_proj only in memory): `embeddings.*`,
`encoder.layer.N.attention.attention.{query,key,value}` (fused into one q|k|v
projection here), `attention.output.dense`, ViT's `layernorm_before/after`,
`intermediate.dense`, `output.dense`, DINOv2's `norm1/2`, `layer_scale1/2.lambda1`,
`mlp.fc1/fc2` or the SwiGLU's packed `mlp.weights_in` (first half gated:
silu(x1) * x2, the same order as timm's SwiGLUPacked) and `mlp.weights_out`.
Register tokens (`embeddings.register_tokens`) join after the position
embeddings, which cover the class token and the patches only.
"""

from __future__ import annotations

import numbers
import re

import numpy as np

from histojax.weights.transfer import Format, same

MODEL_TYPES = ("vit", "dinov2", "dinov2_with_registers")
ACTS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "quick_gelu": "quick_gelu",
        "silu": "silu", "swish": "silu"}
_QKV = "attention.attention.query+key+value"
_WRAPPERS = ("dinov2.", "vit.", "model.", "backbone.")


def _int(config, name, default=None):
  value = config.get(name, default)
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value <= 1 << 16:
    raise ValueError(f"config.json {name} must be a non-negative integer, got {value!r}")
  return int(value)


def _number(config, name, default):
  value = config.get(name, default)
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1e3:
    raise ValueError(f"config.json {name} must be a number, got {value!r}")
  return float(value)


def _image_size(config) -> int:
  value = config.get("image_size", 224)
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise ValueError(f"config.json image_size {value!r}: histojax's ViT stores a square position grid")
    value = value[0]
  return _int({"image_size": value}, "image_size")


def swiglu_hidden(width: int, mlp_ratio: float) -> int:
  """transformers' Dinov2SwiGLUFFN keeps two thirds of the MLP width, rounded up to a multiple of 8."""
  return (int(int(width * mlp_ratio) * 2 / 3) + 7) // 8 * 8


def model_fields(preset, config: dict, tensors: dict) -> dict:
  """histojax ViT fields for a transformers config.json (the preset adds feature, norm and resampling)."""
  model_type = config.get("model_type")
  if model_type not in MODEL_TYPES:
    raise ValueError(f"config.json model_type {model_type!r}: histojax reads {list(MODEL_TYPES)}")
  if _int(config, "num_channels", 3) != 3 or config.get("qkv_bias", True) is not True:
    raise ValueError("config.json: histojax's ViT takes 3-channel images and attention with q/k/v biases")
  width = _int(config, "hidden_size")
  act = ACTS.get(config.get("hidden_act", "gelu"))
  if act is None:
    raise ValueError(f"config.json hidden_act {config.get('hidden_act')!r}: histojax implements {sorted(ACTS)}")
  fields = dict(width=width, layers=_int(config, "num_hidden_layers"), heads=_int(config, "num_attention_heads"),
                patch=_int(config, "patch_size"), image_size=_image_size(config), act=act, reg_tokens=0,
                pos_embed="prefix", mlp="mlp")
  if model_type == "vit":
    return dict(fields, mlp_dim=_int(config, "intermediate_size"), layer_scale=0.0,
                ln_eps=_number(config, "layer_norm_eps", 1e-12))
  ratio = _number(config, "mlp_ratio", 4)
  swiglu = config.get("use_swiglu_ffn", False) is True
  registers = _int(config, "num_register_tokens", 4 if model_type == "dinov2_with_registers" else 0)
  return dict(fields, mlp="glu" if swiglu else "mlp", act="silu" if swiglu else act,
              mlp_dim=2 * swiglu_hidden(width, ratio) if swiglu else int(width * ratio),
              # Dinov2Layer always scales both branches; 0 would leave histojax without the parameters.
              layer_scale=_number(config, "layerscale_value", 1.0) or 1.0, ln_eps=_number(config, "layer_norm_eps", 1e-6),
              reg_tokens=registers, pos_embed="class" if registers else "prefix")


def scope(tensors: dict) -> tuple[dict, dict]:
  """The vision model's tensors, with each layer's query, key and value fused into one [3D, D] projection."""
  ignored = {}
  if "embeddings.cls_token" not in tensors:
    wrapper = next((w for w in _WRAPPERS if f"{w}embeddings.cls_token" in tensors), None)
    if wrapper:
      ignored = {k: f"outside the {wrapper[:-1]} vision model (a task head)" for k in tensors
                 if not k.startswith(wrapper)}
      tensors = {k[len(wrapper):]: v for k, v in tensors.items() if k.startswith(wrapper)}
  out = dict(tensors)
  for key in tensors:
    m = re.fullmatch(r"(encoder\.layer\.\d+)\.attention\.attention\.query\.(weight|bias)", key)
    parts = [f"{m.group(1)}.attention.attention.{p}.{m.group(2)}" for p in ("query", "key", "value")] if m else []
    if parts and all(p in tensors for p in parts):
      out[f"{m.group(1)}.{_QKV}.{m.group(2)}"] = np.concatenate([np.asarray(tensors[p]) for p in parts], axis=0)
      for p in parts:
        del out[p]
  return out, ignored


FORMAT = Format(
    name="transformers",
    description="transformers weight folder (config.json + model.safetensors / pytorch_model.bin) of a preset: "
                "ViTModel (Phikon), Dinov2Model (Phikon-v2, Midnight), DINOv2 with registers (Hibou)",
    scope=scope,
    renames=((r"^embeddings\.cls_token$", "backbone.cls_token"),
             (r"^embeddings\.register_tokens$", "backbone.reg_token"),
             (r"^embeddings\.position_embeddings$", "backbone.pos_embed"),
             (r"^embeddings\.patch_embeddings\.projection\.", "backbone.patch_embed."),
             (r"^encoder\.layer\.(\d+)\.", r"backbone.blocks.\1."), (r"^layernorm\.", "backbone.norm."),
             (r"\.attention\.attention\.query\+key\+value\.", ".attn.qkv."),
             (r"\.attention\.output\.dense\.", ".attn.proj."),
             (r"\.layernorm_before\.", ".norm1."), (r"\.layernorm_after\.", ".norm2."),
             (r"\.intermediate\.dense\.", ".mlp.fc1."), (r"\.output\.dense\.", ".mlp.fc2."),
             (r"\.mlp\.weights_in\.", ".mlp.fc1."), (r"\.mlp\.weights_out\.", ".mlp.fc2."),
             (r"\.layer_scale([12])\.lambda1$", r".ls\1.gamma")),
    ignore=((r"^embeddings\.mask_token$", "masked-image-modelling token (pre-training only)"),
            (r"^pooler\.", "ViT pooler (dense + tanh): the card's feature is the class token of last_hidden_state")),
    special=((r"backbone\.(cls_token|reg_token|pos_embed)", lambda v, shape: same(v)),),
    configure=model_fields,
)
