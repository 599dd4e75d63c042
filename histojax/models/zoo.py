"""The model zoo: every backbone by name, with its default config, and the heads.

`config.model.name` picks a backbone family preset; its fields (depth, width,
layers, ...) are all overridable, and `config.model.head.name` picks the head
(`base_config(model=..., head=...)`). `model.embed_dim` is the retrieval
embedding width; 0 keeps the backbone's own (pooled) features, which is how
published CLIP and pathology ViTs are used.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from histojax.models import abe, heads, mixed_attention, presets, resnet, vit
from histojax.models.embedder import Embedder
from histojax.registry import Registry

MODELS = Registry("model")
HEADS = Registry("head")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(cfg: ml_collections.ConfigDict):
  """Activations' dtype; parameters always stay float32."""
  if cfg.dtype not in DTYPES:
    raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {cfg.dtype!r}")
  return DTYPES[cfg.dtype]


def _config(head: str | None = "linear", **fields) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(dict(fields, dtype="float32"))
  if head is not None:
    cfg.head = HEADS.defaults(head)
  return cfg


def _check_head_fields(cfg) -> None:
  # `--config.model.head.name=cgd` alone would leave the linear head's fields behind.
  expected = set(HEADS.defaults(cfg.head.name).keys())
  if set(cfg.head.keys()) != expected:
    raise ValueError(f"model.head has fields {sorted(cfg.head.keys())} but head {cfg.head.name!r} takes "
                     f"{sorted(expected)}: choose the head when building the config, "
                     f"base_config(model={cfg.name!r}, head={cfg.head.name!r})")


def _embedder(cfg, backbone, rngs) -> Embedder:
  _check_head_fields(cfg)
  dtype = compute_dtype(cfg)
  head = HEADS.get(cfg.head.name)(cfg, backbone.num_features, dtype, rngs)
  return Embedder(backbone, head, dtype=dtype, input_norm=cfg.input_norm)


# --- Heads ------------------------------------------------------------------

@HEADS.register("linear", defaults=ml_collections.ConfigDict)
def _linear_head(cfg, in_features, dtype, rngs):
  return heads.EmbeddingHead(in_features, cfg.embed_dim, dtype=dtype, rngs=rngs)


@HEADS.register("cgd", defaults=lambda: ml_collections.ConfigDict(dict(
    descriptors="SMG", gem_p=3.0, gem_learnable=False, num_classes=0, descriptor_norm="batch_norm")))
def _cgd_head(cfg, in_features, dtype, rngs):
  h = cfg.head
  return heads.CGDHead(in_features, cfg.embed_dim, descriptors=h.descriptors, gem_p=h.gem_p,
                       gem_learnable=h.gem_learnable, num_classes=h.num_classes,
                       descriptor_norm=h.descriptor_norm, dtype=dtype, rngs=rngs)


@HEADS.register("byol", defaults=lambda: ml_collections.ConfigDict(dict(
    projector_hidden=4096, projector_dim=256, predictor_hidden=4096, probe_classes=0)))
def _byol_head(cfg, in_features, dtype, rngs):
  if cfg.embed_dim:
    raise ValueError(f"model.embed_dim must be 0 with the byol head (its embedding is the backbone's "
                     f"pooled features), got {cfg.embed_dim}")
  h = cfg.head
  return heads.BYOLHead(in_features, projector_hidden=h.projector_hidden, projector_dim=h.projector_dim,
                        predictor_hidden=h.predictor_hidden, probe_classes=h.probe_classes,
                        dtype=dtype, rngs=rngs)


# --- ResNet family ----------------------------------------------------------

def _resnet_defaults(se_reduction=0):
  return lambda: _config(depth=50, width=1.0, se_reduction=se_reduction, last_stride=2, embed_dim=512,
                         input_norm="imagenet")


def _build_resnet(cfg, rngs):
  backbone = resnet.ResNet(cfg.depth, cfg.width, se_reduction=cfg.se_reduction, last_stride=cfg.last_stride,
                           dtype=compute_dtype(cfg), rngs=rngs)
  return _embedder(cfg, backbone, rngs)


MODELS.register("resnet", defaults=_resnet_defaults())(_build_resnet)
MODELS.register("se_resnet", defaults=_resnet_defaults(se_reduction=16))(_build_resnet)


@MODELS.register("mixed_attention", defaults=lambda: _config(
    depth=50, width=1.0, se_reduction=16, embed_dim=512, input_norm="imagenet"))
def _build_mixed_attention(cfg, rngs):
  backbone = mixed_attention.MixedAttentionResNet(cfg.depth, cfg.width, se_reduction=cfg.se_reduction,
                                                  dtype=compute_dtype(cfg), rngs=rngs)
  return _embedder(cfg, backbone, rngs)


@MODELS.register("abe", defaults=lambda: _config(
    head=None, depth=50, width=1.0, se_reduction=0, num_learners=4, embed_dim=512, input_norm="imagenet"))
def _build_abe(cfg, rngs):
  dtype = compute_dtype(cfg)
  backbone = abe.ABEResNet(cfg.depth, cfg.width, num_learners=cfg.num_learners, se_reduction=cfg.se_reduction,
                           dtype=dtype, rngs=rngs)
  head = heads.EnsembleHead(backbone.num_features, cfg.embed_dim, cfg.num_learners, dtype=dtype, rngs=rngs)
  return Embedder(backbone, head, dtype=dtype, input_norm=cfg.input_norm)


