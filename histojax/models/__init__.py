"""Models chosen by name: `config.model.name` -> an `Embedder`."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
from flax import nnx

from histojax.models import heads, resnet
from histojax.models.embedder import Embedder
from histojax.registry import Registry

MODELS = Registry("model")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _resnet_defaults():
  return ml_collections.ConfigDict(dict(depth=50, width=1.0, embed_dim=512, dtype="float32"))


@MODELS.register("resnet", defaults=_resnet_defaults)
def _build_resnet(cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> Embedder:
  dtype = compute_dtype(cfg)
  backbone = resnet.ResNet(cfg.depth, cfg.width, dtype=dtype, rngs=rngs)
  head = heads.EmbeddingHead(backbone.num_features, cfg.embed_dim, dtype=dtype, rngs=rngs)
  return Embedder(backbone, head, dtype=dtype)


def compute_dtype(cfg: ml_collections.ConfigDict):
  """Activations' dtype; parameters always stay float32."""
  if cfg.dtype not in DTYPES:
    raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {cfg.dtype!r}")
  return DTYPES[cfg.dtype]


def build_model(cfg: ml_collections.ConfigDict, seed: int = 0) -> Embedder:
  return MODELS.get(cfg.name)(cfg, nnx.Rngs(seed))
