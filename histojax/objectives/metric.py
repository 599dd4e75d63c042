"""Deep metric learning objectives over labelled, m-per-class batches.

Every loss takes the *global* batch's embeddings, so negatives come from all
devices, and returns (loss, aux) with aux a dict of scalar diagnostics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from histojax.objectives.base import OBJECTIVES, Objective


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


def _pair_masks(labels):
  n = labels.shape[0]
  same = labels[:, None] == labels[None, :]
  return same & ~jnp.eye(n, dtype=bool), ~same


def _distances(emb):
  """Euclidean distances between rows (unit rows: sqrt(2 - 2 cos)), safe at 0."""
  emb = emb.astype(jnp.float32)
  sq = jnp.sum(emb * emb, 1)
  d2 = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * emb @ emb.T, 0.0)
  # sqrt has an infinite gradient at 0 (the diagonal, duplicates): clamp inside.
  return jnp.sqrt(jnp.maximum(d2, 1e-12)), d2


def _masked_mean(x, mask):
  return jnp.sum(jnp.where(mask, x, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def contrastive_loss(embeddings, labels, *, margin=0.5):
  """Contrastive loss (Hadsell et al., 2006) on Euclidean distances d.

  Positive pairs pay d^2, negative pairs pay max(0, margin - d)^2. The two
  kinds are averaged separately and added, so the many negatives of an
  m-per-class batch do not drown the few positives; a pair (i, j) is
  counted in both orders, which leaves each mean unchanged.
  """
  pos, neg = _pair_masks(labels)
  d, d2 = _distances(embeddings)
  pos_loss = _masked_mean(d2, pos)
  neg_loss = _masked_mean(jnp.square(jax.nn.relu(margin - d)), neg)
  return pos_loss + neg_loss, {"pos_loss": pos_loss, "neg_loss": neg_loss}


def batch_hard_triplet_loss(embeddings, labels, *, margin=0.1):
  """Batch-hard triplet loss (Hermans et al., 2017) on Euclidean distances.

  Each anchor takes its farthest positive and nearest negative in the batch
  and pays max(0, d_ap - d_an + margin); the mean is over anchors that have
  both a positive and a negative.
  """
  pos, neg = _pair_masks(labels)
  d, _ = _distances(embeddings)
  hardest_pos = jnp.max(jnp.where(pos, d, -jnp.inf), axis=1)
  hardest_neg = jnp.min(jnp.where(neg, d, jnp.inf), axis=1)
  valid = jnp.any(pos, 1) & jnp.any(neg, 1)
  per_anchor = jax.nn.relu(hardest_pos - hardest_neg + margin)
  loss = _masked_mean(per_anchor, valid)
  return loss, {"active_triplets": _masked_mean((per_anchor > 0).astype(jnp.float32), valid)}


def divergence_loss(sub_embeddings, *, margin=0.2):
  """ABE's divergence term (Kim et al., ECCV 2018): learners must disagree.

  `sub_embeddings` is [B, M, D]: learner m's embedding of image i. For every
  image and every pair of learners m < n, pay max(0, margin - ||f_m - f_n||^2);
  sum over learner pairs, mean over images.
  """
  f = sub_embeddings.astype(jnp.float32)
  d2 = jnp.sum(jnp.square(f[:, :, None, :] - f[:, None, :, :]), -1)  # [B, M, M]
  m = f.shape[1]
  upper = jnp.triu(jnp.ones((m, m), bool), k=1)
  return jnp.mean(jnp.sum(jnp.where(upper, jax.nn.relu(margin - d2), 0.0), axis=(1, 2)))


def abe_loss(sub_embeddings, labels, *, margin_c=0.5, lambda_div=0.05, margin_div=0.2):
  """ABE-M objective: a contrastive loss on every learner's sub-embedding plus
  lambda_div times the divergence term."""
  per_learner = [contrastive_loss(sub_embeddings[:, m], labels, margin=margin_c)[0]
                 for m in range(sub_embeddings.shape[1])]
  metric = sum(per_learner)
  div = divergence_loss(sub_embeddings, margin=margin_div)
  return metric + lambda_div * div, {"metric_loss": metric, "divergence": div}


class _SingleView(Objective):
  """Labelled metric learning on one augmented view of each patch."""

  def loss(self, model, batch, rng):
    return self.embedding_loss(model(self.augment(batch["image"], rng)), batch["label"])

  def embedding_loss(self, embeddings, labels):
    raise NotImplementedError


@OBJECTIVES.register("multi_similarity", defaults=lambda: ml_collections.ConfigDict(
    dict(alpha=2.0, beta=5.0, base=0.5, epsilon=0.1)))
class MultiSimilarity(_SingleView):
  def embedding_loss(self, embeddings, labels):
    c = self.cfg
    return multi_similarity_loss(embeddings, labels, alpha=c.alpha, beta=c.beta, base=c.base, epsilon=c.epsilon)


@OBJECTIVES.register("contrastive", defaults=lambda: ml_collections.ConfigDict(dict(margin=0.5)))
class Contrastive(_SingleView):
  def embedding_loss(self, embeddings, labels):
    return contrastive_loss(embeddings, labels, margin=self.cfg.margin)


@OBJECTIVES.register("triplet", defaults=lambda: ml_collections.ConfigDict(dict(margin=0.1)))
class Triplet(_SingleView):
  def embedding_loss(self, embeddings, labels):
    return batch_hard_triplet_loss(embeddings, labels, margin=self.cfg.margin)


@OBJECTIVES.register("abe", defaults=lambda: ml_collections.ConfigDict(
    dict(margin_c=0.5, lambda_div=0.05, margin_div=0.2)))
class ABE(Objective):
  """ABE-M: contrastive loss per learner + divergence; needs `model.name='abe'`."""

  def loss(self, model, batch, rng):
    outputs = model.outputs(self.augment(batch["image"], rng))
    if "learners" not in outputs:
      raise ValueError(f"objective 'abe' needs per-learner embeddings: set model.name='abe' "
                       f"(got {self.model_cfg.name!r})")
    c = self.cfg
    return abe_loss(outputs["learners"], batch["label"], margin_c=c.margin_c, lambda_div=c.lambda_div,
                    margin_div=c.margin_div)
