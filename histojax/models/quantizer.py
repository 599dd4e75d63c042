"""Product quantisation with learnable codebooks (SPQ, Jang & Cho, ICCV 2021).

A D-dim feature is cut into M sub-vectors of D/M dims; sub-vector m is
represented by one of K codewords of codebook m, so a database item costs
M * log2(K) bits. Training uses a *soft* assignment (softmax over cosine
similarities to the codewords, sharpened by 1/temperature) so gradients
reach both the features and the codebooks; the database stores the hard
argmax codes, and queries stay float: `histojax.pq` searches the codes by
asymmetric distance with `unit_codebooks()`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


def _unit(x, axis=-1):
  return x / jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), 1e-12))


class ProductQuantizer(nnx.Module):
  def __init__(self, dim: int, num_codebooks: int, codebook_size: int, *, temperature: float = 0.2,
               rngs: nnx.Rngs):
    if dim % num_codebooks:
      raise ValueError(f"feature dim {dim} is not divisible by num_codebooks={num_codebooks}")
    if codebook_size < 2 or codebook_size & (codebook_size - 1):
      raise ValueError(f"codebook_size must be a power of two >= 2, got {codebook_size}")
    self.num_codebooks, self.codebook_size = num_codebooks, codebook_size
    self.sub_dim = dim // num_codebooks
    self.temperature = temperature
    init = jax.random.normal(rngs.params(), (num_codebooks, codebook_size, self.sub_dim))
    self.codebooks = nnx.Param(_unit(init))

  @property
  def bits(self) -> int:
    return self.num_codebooks * int(math.log2(self.codebook_size))

  def split(self, features):
    """[..., D] -> [..., M, D/M]."""
    return features.reshape(*features.shape[:-1], self.num_codebooks, self.sub_dim)

  def unit_codebooks(self):
    """Codewords as used everywhere: unit vectors, so cosine argmax = dot-product argmax."""
    return _unit(self.codebooks[...])

  def similarities(self, features):
    """Cosine similarity of every sub-vector to every codeword: [..., M, K]."""
    sub = _unit(self.split(features.astype(jnp.float32)))
    return jnp.einsum("...md,mkd->...mk", sub, self.unit_codebooks())

  def soft_quantize(self, features):
    """Differentiable reconstruction: softmax-weighted codewords, [..., D]."""
    weights = jax.nn.softmax(self.similarities(features) / self.temperature, axis=-1)
    quantized = jnp.einsum("...mk,mkd->...md", weights, self.unit_codebooks())
    return quantized.reshape(*features.shape[:-1], -1)

  def encode(self, features):
    """Hard codes [..., M] (int32): the most similar codeword per sub-vector."""
    return jnp.argmax(self.similarities(features), axis=-1).astype(jnp.int32)

  def decode(self, codes):
    """Codes [..., M] -> reconstructed vectors [..., D] (unit codewords)."""
    words = self.unit_codebooks()[jnp.arange(self.num_codebooks), codes]
    return words.reshape(*codes.shape[:-1], -1)
