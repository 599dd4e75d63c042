"""timm hub folders: the architecture from config.json + the model card's kwargs, the weights by timm's names.

timm builds a hub model as `create_model(config["architecture"],
**config["model_args"], **kwargs_from_the_card)`: the architecture function's
defaults, overridden by the hub's model_args, overridden by what the card
passes in code (classes such as `mlp_layer=SwiGLUPacked` cannot be stored in
JSON). `model_fields` replays that merge from the preset's `card_kwargs` and
maps the result onto histojax's ViT; the tensors must then fit it exactly.
Depth is the folder's: model_args' `depth`, else the blocks in the weights (a
card's `depth=24` in code describes the published folder, not a fine-tuned or
truncated one, which then fits or fails on its own terms).
Names are those of `timm_vit` plus `reg_token`.
"""

from __future__ import annotations

import math
import numbers
import re

from histojax.weights import timm_vit
from histojax.weights.transfer import Format, same

# timm 1.0.31 architecture functions used by the presets (vision_transformer.py), as kwargs.
ARCHITECTURES = {
    "vit_small_patch16_224": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "vit_small_patch8_224": dict(patch_size=8, embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16_224": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_base_patch8_224": dict(patch_size=8, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16_224": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "vit_huge_patch14_224": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
    "vit_giant_patch14_224": dict(patch_size=14, embed_dim=1408, mlp_ratio=48 / 11, depth=40, num_heads=16),
    "vit_large_patch14_reg4_dinov2": dict(patch_size=14, embed_dim=1024, depth=24, num_heads=16, init_values=1e-5,
                                          reg_tokens=4, no_embed_class=True),
    "vit_giant_patch14_dinov2": dict(patch_size=14, embed_dim=1536, depth=40, num_heads=24, init_values=1e-5,
                                     mlp_ratio=2.66667 * 2, mlp_layer="SwiGLUPacked", act_layer="SiLU"),
    "vit_giant_patch14_reg4_dinov2": dict(patch_size=14, embed_dim=1536, depth=40, num_heads=24, init_values=1e-5,
                                          mlp_ratio=2.66667 * 2, mlp_layer="SwiGLUPacked", act_layer="SiLU",
                                          reg_tokens=4, no_embed_class=True),
}
# VisionTransformer's own defaults, then which values histojax's ViT implements.
DEFAULTS = dict(img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
                qkv_bias=True, init_values=None, class_token=True, reg_tokens=0, no_embed_class=False,
                pre_norm=False, final_norm=True, fc_norm=None, global_pool="token", qk_norm=False,
                mlp_layer="Mlp", act_layer="GELU", pos_embed="learn")
REQUIRED = dict(in_chans=3, qkv_bias=True, class_token=True, pre_norm=False, final_norm=True, qk_norm=False,
                pos_embed="learn")
# Training-only or output-size settings that do not change the features.
HARMLESS = {"num_classes", "dynamic_img_size", "dynamic_img_pad", "drop_rate", "pos_drop_rate", "patch_drop_rate",
            "proj_drop_rate", "attn_drop_rate", "drop_path_rate", "weight_init"}
ACTS = {"GELU": "gelu", "SiLU": "silu", "QuickGELU": "quick_gelu"}
MLPS = {"Mlp": "mlp", "SwiGLUPacked": "glu"}


def _short(value):
  """"timm.layers.SwiGLUPacked" / "torch.nn.SiLU" -> the class name."""
  return value.rsplit(".", 1)[-1] if isinstance(value, str) else value


def merged_kwargs(card_kwargs: dict, config: dict, tensors: dict | None = None) -> dict:
  """What timm.create_model receives: architecture defaults <- model_args <- the card's kwargs
  (depth: the folder's, see the module doc)."""
  arch = config.get("architecture")
  if arch not in ARCHITECTURES:
    raise ValueError(f"config.json architecture {arch!r} is not one histojax maps; known: {sorted(ARCHITECTURES)}")
  model_args = config.get("model_args", {})
  if not isinstance(model_args, dict):
    raise ValueError(f"config.json model_args must be an object, got {type(model_args).__name__}")
  kwargs = dict(DEFAULTS, **ARCHITECTURES[arch])
  input_size = config.get("pretrained_cfg", {}).get("input_size") if isinstance(config.get("pretrained_cfg"), dict) else None
  if isinstance(input_size, list) and len(input_size) == 3:
    kwargs["img_size"] = input_size[-1]  # timm fills img_size from pretrained_cfg when no kwarg sets it
  if "global_pool" in config:
    kwargs["global_pool"] = config["global_pool"]
  kwargs.update(model_args)
  kwargs.update({k: _short(v) for k, v in card_kwargs.items() if k != "depth"})
  blocks = {m.group(1) for k in tensors or () if (m := re.match(r"blocks\.(\d+)\.", k))}
  if "depth" not in model_args and blocks:
    kwargs["depth"] = len(blocks)
  return kwargs


def _positive_int(kwargs, name, value=None):
  value = kwargs[name] if value is None else value
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 < value <= 1 << 16:
    raise ValueError(f"config.json / model card {name} must be a positive integer, got {value!r}")
  return int(value)


def _image_size(value) -> int:
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise ValueError(f"img_size {value!r}: histojax's ViT stores a square position grid")
    value = value[0]
  return _positive_int({}, "img_size", value)


def _stored_grid(tensors: dict, kw: dict, patch: int) -> int:
  """The image size of the stored position grid (0 if the weights do not show one). timm builds the model at
  img_size and resamples a different stored grid once at load; histojax keeps the stored grid and
  resamples at run time, once, from it."""
  pos = tensors.get("pos_embed")
  rows = pos.shape[1] - (0 if kw["no_embed_class"] else 1 + int(kw["reg_tokens"])) if pos is not None and pos.ndim == 3 else 0
  grid = math.isqrt(max(rows, 0))
  return grid * patch if grid and grid * grid == rows else 0


def model_fields(preset, config: dict, tensors: dict) -> dict:
  """histojax ViT fields for the folder's config.json under `preset`'s model-card kwargs."""
  kw = merged_kwargs(preset.card_kwargs, config, tensors)
  unknown = sorted(set(kw) - set(DEFAULTS) - HARMLESS)
  if unknown:
    raise ValueError(f"config.json / model card set {unknown}, which histojax's ViT does not implement")
  wrong = {k: kw[k] for k, v in REQUIRED.items() if kw[k] != v}
  if wrong or kw["fc_norm"] or kw["global_pool"] not in ("token", "", "avg"):
    raise ValueError(f"config.json / model card set {wrong or {k: kw[k] for k in ('fc_norm', 'global_pool')}}, "
                     f"which histojax's ViT does not implement")
  mlp, act = MLPS.get(_short(kw["mlp_layer"])), ACTS.get(_short(kw["act_layer"]))
  if mlp is None or act is None:
    raise ValueError(f"mlp_layer {kw['mlp_layer']!r} / act_layer {kw['act_layer']!r}: histojax implements "
                     f"{sorted(MLPS)} with {sorted(ACTS)}")
  width, patch = _positive_int(kw, "embed_dim"), _positive_int(kw, "patch_size")
  ratio = kw["mlp_ratio"]
  if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0 < ratio < 64:
    raise ValueError(f"mlp_ratio must be a positive number, got {ratio!r}")
  return dict(width=width, layers=_positive_int(kw, "depth"), heads=_positive_int(kw, "num_heads"),
              patch=patch, image_size=_stored_grid(tensors, kw, patch) or _image_size(kw["img_size"]),
              mlp_dim=int(width * ratio), mlp=mlp, act=act, ln_eps=1e-6,
              layer_scale=float(kw["init_values"] or 0.0), reg_tokens=int(kw["reg_tokens"]),
              pos_embed="patches" if kw["no_embed_class"] else "prefix")


FORMAT = Format(
    name="timm",
    description="timm hub folder (config.json with architecture/model_args + model.safetensors or "
                "pytorch_model.bin) of a preset: UNI, UNI2-h, Virchow/2, H-optimus-0/1, Prov-GigaPath, kaiko.ai",
    renames=timm_vit.FORMAT.renames + ((r"^reg_token$", "backbone.reg_token"),),
    ignore=timm_vit.FORMAT.ignore,
    special=timm_vit.FORMAT.special + ((r"backbone\.reg_token", lambda v, shape: same(v)),),
    configure=model_fields,
)