# --- Vision Transformers ----------------------------------------------------

def _vit_fields(width, layers, heads_, patch, image_size=224):
  return dict(width=width, layers=layers, heads=heads_, patch=patch, image_size=image_size, mlp_dim=4 * width,
              embed_dim=0)


def _clip_defaults(width, layers, heads_, patch, proj_dim):
  # OpenAI's towers use QuickGELU; LAION-trained open_clip ones use act="gelu".
  return lambda: _config(**_vit_fields(width, layers, heads_, patch), proj_dim=proj_dim, act="quick_gelu",
                         input_norm="clip")


def _timm_defaults(width, layers, heads_, patch):
  return lambda: _config(**_vit_fields(width, layers, heads_, patch), act="gelu", layer_scale=0.0,
                         pool="token", input_norm="imagenet")


def _build_clip_vit(cfg, rngs):
  backbone = vit.VisionTransformer(
      width=cfg.width, layers=cfg.layers, heads=cfg.heads, patch=cfg.patch, image_size=cfg.image_size,
      mlp_dim=cfg.mlp_dim, act=cfg.act, ln_eps=1e-5, patch_bias=False, pre_norm=True, proj_dim=cfg.proj_dim,
      dtype=compute_dtype(cfg), rngs=rngs)
  return _embedder(cfg, backbone, rngs)


def _build_timm_vit(cfg, rngs):
  backbone = vit.VisionTransformer(
      width=cfg.width, layers=cfg.layers, heads=cfg.heads, patch=cfg.patch, image_size=cfg.image_size,
      mlp_dim=cfg.mlp_dim, act=cfg.act, ln_eps=1e-6, patch_bias=True, pre_norm=False,
      layer_scale=cfg.layer_scale, pool=cfg.pool, dtype=compute_dtype(cfg), rngs=rngs)
  return _embedder(cfg, backbone, rngs)


CLIP_PRESETS = {"clip_vit_b32": (768, 12, 12, 32, 512), "clip_vit_b16": (768, 12, 12, 16, 512),
                "clip_vit_l14": (1024, 24, 16, 14, 768)}
TIMM_PRESETS = {"vit_b16": (768, 12, 12, 16), "vit_l16": (1024, 24, 16, 16)}
for _name, _dims in CLIP_PRESETS.items():
  MODELS.register(_name, defaults=_clip_defaults(*_dims))(_build_clip_vit)
for _name, _dims in TIMM_PRESETS.items():
  MODELS.register(_name, defaults=_timm_defaults(*_dims))(_build_timm_vit)


# --- Published pathology foundation models (models.presets), by their own names ---

def _build_foundation_vit(cfg, rngs):
  backbone = vit.VisionTransformer(
      width=cfg.width, layers=cfg.layers, heads=cfg.heads, patch=cfg.patch, image_size=cfg.image_size,
      mlp_dim=cfg.mlp_dim, mlp=cfg.mlp, act=cfg.act, ln_eps=cfg.ln_eps, patch_bias=cfg.patch_bias, pre_norm=False,
      layer_scale=cfg.layer_scale, reg_tokens=cfg.reg_tokens, pos_embed=cfg.pos_embed, pool=cfg.pool,
      resample=cfg.resample, dtype=compute_dtype(cfg), rngs=rngs)
  return _embedder(cfg, backbone, rngs)


for _name in presets.names():
  MODELS.register(_name, defaults=lambda n=_name: _config(**presets.get(n).model_fields()))(_build_foundation_vit)


# --- Entry points -------------------------------------------------------------

# Head fields added after checkpoints were written, with the value that rebuilds those checkpoints:
# `config.load` gives a run config written before the field that value, and `identity` leaves the
# field out while it holds it, so the exports and indexes of those runs still match their model.
LEGACY_HEAD_FIELDS = {"cgd": {"descriptor_norm": "none"}}


def identity(cfg: ml_collections.ConfigDict) -> dict:
  """The model config as export and index manifests record it (`LEGACY_HEAD_FIELDS`)."""
  out = cfg.to_dict()
  head = out.get("head") or {}
  for field, value in LEGACY_HEAD_FIELDS.get(head.get("name"), {}).items():
    if head.get(field) == value:
      del head[field]
  return out


def model_config(name: str, head: str | None = None) -> ml_collections.ConfigDict:
  """Default config of model `name`, with head `head` instead of its default one."""
  cfg = MODELS.defaults(name)
  if head is not None:
    if "head" not in cfg:
      raise ValueError(f"model {name!r} has its own head; it takes no model.head (got {head!r})")
    cfg.head = HEADS.defaults(head)
  return cfg


def build_model(cfg: ml_collections.ConfigDict, seed: int = 0) -> Embedder:
  return MODELS.get(cfg.name)(cfg, nnx.Rngs(seed))


def abstract_model(cfg: ml_collections.ConfigDict) -> Embedder:
  """The model with shapes but no arrays: free to build at any size."""
  return nnx.eval_shape(lambda: build_model(cfg))


def parameter_count(module: nnx.Module) -> int:
  """Trainable parameters (batch statistics excluded), as papers count them."""
  return sum(int(x.size) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))
