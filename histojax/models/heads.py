"""Heads that turn backbone features into retrieval embeddings."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx


def l2_normalize(x, eps: float = 1e-12):
  x = x.astype(jnp.float32)  # norms in fp32 even when the trunk runs in bf16
  return x / jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


class EmbeddingHead(nnx.Module):
  """Linear projection to `dim`, then L2 normalisation (cosine geometry)."""

  def __init__(self, in_features: int, dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.proj = nnx.Linear(in_features, dim, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)

  def __call__(self, features):
    return l2_normalize(self.proj(features))
