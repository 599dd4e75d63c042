"""Deep metric learning objectives over labelled, m-per-class batches."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from histojax.objectives.base import OBJECTIVES


def _log1p_sum_exp(x, mask):
  """log(1 + sum_{mask} exp(x)) per row, stable for large x."""
  x = jnp.where(mask, x, -jnp.inf)
  top = jnp.maximum(jnp.max(x, axis=1), 0.0)
  total = jnp.exp(-top) + jnp.sum(jnp.where(mask, jnp.exp(x - top[:, None]), 0.0), axis=1)
  return top + jnp.log(total)


def multi_similarity_loss(embeddings, labels, *, alpha=2.0, beta=5.0, base=0.5, epsilon=0.1):
  """Multi-Similarity loss (Wang et al., CVPR 2019) with its pair mining.

  With S the cosine similarity matrix of the batch, anchor i keeps
    negatives j with S_ij + epsilon > min_{k in P_i} S_ik, and
    positives j with S_ij - epsilon < max_{k in N_i} S_ik,
  and contributes
    1/alpha log(1 + sum_{kept pos} exp(-alpha (S_ij - base)))
    + 1/beta log(1 + sum_{kept neg} exp(beta (S_ij - base))).
  As in the authors' code, an anchor left with no kept positive or no kept
  negative contributes 0, and the sum is divided by the batch size. The
  anchor itself is excluded by index (the authors drop pairs with S >= 1 - eps,
  which would also drop true near-duplicates).

  Returns (loss, aux) where aux has the fraction of anchors that contribute
  and the mean positive and negative similarity.
  """
  emb = embeddings.astype(jnp.float32)
  sim = emb @ emb.T
  n = sim.shape[0]
  same = labels[:, None] == labels[None, :]
  pos = same & ~jnp.eye(n, dtype=bool)
  neg = ~same
  hardest_pos = jnp.min(jnp.where(pos, sim, jnp.inf), axis=1, keepdims=True)
  hardest_neg = jnp.max(jnp.where(neg, sim, -jnp.inf), axis=1, keepdims=True)
  neg_kept = neg & (sim + epsilon > hardest_pos)
  pos_kept = pos & (sim - epsilon < hardest_neg)
  pos_term = _log1p_sum_exp(-alpha * (sim - base), pos_kept) / alpha
  neg_term = _log1p_sum_exp(beta * (sim - base), neg_kept) / beta
  active = jnp.any(pos_kept, axis=1) & jnp.any(neg_kept, axis=1)
  loss = jnp.sum(jnp.where(active, pos_term + neg_term, 0.0)) / n
  aux = {
      "active_anchors": jnp.mean(active.astype(jnp.float32)),
      "sim_pos": jnp.sum(jnp.where(pos, sim, 0.0)) / jnp.maximum(jnp.sum(pos), 1),
      "sim_neg": jnp.sum(jnp.where(neg, sim, 0.0)) / jnp.maximum(jnp.sum(neg), 1),
  }
  return loss, aux


def _ms_defaults():
  return ml_collections.ConfigDict(dict(alpha=2.0, beta=5.0, base=0.5, epsilon=0.1))


@OBJECTIVES.register("multi_similarity", defaults=_ms_defaults)
def multi_similarity(cfg: ml_collections.ConfigDict):
  def loss_fn(model, batch, rng: jax.Array):
    del rng  # deterministic given the batch
    return multi_similarity_loss(model(batch["image"]), batch["label"], alpha=cfg.alpha,
                                 beta=cfg.beta, base=cfg.base, epsilon=cfg.epsilon)
  return loss_fn
