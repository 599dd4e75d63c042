"""Published pathology foundation models by the names people use: `uni2_h`, `virchow2`, `midnight`, ...

A preset is everything histojax needs to reproduce a published encoder's
features from its weight folder, beyond what the folder itself says:

  architecture   histojax ViT fields at full depth (`models.vit`). For a weight
                 folder, widths and depth are read from its config.json and
                 checked against its tensors; the preset fills what they cannot
                 say (the activation behind timm's SwiGLUPacked, the heads, the
                 position layout, the feature).
  feature        the model card's feature convention (`vit.POOLS`); `features`
                 lists the alternatives the card or TRIDENT use.
  input          the card's eval transform: resize the short side to `resize`
                 (torchvision's Resize(int) rule) and centre-crop `input_size`, or
                 for `crop="squash"` resize to `input_size` square (transformers'
                 ViTImageProcessor), with PIL's `interpolation`; normalise with
                 `input_norm` (`models.embedder.INPUT_NORMS`).
  gallery_mpp    microns per pixel the model was trained at (0.5 = 20x), the
                 manifest field whole-slide search reads.
  resample       how the reference resamples the position grid for other input
                 sizes (`models.resample.RULES`).
  format         `timm` (hub folder: config.json with architecture/model_args +
                 model.safetensors or pytorch_model.bin) or `transformers`.
  card_kwargs    what the model card passes to timm.create_model in code, which
                 the hub config.json cannot hold (classes such as SwiGLUPacked).
  hub_config     the published config.json content that matters (model_args
                 for timm, the model config for transformers).

Sources checked for every field are named in `verified`. histojax never ships
or downloads these weights: most carry gated, non-commercial licences (`licence`).
"""

from __future__ import annotations

import dataclasses
import types

_SWIGLU = {"mlp_layer": "timm.layers.SwiGLUPacked", "act_layer": "torch.nn.SiLU"}
# The eval transform's resize filter and crop (`Preset.interpolation`, `Preset.crop`), as published:
# Resize(224) + CenterCrop(224) with torchvision's default bilinear in the UNI, Midnight and kaiko.ai
# cards, and in TRIDENT load.py for UNI2-h, H-optimus-0/1 and Phikon-v2 (their hub pretrained_cfg
# was not seen here); bicubic for Virchow/Virchow2 (their cards build timm's transform from the hub
# pretrained_cfg; TRIDENT: Resize(224, BICUBIC)); Resize(256, BICUBIC) + CenterCrop(224) in the
# Prov-GigaPath card; a square Resize((224, 224)) for Phikon (bilinear, as transformers'
# ViTImageProcessor) and Hibou (bicubic) in TRIDENT load.py.
INTERPOLATIONS = ("bilinear", "bicubic")
CROPS = ("center", "squash")


def _vit(width, layers, heads, patch, image_size, mlp_dim, *, mlp="mlp", act="gelu", layer_scale=0.0,
         reg_tokens=0, pos_embed="prefix", ln_eps=1e-6) -> dict:
  return dict(width=width, layers=layers, heads=heads, patch=patch, image_size=image_size, mlp_dim=mlp_dim, mlp=mlp,
              act=act, layer_scale=layer_scale, reg_tokens=reg_tokens, pos_embed=pos_embed, ln_eps=ln_eps)


@dataclasses.dataclass(frozen=True)
class Preset:
  name: str
  title: str
  source: str  # where the weights are published
  format: str  # "timm" | "transformers"
  architecture: dict
  feature: str
  input_norm: str
  licence: str
  verified: str
  features: tuple[str, ...] = ()
  input_size: int = 224
  resize: int = 224
  interpolation: str = "bilinear"  # PIL filter of the resize: torchvision's Resize default, as most cards
  crop: str = "center"  # "center": short side to `resize`, centre crop; "squash": straight to input_size square
  gallery_mpp: float = 0.5
  resample: str = "bicubic_antialias"
  timm_architecture: str = ""
  card_kwargs: dict = dataclasses.field(default_factory=dict)
  hub_config: dict = dataclasses.field(default_factory=dict)
  notes: str = ""

  def __post_init__(self):
    if self.interpolation not in INTERPOLATIONS or self.crop not in CROPS:
      raise ValueError(f"preset {self.name!r}: interpolation must be one of {INTERPOLATIONS} and crop one of "
                       f"{CROPS}, got {self.interpolation!r}, {self.crop!r}")

  def model_fields(self, feature: str | None = None) -> dict:
    """histojax model config fields (`models.model_config(name)` holds these plus head and dtype)."""
    feature = feature or self.feature
    allowed = (self.feature, *self.features)
    if feature not in allowed:
      raise ValueError(f"preset {self.name!r} offers features {list(allowed)}, got {feature!r}")
    return dict(self.architecture, pool=feature, resample=self.resample, patch_bias=True, embed_dim=0,
                input_norm=self.input_norm)


