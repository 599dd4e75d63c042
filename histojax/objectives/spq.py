"""SPQ (Jang & Cho, ICCV 2021): label-free product-quantisation codebooks.

Two views of each patch go through the embedder; each view's features are
soft-quantised by the codebooks, and the cross-quantised contrastive loss
pulls one view's features towards the other view's quantised version. The
database is stored as hard codes (M * log2 K bits per patch) and searched by
asymmetric distance: queries stay float.
"""

from __future__ import annotations

import jax
import ml_collections
from flax import nnx

from histojax.models.quantizer import ProductQuantizer
from histojax.objectives.base import OBJECTIVES, Objective
from histojax.objectives.contrastive import cross_quantized_contrastive_loss
from histojax.weights import store


class SPQNet(nnx.Module):
  """Embedder + quantiser; `SPQ.codebooks` hands the quantiser's codebooks to export."""

  def __init__(self, embedder: nnx.Module, quantizer: ProductQuantizer):
    self.embedder = embedder
    self.quantizer = quantizer

  def __call__(self, images):
    return self.embedder(images)


@OBJECTIVES.register("spq", defaults=lambda: ml_collections.ConfigDict(dict(
    num_codebooks=4, codebook_size=256, soft_temperature=0.2, temperature=0.5)))
class SPQ(Objective):
  views = 2

  def build_model(self, seed):
    embedder = super().build_model(seed)
    dim = self.model_cfg.embed_dim
    if not dim:
      raise ValueError("objective 'spq' needs a projected embedding: set model.embed_dim > 0 "
                       "(a multiple of objective.num_codebooks)")
    c = self.cfg
    quantizer = ProductQuantizer(dim, c.num_codebooks, c.codebook_size, temperature=c.soft_temperature,
                                 rngs=nnx.Rngs(seed + 1))
    return SPQNet(embedder, quantizer)

  def loss(self, model, batch, rng):
    k1, k2 = jax.random.split(rng)
    x1 = model.embedder(self.augment(batch["view1"], k1, view=1))
    x2 = model.embedder(self.augment(batch["view2"], k2, view=2))
    z1, z2 = model.quantizer.soft_quantize(x1), model.quantizer.soft_quantize(x2)
    loss = cross_quantized_contrastive_loss(x1, z1, x2, z2, temperature=self.cfg.temperature)
    return loss, {"codeword_usage": _codeword_usage(model.quantizer.encode(x1), self.cfg.codebook_size)}

  def embed(self, model, images):
    return model.embedder(images)

  def codebooks(self, model):
    # Unit codewords: the quantiser's hard codes (cosine argmax) equal pq.encode's dot-product argmax.
    return model.quantizer.unit_codebooks(), "dot_product"

  def load_weights(self, state, directory):
    state[0]["embedder"] = store.apply(state[0]["embedder"], directory)
    return state


def _codeword_usage(codes, codebook_size):
  """Fraction of codewords used in the batch, averaged over codebooks (collapse shows as ~0)."""
  one_hot = jax.nn.one_hot(codes, codebook_size)  # [B, M, K]
  return (one_hot.max(axis=0) > 0).mean()