_UNI_CARD = "MahmoodLab model card and TRIDENT trident/patch_encoder_models/load.py"
_TIMM_SRC = "timm 1.0.31 vision_transformer.py architecture defaults"

_PRESETS = [
    Preset("uni", "UNI (Mahmood Lab)", "hf-hub:MahmoodLab/uni", "timm",
           _vit(1024, 24, 16, 16, 224, 4096, layer_scale=1e-5), "token", "imagenet",
           licence="CC-BY-NC-ND-4.0, gated: research use only",
           verified=f"{_UNI_CARD}; {_TIMM_SRC} (vit_large_patch16_224)",
           timm_architecture="vit_large_patch16_224",
           card_kwargs=dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True),
           hub_config=dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0)),
    Preset("uni2_h", "UNI2-h (Mahmood Lab)", "hf-hub:MahmoodLab/UNI2-h", "timm",
           _vit(1536, 24, 24, 14, 224, 8192, mlp="glu", act="silu", layer_scale=1e-5, reg_tokens=8,
                pos_embed="patches"), "token", "imagenet",
           licence="CC-BY-NC-ND-4.0, gated: research use only",
           verified=f"{_UNI_CARD}; {_TIMM_SRC} (vit_giant_patch14_224 overridden by the card's kwargs)",
           timm_architecture="vit_giant_patch14_224",
           card_kwargs=dict(img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5, embed_dim=1536,
                            mlp_ratio=2.66667 * 2, num_classes=0, no_embed_class=True, reg_tokens=8,
                            dynamic_img_size=True, **_SWIGLU),
           hub_config=dict(img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5, embed_dim=1536,
                           mlp_ratio=5.33334, num_classes=0, no_embed_class=True, reg_tokens=8,
                           dynamic_img_size=True)),
    Preset("virchow", "Virchow (Paige)", "hf-hub:paige-ai/Virchow", "timm",
           _vit(1280, 32, 16, 14, 224, 6832, mlp="glu", act="silu", layer_scale=1e-5), "token_patch_mean",
           "imagenet", features=("token",), interpolation="bicubic",
           licence="Apache-2.0 with Paige's additional terms, gated: research use, not clinical",
           verified="Virchow model card (config.json model_args, SwiGLUPacked + SiLU kwargs, class token + mean "
                    f"of patch tokens = 2560-d); TRIDENT load.py; {_TIMM_SRC} (vit_huge_patch14_224: 16 heads of 80)",
           timm_architecture="vit_huge_patch14_224", card_kwargs=dict(_SWIGLU),
           hub_config=dict(img_size=224, init_values=1e-5, num_classes=0, mlp_ratio=5.3375, global_pool="",
                           dynamic_img_size=True)),
    Preset("virchow2", "Virchow2 (Paige)", "hf-hub:paige-ai/Virchow2", "timm",
           _vit(1280, 32, 16, 14, 224, 6832, mlp="glu", act="silu", layer_scale=1e-5, reg_tokens=4),
           "token_patch_mean", "imagenet", features=("token",), interpolation="bicubic",
           licence="CC-BY-NC-ND-4.0, gated: non-commercial research only",
           verified="Virchow2 model card (config.json model_args with reg_tokens=4 and position embeddings over "
                    "1 + 4 + 256 tokens; features = class token + mean of tokens 5..); TRIDENT load.py",
           timm_architecture="vit_huge_patch14_224", card_kwargs=dict(_SWIGLU),
           hub_config=dict(img_size=224, init_values=1e-5, num_classes=0, reg_tokens=4, mlp_ratio=5.3375,
                           global_pool="", dynamic_img_size=True)),
    Preset("h_optimus_0", "H-optimus-0 (Bioptimus)", "hf-hub:bioptimus/H-optimus-0", "timm",
           _vit(1536, 40, 24, 14, 224, 8192, mlp="glu", act="silu", layer_scale=1e-5, reg_tokens=4,
                pos_embed="patches"), "token", "h_optimus",
           licence="Apache-2.0, gated",
           verified=f"TRIDENT load.py (kwargs, normalisation); {_TIMM_SRC} (vit_giant_patch14_reg4_dinov2)",
           timm_architecture="vit_giant_patch14_reg4_dinov2",
           card_kwargs=dict(init_values=1e-5, dynamic_img_size=False),
           hub_config=dict(img_size=224, num_classes=0, global_pool="token"),
           notes="hub config.json not seen here: its model_args are assumed to set img_size=224 (the card's "
                 "input); the position grid is read from the weights either way"),
    Preset("h_optimus_1", "H-optimus-1 (Bioptimus)", "hf-hub:bioptimus/H-optimus-1", "timm",
           _vit(1536, 40, 24, 14, 224, 8192, mlp="glu", act="silu", layer_scale=1e-5, reg_tokens=4,
                pos_embed="patches"), "token", "h_optimus",
           licence="gated, non-commercial: read the model card's terms",
           verified=f"TRIDENT load.py (kwargs, normalisation); {_TIMM_SRC} (vit_giant_patch14_reg4_dinov2)",
           timm_architecture="vit_giant_patch14_reg4_dinov2",
           card_kwargs=dict(init_values=1e-5, dynamic_img_size=False),
           hub_config=dict(img_size=224, num_classes=0, global_pool="token"),
           notes="same architecture as H-optimus-0; hub config.json not seen here"),
    Preset("prov_gigapath", "Prov-GigaPath tile encoder (Microsoft, Providence)", "hf-hub:prov-gigapath/prov-gigapath",
           "timm", _vit(1536, 40, 24, 16, 224, 8192, mlp="glu", act="silu", layer_scale=1e-5), "token", "imagenet",
           resize=256, interpolation="bicubic", licence="Apache-2.0, gated: research use only",
           verified="hub config.json (vit_giant_patch14_dinov2 with patch_size=16, mlp_ratio=5.33334) as quoted in "
                    f"public code; TRIDENT load.py (Resize 256 + CenterCrop 224); {_TIMM_SRC}: the architecture "
                    "function brings SwiGLUPacked + SiLU, so fc1 is 8192 wide packed, fc2 reads 4096",
           timm_architecture="vit_giant_patch14_dinov2",
           hub_config=dict(img_size=224, in_chans=3, patch_size=16, embed_dim=1536, depth=40, num_heads=24,
                           init_values=1e-05, mlp_ratio=5.33334, num_classes=0)),
    Preset("phikon", "Phikon (Owkin)", "owkin/phikon", "transformers",
           _vit(768, 12, 12, 16, 224, 3072, ln_eps=1e-12), "token", "imagenet", resample="bicubic", crop="squash",
           licence="Owkin non-commercial licence",
           verified="TRIDENT load.py (ViTModel, last_hidden_state[:, 0]); transformers 5.25 ViTModel",
           hub_config=dict(model_type="vit", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                           intermediate_size=3072, hidden_act="gelu", layer_norm_eps=1e-12, image_size=224,
                           patch_size=16, qkv_bias=True),
           notes="hub config.json not seen here: layer_norm_eps is read from the folder's config"),
    Preset("phikon_v2", "Phikon-v2 (Owkin)", "owkin/phikon-v2", "transformers",
           _vit(1024, 24, 16, 16, 224, 4096, layer_scale=1.0), "token", "imagenet", resample="bicubic",
           licence="Owkin non-commercial licence",
           verified="TRIDENT load.py (AutoModel, last_hidden_state[:, 0], ImageNet normalisation); transformers "
                    "5.25 Dinov2Model",
           hub_config=dict(model_type="dinov2", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                           mlp_ratio=4, hidden_act="gelu", layer_norm_eps=1e-6, layerscale_value=1.0,
                           image_size=224, patch_size=16, qkv_bias=True, use_swiglu_ffn=False),
           notes="hub config.json not seen here: widths, depth and image size are read from the folder"),
    Preset("hibou_b", "Hibou-B (HistAI)", "histai/hibou-b", "transformers",
           _vit(768, 12, 12, 14, 224, 4096, mlp="glu", act="silu", layer_scale=1.0, reg_tokens=4, pos_embed="class"),
           "token", "hibou", resample="bicubic_offset", crop="squash", interpolation="bicubic", licence="Apache-2.0",
           verified="hub config.json (Dinov2ModelWithRegisters, num_register_tokens=4, use_swiglu_ffn, patch 14); "
                    "HistAI/hibou vision_transformer.py (registers inserted after the position embedding); "
                    "preprocessor stats as used by TRIDENT and others",
           hub_config=dict(model_type="dinov2", architectures=["Dinov2ModelWithRegisters"], hidden_size=768,
                           num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4, hidden_act="gelu",
                           layer_norm_eps=1e-6, layerscale_value=1.0, image_size=224, patch_size=14, qkv_bias=True,
                           use_swiglu_ffn=True, num_register_tokens=4),
           notes="the remote modeling_dinov2.py could not be read here: the register tensor name "
                 "(embeddings.register_tokens), pooler_output = final-normed class token, and the resampling "
                 "rule (transformers 4.41's +0.1 offset) are those of the transformers code it derives from"),
    Preset("hibou_l", "Hibou-L (HistAI)", "histai/hibou-L", "transformers",
           _vit(1024, 24, 16, 14, 224, 5472, mlp="glu", act="silu", layer_scale=1.0, reg_tokens=4, pos_embed="class"),
           "token", "hibou", resample="bicubic_offset", crop="squash", interpolation="bicubic",
           licence="Apache-2.0 (check the card)",
           verified="as hibou_b; Hibou-L's own config.json was not seen here",
           hub_config=dict(model_type="dinov2", architectures=["Dinov2ModelWithRegisters"], hidden_size=1024,
                           num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4, hidden_act="gelu",
                           layer_norm_eps=1e-6, layerscale_value=1.0, image_size=224, patch_size=14, qkv_bias=True,
                           use_swiglu_ffn=True, num_register_tokens=4),
           notes="architecture assumed like Hibou-B at ViT-L width; the folder's config.json decides"),
    Preset("midnight", "Midnight-12k (kaiko.ai)", "kaiko-ai/midnight", "transformers",
           _vit(1536, 40, 24, 14, 224, 8192, mlp="glu", act="silu", layer_scale=1.0), "token_patch_mean", "kaiko",
           features=("token",), resample="bicubic", licence="MIT",
           verified="Midnight model card (class token + mean of patch tokens, 3072-d; mean = std = 0.5); TRIDENT "
                    "load.py (class token only, the `token` option); transformers 5.25 Dinov2Model",
           hub_config=dict(model_type="dinov2", hidden_size=1536, num_hidden_layers=40, num_attention_heads=24,
                           mlp_ratio=4, hidden_act="gelu", layer_norm_eps=1e-6, layerscale_value=1.0,
                           image_size=224, patch_size=14, qkv_bias=True, use_swiglu_ffn=True),
           notes="hub config.json not seen here: image size is read from the folder"),
]

_KAIKO = [("kaiko_vits16", "vit_small_patch16_224", _vit(384, 12, 6, 16, 224, 1536)),
          ("kaiko_vits8", "vit_small_patch8_224", _vit(384, 12, 6, 8, 224, 1536)),
          ("kaiko_vitb16", "vit_base_patch16_224", _vit(768, 12, 12, 16, 224, 3072)),
          ("kaiko_vitb8", "vit_base_patch8_224", _vit(768, 12, 12, 8, 224, 3072)),
          ("kaiko_vitl14", "vit_large_patch14_reg4_dinov2",
           _vit(1024, 24, 16, 14, 518, 4096, layer_scale=1e-5, reg_tokens=4, pos_embed="patches"))]
for _name, _arch, _fields in _KAIKO:
  _PRESETS.append(Preset(
      _name, f"kaiko.ai {_arch}", f"hf-hub:1aurent/{_arch}.kaiko_ai_towards_large_pathology_fms", "timm", _fields,
      "token", "kaiko", licence="kaiko non-commercial licence",
      verified="1aurent hub config.json (architecture, global_pool=token; ViT-L/14 stored at 518 px) and card "
               f"(dynamic_img_size=True, 224 px, mean = std = 0.5); TRIDENT load.py; {_TIMM_SRC}",
      timm_architecture=_arch, card_kwargs=dict(dynamic_img_size=True, num_classes=0),
      hub_config=dict(), notes="ViT-L/14 runs at 224 px on a 37x37 grid resampled to 16x16" if "l14" in _name else ""))

PRESETS: types.MappingProxyType = types.MappingProxyType({p.name: p for p in _PRESETS})


def names() -> list[str]:
  return sorted(PRESETS)


def get(name: str) -> Preset:
  if name not in PRESETS:
    raise KeyError(f"unknown preset {name!r}; known: {', '.join(names())}")
  return PRESETS[name]
